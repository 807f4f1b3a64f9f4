"""Attention diagnostics per layer and head, streamed over an evaluation: how heads "do nothing".

A head that wants no update puts its attention on tokens that carry little information (the first token,
[SEP], `.`, `,`; in a ViT, [CLS] and background patches), which is what grows outliers in vanilla models.
Which keys count as such comes from the model's inputs (probe_views.py). Per layer and head this measures:
  first_token_mass      mean attention probability on the first key position
  sink_ratio            first_token_mass over what uniform attention would put there (1/keys a query may
                        attend, averaged over queries: ~0.042 for causal attention over 128 positions, where
                        the first query can see nothing else), so a value of 3 means a head parks on the first
                        token three times more than chance, whatever the sequence length
  delimiter_mass        text: mean total attention probability on delimiter tokens (see `delimiter_token_ids`)
  background_mass       images: mean total attention probability on each image's lowest-variance patches
  row_sum               variants other than plain softmax: mean total weight a query gives the sequence's
                        keys (1 for softmax; below 1 where a head abstains, any value for sigmoid attention)
  sink_mass             softmax1, learned sinks and the learned key/value: mean weight on the null / learned
                        key, 1 - row_sum
  exact_zero_fraction   clipped variants and softpick: share of attended (not masked) query-key pairs whose
                        weight is exactly 0
  gate_mean             mean gate probability sigmoid(G(x)) (gated models; without the fine-tuning scale;
                        elementwise gates: also over channels)
The masses come from the variants' `key_mass` point: first-key, second-mark and all-keys indicators ride
along as extra value channels, so vanilla and gated attention keep the fused kernel. Exact zeros need the
weights, which those variants compute anyway.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from quantization.token_mask import current_mask

from ..runtime import sum_across_processes

DELIMITER_STRINGS = (".", ",")


_BPE_SPACE_MARKS = "Ġ▁"  # byte-level BPE / sentencepiece word-start marks


@functools.cache  # called per layer and batch with the same few shapes
def uniform_first_key_mass(queries: int, keys: int, is_causal: bool) -> float:
    """Summed over `queries` queries, the attention uniform weights put on the first of `keys` keys (causal:
    query i of the last `queries` positions sees keys - queries + i + 1 keys)."""
    if not is_causal:
        return queries / keys
    return sum(1.0 / (keys - queries + i + 1) for i in range(queries))


def delimiter_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens that delimit text (e.g. [CLS], [SEP], <s>, </s>, <pad>) and the tokens of `.` and `,`."""
    skip = {tokenizer.mask_token_id, tokenizer.unk_token_id}
    ids = {i for i in tokenizer.all_special_ids if i not in skip}
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token is not None and token.lstrip(_BPE_SPACE_MARKS) in DELIMITER_STRINGS:
            ids.add(index)
    return sorted(ids)


MARKS = 3  # indicator columns over the keys: first key, the inputs' second mark, every key of the sequence


def counts_zeros(variant) -> bool:
    """Whether a layer's weights can be exactly 0 by design (clipped variants, softpick)."""
    return variant.settings.clipped or variant.softmax.exact_zeros


def rows_may_not_sum_to_one(variant) -> bool:
    """Whether a layer's weights on the sequence's keys can sum to anything but 1 (every variant but plain
    softmax without a learned key)."""
    return not variant.settings.plain_softmax or variant.bias_kv is not None


def has_sink(variant) -> bool:
    """Whether a layer sends what its sequence's keys do not get to a null or learned key (unclipped)."""
    return (variant.softmax.sink or variant.bias_kv is not None) and not variant.settings.clipped


