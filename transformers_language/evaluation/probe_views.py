"""What the probes need to know about a model's inputs, per modality: text (token ids) or images (pixels).

The outlier statistics count, per "token", how often a sequence's maximum and its >6 sigma values sit there:
for text that is the token id, for images the position in the sequence ([CLS], then the patches row by row,
where background patches are what no-op heads park on). The attention diagnostics mark two sets of keys
besides the first one: delimiters (special tokens, `.` and `,`) for text; for images the lowest-variance
patches of each image (the `BACKGROUND_SHARE` of its patches whose pixels vary least: uninformative
background). Both kinds give the first key's mass and its sink ratio the same meaning (the first key is
`[CLS]` / `<s>` / `</s>`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from .attention_stats import delimiter_token_ids

BACKGROUND_SHARE = 0.25


def token_string(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A readable form of one token (`[SEP]`, `</s>`, `.`); word-start marks of byte-level BPE removed."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    text = tokenizer.convert_tokens_to_string([token]).strip()
    return text or token


class TextInputs:
    """Token ids (B, T): the statistics' tokens are the ids; marks: first token and delimiters."""

    second_mark = "delimiter_mass"

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, config: PretrainedConfig):
        self.tokenizer = tokenizer  # None: no delimiters are marked (training telemetry logs first-key figures)
        self.token_space = config.vocab_size
        self.delimiter_ids = [] if tokenizer is None else delimiter_token_ids(tokenizer)

    def token_ids(self, inputs) -> torch.Tensor:
        """The (B, T) ids of a batch's inputs (the ids, or a padded batch's mapping of columns)."""
        return inputs["input_ids"] if isinstance(inputs, Mapping) else inputs

    def marks(self, inputs) -> torch.Tensor:
        """(B, T, 2) indicators over the keys: [first token, delimiters]."""
        input_ids = self.token_ids(inputs)
        marked = torch.zeros(*input_ids.shape, 2, device=input_ids.device)
        marked[:, 0, 0] = 1.0
        delimiters = torch.tensor(self.delimiter_ids, dtype=torch.long, device=input_ids.device)
        marked[..., 1] = torch.isin(input_ids, delimiters).float()
        return marked

    def token_name(self, token_id: int) -> str:
        return str(token_id) if self.tokenizer is None else token_string(self.tokenizer, token_id)

    def record(self) -> dict:
        return {"delimiter_tokens": [self.tokenizer.convert_ids_to_tokens(i) for i in self.delimiter_ids]}


class ImageInputs:
    """Pixels (B, C, H, W) of a ViT: the statistics' tokens are the sequence positions ([CLS] = 0, then the
    patches row by row); marks: [CLS] and each image's lowest-variance patches."""

    second_mark = "background_mass"

    def __init__(self, preprocessor, config: PretrainedConfig):
        self.patch_size = config.patch_size
        self.side = config.image_size // config.patch_size
        self.token_space = self.side * self.side + 1

    def token_ids(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch = pixel_values.shape[0]
        return torch.arange(self.token_space, device=pixel_values.device).expand(batch, -1)

    def patch_variance(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N) variance of each patch's pixel values (all channels), patches row by row."""
        patches = torch.nn.functional.unfold(pixel_values.float(), self.patch_size, stride=self.patch_size)
        return patches.var(dim=1, unbiased=False)  # unfold: (B, C * p * p, N)

    def marks(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, 2) indicators over the keys: [[CLS], the lowest-variance patches]."""
        variance = self.patch_variance(pixel_values)
        batch, patches = variance.shape
        count = max(1, round(BACKGROUND_SHARE * patches))
        marked = torch.zeros(batch, patches + 1, 2, device=pixel_values.device)
        marked[:, 0, 0] = 1.0
        lowest = variance.topk(count, dim=1, largest=False).indices + 1  # keys: [CLS] first
        marked[..., 1].scatter_(1, lowest, 1.0)
        return marked

    def token_name(self, position: int) -> str:
        if position == 0:
            return "[CLS]"
        row, column = divmod(position - 1, self.side)
        return f"patch ({row}, {column})"

    def record(self) -> dict:
        return {"background_patches": f"the {BACKGROUND_SHARE:.0%} lowest-variance patches of each image"}
