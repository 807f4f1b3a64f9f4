"""Keys prepended to a head's keys: the learned key and value of the explicit attention bias, and the null key
that gives softmax1 and the learned sink their fused form.

Both go in front of the sequence's keys (key 0 in `scores` and `probs`), every query may attend to them, and
they are none of the sequence's marked keys (the attention diagnostics give them zero rows).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

BIAS_KV_INIT_STD = 0.02  # the learned key/value's init: BERT's initializer_range
NULL_CHANNELS = 8  # channels added for the fused null key: kernels keep their fast path at widths divisible by 8


class BiasKeyValue(nn.Module):
    """A learned key and value per key-value head (Sun et al. 2024, "explicit attention bias"), prepended to the
    keys and values of every sequence: a head can park its attention there instead of on a real token. Under
    grouped-query attention the heads of a group share it, as they share a real token's key and value: it is
    one more slot of the KV cache's layout, and the extra parameters stay 2 x H_kv x d_head."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.key = nn.Parameter(torch.empty(num_heads, 1, head_dim))
        self.value = nn.Parameter(torch.empty(num_heads, 1, head_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        init.normal_(self.key, 0.0, BIAS_KV_INIT_STD)  # HF's guarded init: a loaded value is kept
        init.normal_(self.value, 0.0, BIAS_KV_INIT_STD)

    def rows(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned key and value as (B, H, 1, d) rows."""
        return self.key.to(dtype).expand(batch, -1, -1, -1), self.value.to(dtype).expand(batch, -1, -1, -1)


def prepend_key(key, value, attention_mask, marked, new_key, new_value):
    """One more key (B, H, 1, d) and value row in front of the keys; every query may attend to it, and it is
    none of the sequence's marked keys."""
    key, value = torch.cat([new_key, key], dim=2), torch.cat([new_value, value], dim=2)
    if attention_mask is not None:
        fill = True if attention_mask.dtype == torch.bool else 0.0
        attention_mask = nn.functional.pad(attention_mask, (1, 0), value=fill)
    if marked is not None:
        marked = nn.functional.pad(marked, (0, 0, 1, 0))
    return key, value, attention_mask, marked


def with_null_key(query, key, value, logit, scaling: float):
    """The fused form of softmax1 / a learned sink: a key of score `logit` (per head) for every query and value 0.
    The query gets a constant-1 channel and that key `logit / scaling` in it (the sequence's keys 0), so the
    kernel's scaled dot product gives exactly `logit`; the value gets zero channels to keep the widths equal.
    Returns the widened query, keys and values, and the null key and value rows to prepend."""
    batch, heads, queries, _ = query.shape
    pad = NULL_CHANNELS - 1
    ones = query.new_ones(batch, heads, queries, 1)
    query = torch.cat([query, ones, ones.new_zeros(batch, heads, queries, pad)], dim=-1)
    key = nn.functional.pad(key, (0, NULL_CHANNELS))
    value = nn.functional.pad(value, (0, NULL_CHANNELS))
    logit = torch.as_tensor(logit, dtype=key.dtype, device=key.device).expand(heads) / scaling
    null_key = nn.functional.pad(logit.view(1, heads, 1, 1), (key.shape[-1] - NULL_CHANNELS, pad))
    null_value = value.new_zeros(batch, heads, 1, value.shape[-1])
    return query, key, value, null_key.expand(batch, -1, -1, -1), null_value
