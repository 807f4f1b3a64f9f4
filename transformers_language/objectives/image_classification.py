"""The image-classification objective (ViT): summed cross-entropy, soft targets from Mixup / CutMix and label
smoothing, top-1 / top-5 accuracy.

Training targets are soft labels: one-hot, smoothed (`--label_smoothing` e: (1 - e) y + e / C) and mixed
between two images of the batch (`--mixup_alpha`, `--cutmix_alpha`, torchvision's MixUp / CutMix; with both,
one of them per batch, each with probability 1/2). Their randomness is drawn from the step's generator, so a
resumed run mixes the same pairs with the same weights. Evaluation and calibration use the hard labels.
The loss sums over images, so the training loop divides by the images of the whole optimizer step, as it
divides by tokens for the language models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..arguments import FINITE_NON_NEGATIVE, OPEN_UNIT_INTERVAL, arg
from .base import LossModule, Objective, Targets, derive_seed


class ImageClassificationLoss(LossModule):
    """A ViT classifier with its loss: summed cross-entropy against hard (B,) or soft (B, C) labels."""

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor, with_accuracy: bool = False):
        """Summed cross-entropy; with `with_accuracy`, (B,) hard labels only: [loss sum, top-1 hits, top-5
        hits]."""
        logits = self.model(pixel_values=pixel_values).logits.float()
        loss = F.cross_entropy(logits, labels, reduction="sum")
        if not with_accuracy:
            return loss
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == labels.unsqueeze(1)
        return torch.stack([loss, hits[:, 0].sum().float(), hits.any(dim=1).sum().float()])


@dataclass(frozen=True)
class MixTargets:
    """Soft training targets: smoothed one-hot labels, then Mixup or CutMix of the batch (torchvision)."""

    num_classes: int
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    """(Ranges are checked with the flags, MixingArgs.)"""

    def _mixers(self, batch: int) -> list:
        """torchvision's MixUp / CutMix over `batch` classes: mixing the one-hot image indices of the batch gives
        the (B, B) matrix of which two images each result mixes, with what weight."""
        from torchvision.transforms import v2  # the image scripts' dependency, imported when used

        mixers = []
        if self.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=self.mixup_alpha, num_classes=batch))
        if self.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=self.cutmix_alpha, num_classes=batch))
        return mixers

    def __call__(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = batch["pixel_values"], batch["labels"]
        soft = F.one_hot(labels, self.num_classes).float()
        soft = soft * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        mixers = self._mixers(len(labels))
        if not mixers:
            return pixels, soft
        # torchvision draws from the global RNG: fork it, seeded from the step's generator.
        seed = derive_seed(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mixer = mixers[int(torch.randint(len(mixers), ()))]
            mixed, pairs = mixer(pixels, torch.arange(len(labels), device=labels.device))
        return mixed, pairs.to(soft.dtype) @ soft  # both mixers combine labels linearly, like the pixels


@dataclass(frozen=True)
class MixingArgs:
    """The image-classification objective's training flags: soft targets."""

    label_smoothing: float = arg(0.0, "Label smoothing of the targets.", OPEN_UNIT_INTERVAL, type=float)
    mixup_alpha: float = arg(0.0, "Mixup's Beta(alpha, alpha) (0: off).", FINITE_NON_NEGATIVE, type=float)
    cutmix_alpha: float = arg(0.0, "CutMix's Beta(alpha, alpha) (0: off).", FINITE_NON_NEGATIVE, type=float)


@dataclass(frozen=True)
class ImageClassification(Objective):
    """Image classification with a ViT: pixels in, class labels out."""

    def count_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Images in the batch (hard or soft labels)."""
        return torch.tensor(labels.shape[0], device=labels.device)

    def work(self, inputs: torch.Tensor) -> int:
        return inputs.shape[0]

    def flags_class(self, training: bool) -> type | None:
        return MixingArgs if training else None

    def targets(self, preprocessor, config, flags: MixingArgs | None, training: bool = False) -> Targets:
        if not training:
            return _hard_labels
        return MixTargets(config.num_labels, flags.label_smoothing, flags.mixup_alpha, flags.cutmix_alpha)

    def evaluation_sums(self, loss_module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[loss sum, images, top-1 hits, top-5 hits]."""
        loss, top1, top5 = loss_module(inputs, labels, with_accuracy=True).double()
        return torch.stack([loss, torch.ones_like(loss) * labels.shape[0], top1, top5])

    def evaluation_results(self, sums: list[float], rows: torch.Tensor | None = None) -> dict:
        loss_sum, images, top1, top5 = sums
        images = max(images, 1.0)
        return {
            "accuracy": top1 / images,
            "top5_accuracy": top5 / images,
            "eval_loss": loss_sum / images,
            "eval_images": int(images),
        }


def _hard_labels(batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["pixel_values"], batch["labels"]


IMAGE_CLASSIFICATION = ImageClassification(
    "image_classification",
    ImageClassificationLoss,
    label_shift=0,
    input_key="pixel_values",
    throughput="images_per_s",
    reported=(("accuracy", "top-1 accuracy"), ("top5_accuracy", "top-5 accuracy"), ("eval_loss", "loss")),
    higher_is_better=True,
)
