"""Image datasets for ViT training and evaluation: a hub dataset or local image folders, torchvision transforms.

Sources: `--dataset_name` (a hub image-classification dataset with an image and a class-label column, e.g.
`ILSVRC/imagenet-1k`, `uoft-cs/cifar10`) or `--train_dir` / `--validation_dir` (one sub-folder per class,
HF's `imagefolder` layout). The class names come from the data and fix the classifier's size.

Training images go through RandomResizedCrop, a horizontal flip and optionally RandAugment (torchvision v2);
evaluation and calibration images are resized to `image_size / eval_crop_fraction` and center-cropped. Each
training image's randomness is seeded by (seed, epoch, position in the epoch): the sampler hands the dataset
that seed with the index (`SeededImages`), so the augmentations are the same with any number of loader workers
and after an interrupted run resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from datasets import Image as DatasetImage

from ..arguments import FRACTION, NON_NEGATIVE, PERCENTAGE, FlagParser, add_group, arg, from_flag
from ..errors import InputFileError, UsageError
from ..families import SequenceFlag
from .image_files import check_image_folder, decoded, folder_classes

SPLITS = ("train", "validation")
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")


@dataclass(frozen=True)
class ImageDataArgs:
    """The data flags of the ViT scripts: where the images come from and how much of them."""

    dataset_name: str | None = arg(help="Hub image dataset, e.g. uoft-cs/cifar10 (alternative: --train_dir).")
    dataset_config_name: str | None = arg(help="The hub dataset's configuration.")
    train_split: str = arg("train", "The hub dataset's training split.")
    validation_split: str = arg("validation", "The hub dataset's validation split (CIFAR: test).")
    train_dir: str | None = arg(help="Local training images, one sub-folder per class.")
    validation_dir: str | None = arg(help="Local validation images, one sub-folder per class.")
    image_column: str | None = arg(help=f"Image column (default: the first of {', '.join(IMAGE_COLUMNS)}).")
    label_column: str | None = arg(help=f"Label column (default: the first of {', '.join(LABEL_COLUMNS)}).")
    train_percentage: float | None = arg(
        help="Use P%% of the training images, spread evenly.", check=PERCENTAGE, type=float
    )
    validation_percentage: float | None = arg(
        help="Use P%% of the validation images, spread evenly.", check=PERCENTAGE, type=float
    )
    dataloader_num_workers: int = arg(0, "Processes decoding and augmenting training images.", NON_NEGATIVE, type=int)
    skip_broken_images: bool = arg(
        False,
        "Leave out image files that cannot be read (each named in a warning, with the count) instead of stopping.",
        action="store_true",
    )
    eval_crop_fraction: float = arg(
        0.875, "Evaluation: resize to image_size / F, then center-crop.", FRACTION, type=float
    )
    seq_length: int | None = from_flag(help="The image side in pixels: the family's size flag, as given.")
    broken_files: tuple[str, ...] = from_flag((), "Resolved: the broken image files left out (--skip_broken_images).")

    def folder(self, split: str) -> str | None:
        return {"train": self.train_dir, "validation": self.validation_dir}[split]

    def percentage(self, split: str) -> float | None:
        return {"train": self.train_percentage, "validation": self.validation_percentage}[split]


@dataclass(frozen=True)
class AugmentationArgs:
    """The training augmentations (the paper's ViT recipe sets all of them; see scripts/vit_s16_*.sh)."""

    random_resized_crop_scale: tuple[float, float] = arg(
        (0.08, 1.0), "RandomResizedCrop's area range (MIN MAX).", type=float, nargs=2
    )
    horizontal_flip_prob: float = arg(0.5, "Probability of a horizontal flip.", type=float)
    randaugment_num_ops: int = arg(0, "RandAugment's operations per image (0: no RandAugment).", type=int)
    randaugment_magnitude: int = arg(9, "RandAugment's magnitude (of 31 bins).", type=int)

    def __post_init__(self):
        low, high = self.random_resized_crop_scale
        if not 0 < low <= high <= 1:
            raise UsageError(f"--random_resized_crop_scale needs 0 < MIN <= MAX <= 1, got {low} {high}.")
        if not 0 <= self.horizontal_flip_prob <= 1:
            raise UsageError(f"--horizontal_flip_prob must lie in [0, 1], got {self.horizontal_flip_prob}.")
        if self.randaugment_num_ops < 0 or not 0 <= self.randaugment_magnitude < 31:
            raise UsageError("--randaugment_num_ops must be >= 0 and --randaugment_magnitude in [0, 30].")


def add_image_data_args(parser: FlagParser, sequence: SequenceFlag, training: bool) -> FlagParser:
    def size_flag(group) -> None:
        group.add_argument(f"--{sequence.name}", type=int, default=sequence.default, help=sequence.help)

    omit = () if training else ("dataloader_num_workers",)
    add_group(
        parser,
        "data",
        ImageDataArgs,
        "data",
        after={"validation_dir": size_flag},
        omit=omit,
        sources={"seq_length": sequence.name},
    )
    if training:
        add_group(parser, "augmentation", AugmentationArgs, "augmentation")
    return parser


def check_image_sources(data: ImageDataArgs, splits: tuple[str, ...]) -> tuple[ImageDataArgs, list[str] | None]:
    """The data flags and folders of `splits`, checked once, before anything is loaded (every class folder must
    hold images, every image file must open): the data settings with the broken files to leave out, and the
    class names of the folders (each listed once), or None for a hub dataset (its label feature names them)."""
    local = [f"--{split}_dir" for split in SPLITS if data.folder(split)]
    if data.dataset_name is not None and local:
        raise UsageError(f"--dataset_name and {', '.join(local)} both choose the images; use one of them.")
    for split in splits:
        folder = data.folder(split)
        if data.dataset_name is None and folder is None:
            raise UsageError(f"No {split} images: pass --dataset_name or --{split}_dir.")
        if folder is not None and not Path(folder).is_dir():
            raise InputFileError(f"--{split}_dir {folder} is not a folder; pass a folder of class sub-folders.")
    flags = {data.folder(split): f"--{split}_dir" for split in splits if data.folder(split)}
    classes = {folder: folder_classes(folder) for folder in flags}
    for folder, names in classes.items():
        if not names:
            raise InputFileError(
                f"{flags[folder]} {folder} has no class sub-folders; put each class's images in its own folder."
            )
    if len(classes) == 2:
        (train_dir, train_names), (validation_dir, validation_names) = classes.items()
        if train_names != validation_names:
            # imagefolder numbers each folder's classes on its own: other classes would shift every label.
            only = sorted(set(train_names) ^ set(validation_names))
            raise UsageError(
                f"--train_dir {train_dir} and --validation_dir {validation_dir} hold different classes "
                f"({', '.join(only[:5])} only in one); give both the same class sub-folders."
            )
    broken = [
        path
        for folder, names in classes.items()
        for path in check_image_folder(folder, flags[folder], names, data.skip_broken_images)
    ]
    return replace(data, broken_files=tuple(broken)), next(iter(classes.values()), None)


def _column(dataset: Dataset, chosen: str | None, candidates: tuple[str, ...], what: str, flag: str) -> str:
    if chosen is not None:
        if chosen not in dataset.column_names:
            raise UsageError(f"--{flag} {chosen!r} is not a column of the data ({', '.join(dataset.column_names)}).")
        return chosen
    for name in candidates:
        if name in dataset.column_names:
            return name
    raise UsageError(f"The data has no {what} column among {dataset.column_names}; name it with --{flag}.")


def load_image_split(data: ImageDataArgs, split: str) -> Dataset:
    """One split as a Dataset of `image` (PIL) and `label` (class index) columns, the class names in its
    `label` feature."""
    if data.dataset_name is not None:
        hub_split = data.train_split if split == "train" else data.validation_split
        dataset = load_dataset(data.dataset_name, data.dataset_config_name, split=hub_split)
    else:
        dataset = _without(load_dataset("imagefolder", data_dir=data.folder(split), split="train"), data.broken_files)
    image = _column(dataset, data.image_column, IMAGE_COLUMNS, "image", "image_column")
    label = _column(dataset, data.label_column, LABEL_COLUMNS, "label", "label_column")
    dataset = dataset.select_columns([image, label])
    if image != "image":
        dataset = dataset.rename_column(image, "image")
    if label != "label":
        dataset = dataset.rename_column(label, "label")
    if not hasattr(dataset.features["label"], "names"):
        raise UsageError(f"The {split} labels ({label!r}) are not class labels; pass a classification dataset.")
    percentage = data.percentage(split)
    if percentage is not None:  # spread evenly: a folder's images are sorted by class
        count = math.ceil(len(dataset) * percentage / 100)
        dataset = dataset.select([math.floor(i * 100 / percentage) for i in range(count)])
    return dataset


def _without(dataset: Dataset, broken: tuple[str, ...]) -> Dataset:
    """An image folder's dataset without the broken files (--skip_broken_images)."""
    if not broken:
        return dataset
    paths = dataset.cast_column("image", DatasetImage(decode=False))["image"]
    leave_out = set(broken)
    return dataset.select([i for i, item in enumerate(paths) if str(Path(item["path"]).resolve()) not in leave_out])


def class_names(dataset: Dataset) -> list[str]:
    return list(dataset.features["label"].names)


def _to_rgb(image):
    return image.convert("RGB") if hasattr(image, "convert") else image


def eval_transform(image_size: int, mean, std, crop_fraction: float):
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Lambda(_to_rgb),
            v2.ToImage(),
            v2.Resize(int(image_size / crop_fraction), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def train_transform(image_size: int, mean, std, augment: AugmentationArgs):
    from torchvision.transforms import v2

    steps = [
        v2.Lambda(_to_rgb),
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=tuple(augment.random_resized_crop_scale), antialias=True),
        v2.RandomHorizontalFlip(augment.horizontal_flip_prob),
    ]
    if augment.randaugment_num_ops:
        steps.append(v2.RandAugment(augment.randaugment_num_ops, augment.randaugment_magnitude))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class _BatchTransform:
    """Deterministic transform of a batch of rows into stacked `pixel_values` and `labels` (picklable)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, batch: dict) -> dict:
        pixels = torch.stack([decoded(self.transform, image) for image in batch["image"]])
        return {"pixel_values": pixels, "labels": torch.as_tensor(batch["label"], dtype=torch.long)}


def with_eval_transform(dataset: Dataset, transform) -> Dataset:
    return dataset.with_transform(_BatchTransform(transform))


class SeededImages(torch.utils.data.Dataset):
    """Training images, each augmented under its own seed: the sampler yields (index, seed) keys."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        row = self.dataset[index]
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG
            torch.manual_seed(seed)
            pixels = decoded(self.transform, row["image"])
        return {"pixel_values": pixels, "labels": torch.tensor(row["label"], dtype=torch.long)}