def gate_mean_per_head(probability: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(H,) mean gate probability of a (1|B, H, 1|T, 1|d) gate output, each sequence weighted alike; per-token
    gates of a padded batch (`mask`: its real tokens) average each sequence's real tokens only."""
    if mask is None or probability.shape[0] != mask.shape[0] or probability.shape[2] != mask.shape[1]:
        return probability.mean(dim=(0, 2, 3))
    weights = mask.to(probability.dtype)
    per_sequence = (probability * weights[:, None, :, None]).sum(dim=2) / weights.sum(dim=1)[:, None, None]
    return per_sequence.mean(dim=(0, 2))


class AttentionStatistics:
    """Streams the attention diagnostics of every attention layer of `model` (see the module docstring).

    Used like `ActivationStatistics`: `attached()`, `start_batch(inputs, index)` per batch, `synced()`.
    `inputs` (probe_views.py) marks the keys: `marks(inputs)` gives (B, S, 2) indicators [first key, second
    mark], `second_mark` names the second figure."""

    def __init__(self, model: nn.Module, inputs):
        self.variants = list(model.attention_variants().values())
        device = next(model.parameters()).device
        self.inputs = inputs
        heads = model.config.num_attention_heads
        # Per layer, allocated up front (so every process joins the sync with the same shapes):
        # mass [first token (H), delimiters (H), all keys (H), queries, uniform first-token mass];
        # zeros [exact zeros (H), attended pairs]; gate [sequence-weighted gate sum (H), sequences].
        self._sums: dict[str, torch.Tensor] = {}
        for layer, variant in enumerate(self.variants):
            self._sums[f"mass_{layer}"] = torch.zeros(MARKS * heads + 2, dtype=torch.float64, device=device)
            if counts_zeros(variant):
                self._sums[f"zeros_{layer}"] = torch.zeros(heads + 1, dtype=torch.float64, device=device)
            if variant.gate is not None:
                self._sums[f"gate_{layer}"] = torch.zeros(heads + 1, dtype=torch.float64, device=device)
        self._batch = 0
        self._mask: torch.Tensor | None = None
        self._lengths: list[int] = []

    def start_batch(self, inputs, index: int) -> None:
        """Mark the keys of the batch about to run; inside a padded batch's scope (quantization/token_mask.py),
        only its real queries and keys count."""
        marks = self.inputs.marks(inputs)
        marked = torch.cat([marks, torch.ones_like(marks[..., :1])], dim=-1)  # (B, S, [first, second, all])
        self._batch = marked.shape[0]
        self._mask = current_mask()
        if self._mask is not None:
            marked = marked * self._mask.unsqueeze(-1).to(marked.dtype)  # a padded key is no mark
            self._lengths = self._mask.sum(dim=1).tolist()  # one sync per batch, for the uniform masses
        for variant in self.variants:
            variant.marked_keys = marked

    def _add(self, key: str, values: torch.Tensor) -> None:
        self._sums[key] += values

    def _mass_hook(self, layer: int):
        variant = self.variants[layer]

        def hook(module, args, output):
            values = output.detach().float()  # (B, T, H, MARKS)
            batch, queries, keys = output.shape[0], output.shape[1], variant.marked_keys.shape[1]
            if self._mask is None:
                uniform = batch * uniform_first_key_mass(queries, keys, variant.is_causal)
                counts = values.new_tensor([batch * queries, uniform])
            else:  # real queries only; each attends its sequence's real keys
                values = values * self._mask[:, :, None, None].to(values.dtype)
                uniform = sum(uniform_first_key_mass(n, n, variant.is_causal) for n in self._lengths)
                counts = values.new_tensor([sum(self._lengths), uniform])
            mass = values.sum(dim=(0, 1))  # (H, MARKS): summed over sequences and queries
            self._add(f"mass_{layer}", torch.cat([mass.t().flatten(), counts]).double())

        return hook

    def _zeros_hook(self, layer: int, is_causal: bool):
        def hook(module, args, output):
            batch, _, queries, keys = output.shape  # (B, H, T, S)
            zero = output == 0
            allowed = torch.ones(1, 1, queries, keys, dtype=torch.bool, device=output.device)
            if is_causal:  # only keys a query may attend to count (bottom-right aligned, as with a cache)
                allowed = allowed.tril(keys - queries)
            if self._mask is not None:  # real queries and real keys (prepended keys are real)
                mask = self._mask.to(output.device)
                real_keys = torch.cat([mask.new_ones(batch, keys - queries), mask], dim=1)
                allowed = allowed & (mask[:, None, :, None] & real_keys[:, None, None, :])
            zero &= allowed
            pairs = allowed.expand(batch, 1, queries, keys).sum()
            zeros = zero.sum(dim=(0, 2, 3))
            self._add(f"zeros_{layer}", torch.cat([zeros.double(), pairs.double().view(1)]))

        return hook

    def _gate_hook(self, layer: int):
        def hook(module, args, output):
            probability = output.detach().float() / module.scale  # (1|B, H, 1|T, 1)
            batch = self._batch  # weight by sequences (per-head gates have no batch axis)
            per_head = gate_mean_per_head(probability, self._mask).double() * batch
            self._add(f"gate_{layer}", torch.cat([per_head, per_head.new_full((1,), batch)]))

        return hook

    @contextmanager
    def attached(self):
        handles = []
        for layer, variant in enumerate(self.variants):
            handles.append(variant.key_mass.register_forward_hook(self._mass_hook(layer)))
            if counts_zeros(variant):
                handles.append(variant.probs.register_forward_hook(self._zeros_hook(layer, variant.is_causal)))
            if variant.gate is not None:
                handles.append(variant.gate.register_forward_hook(self._gate_hook(layer)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for variant in self.variants:
                variant.marked_keys = None

    def synced(self, accelerator) -> dict[str, dict[str, list[float]]]:
        """Per layer ('layer_0', ...), per head figures, after one sum across processes. A layer that computed
        no attention (skip_attn) reports nothing."""
        totals = dict(zip(self._sums, sum_across_processes(accelerator, list(self._sums.values())), strict=True))
        result = {}
        for layer in range(len(self.variants)):
            *per_head, queries, uniform = totals[f"mass_{layer}"].tolist()
            if not queries:
                continue
            heads = len(per_head) // MARKS
            first, second, every = (per_head[i * heads : (i + 1) * heads] for i in range(MARKS))
            figures = {
                "first_token_mass": [v / queries for v in first],
                "sink_ratio": [v / uniform for v in first],
                self.inputs.second_mark: [v / queries for v in second],
            }
            if rows_may_not_sum_to_one(self.variants[layer]):
                figures["row_sum"] = [v / queries for v in every]
            if has_sink(self.variants[layer]):
                figures["sink_mass"] = [1.0 - v / queries for v in every]
            if f"zeros_{layer}" in totals:
                *per_head, pairs = totals[f"zeros_{layer}"].tolist()
                figures["exact_zero_fraction"] = [v / pairs for v in per_head]
            if f"gate_{layer}" in totals:
                *per_head, sequences = totals[f"gate_{layer}"].tolist()
                figures["gate_mean"] = [v / sequences for v in per_head]
            result[f"layer_{layer}"] = figures
        return result
