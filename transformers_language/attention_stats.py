"""Attention diagnostics per layer and head, streamed over an evaluation: how heads "do nothing".

A head that wants no update puts its attention on tokens that carry little information (the first token,
[SEP], `.`, `,`), which is what grows outliers in vanilla models. Per layer and head this measures:
  first_token_mass      mean attention probability on the first key position
  delimiter_mass        mean total attention probability on delimiter tokens (see `delimiter_token_ids`)
  exact_zero_fraction   clipped softmax only: share of attended (not masked) query-key pairs whose
                        probability is exactly 0
  gate_mean             mean gate probability sigmoid(G(x)) (gated models; without the fine-tuning scale)
The two masses come from the variants' `key_mass` point: the first-token and delimiter indicators ride
along as extra value channels, so vanilla and gated attention keep the fused kernel. Exact zeros need the
probabilities, which clipped softmax computes anyway.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

DELIMITER_STRINGS = (".", ",")
_BPE_SPACE_MARKS = "Ġ▁"  # byte-level BPE / sentencepiece word-start marks


def delimiter_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens that delimit text (e.g. [CLS], [SEP], <s>, </s>, <pad>) and the tokens of `.` and `,`."""
    skip = {tokenizer.mask_token_id, tokenizer.unk_token_id}
    ids = {i for i in tokenizer.all_special_ids if i not in skip}
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token is not None and token.lstrip(_BPE_SPACE_MARKS) in DELIMITER_STRINGS:
            ids.add(index)
    return sorted(ids)


class AttentionStatistics:
    """Streams the attention diagnostics of every attention layer of `model` (see the module docstring).

    Used like `ActivationStatistics`: `attached()`, `start_batch(input_ids, index)` per batch, `synced()`."""

    def __init__(self, model: nn.Module, delimiter_ids: list[int]):
        self.variants = list(model.attention_variants().values())
        self.delimiter_ids = delimiter_ids
        self._sums: dict[str, torch.Tensor] = {}
        self._batch = 0

    def start_batch(self, input_ids: torch.Tensor, index: int) -> None:
        ids = torch.tensor(self.delimiter_ids, device=input_ids.device)
        marked = torch.zeros(*input_ids.shape, 2, device=input_ids.device)  # (B, S, [first token, delimiter])
        marked[:, 0, 0] = 1.0
        marked[..., 1] = torch.isin(input_ids, ids).float()
        self._batch = input_ids.shape[0]
        for variant in self.variants:
            variant.marked_keys = marked

    def _add(self, key: str, values: torch.Tensor) -> None:
        self._sums[key] = values if key not in self._sums else self._sums[key] + values

    def _mass_hook(self, layer: int):
        def hook(module, args, output):
            mass = output.detach().float().sum(dim=(0, 1))  # (H, 2): summed over sequences and queries
            queries = output.shape[0] * output.shape[1]
            self._add(f"mass_{layer}", torch.cat([mass.t().flatten(), mass.new_full((1,), queries)]).double())

        return hook

    def _zeros_hook(self, layer: int, is_causal: bool):
        def hook(module, args, output):
            batch, _, queries, keys = output.shape  # (B, H, T, S)
            zero = output == 0
            if is_causal:  # only keys a query may attend to count (bottom-right aligned, as with a cache)
                allowed = torch.ones(queries, keys, dtype=torch.bool, device=output.device).tril(keys - queries)
                zero &= allowed
                pairs = batch * allowed.sum()
            else:
                pairs = torch.tensor(batch * queries * keys, device=output.device)
            zeros = zero.sum(dim=(0, 2, 3))
            self._add(f"zeros_{layer}", torch.cat([zeros.double(), pairs.double().view(1)]))

        return hook

    def _gate_hook(self, layer: int):
        def hook(module, args, output):
            probability = output.detach().float() / module.scale  # (1|B, H, 1|T, 1)
            batch = self._batch  # weight by sequences (per-head gates have no batch axis)
            per_head = probability.mean(dim=(0, 2, 3)).double() * batch
            self._add(f"gate_{layer}", torch.cat([per_head, per_head.new_full((1,), batch)]))

        return hook

    @contextmanager
    def attached(self):
        handles = []
        for layer, variant in enumerate(self.variants):
            handles.append(variant.key_mass.register_forward_hook(self._mass_hook(layer)))
            if variant.settings.clipped:
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
        """Per layer ('layer_0', ...), per head figures, after one sum across processes."""
        if not self._sums:  # e.g. skip_attn: no layer computes probabilities
            return {}
        keys = list(self._sums)
        flat = accelerator.reduce(torch.cat([self._sums[k] for k in keys]), "sum").cpu()
        totals, offset = {}, 0
        for key in keys:
            totals[key], offset = flat[offset : offset + self._sums[key].numel()], offset + self._sums[key].numel()
        result = {}
        for layer in range(len(self.variants)):
            figures = {}
            if f"mass_{layer}" in totals:
                *per_head, queries = totals[f"mass_{layer}"].tolist()
                heads = len(per_head) // 2
                figures["first_token_mass"] = [v / queries for v in per_head[:heads]]
                figures["delimiter_mass"] = [v / queries for v in per_head[heads:]]
            if f"zeros_{layer}" in totals:
                *per_head, pairs = totals[f"zeros_{layer}"].tolist()
                figures["exact_zero_fraction"] = [v / pairs for v in per_head]
            if f"gate_{layer}" in totals:
                *per_head, sequences = totals[f"gate_{layer}"].tolist()
                figures["gate_mean"] = [v / sequences for v in per_head]
            if figures:
                result[f"layer_{layer}"] = figures
        return result
