"""Which tokens of the batch in flight are real: padding never enters a range, a statistic or a loss.

A padded batch (sentences of different lengths) carries an attention mask (B, T). Code that runs the model on
such a batch opens `real_tokens(mask)` around the forward; everything that observes an activation inside it
(range estimators, channel statistics, the evaluation probes) keeps the values of real tokens only:

  (B, T, C) or (B * T, C)   hidden states, a Linear's output, the attention context: the rows of real tokens
  (B, H, T, S)              attention scores and probabilities: the rows of real queries, and of each row the
                            keys that are real (S - T keys prepended by the model, a learned key or a null key,
                            are real)

Outside a scope, or with a mask of all ones, every value counts and nothing is copied. The mask is a context
variable, so it needs no change to any forward signature and stays with the thread that set it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_MASK: ContextVar[torch.Tensor | None] = ContextVar("real_token_mask", default=None)


@contextmanager
def real_tokens(mask: torch.Tensor | None) -> Iterator[None]:
    """Within the scope, `mask` (B, T; nonzero at real tokens) says which tokens count; None or all ones: all."""
    value = None if mask is None or bool(mask.all()) else mask.bool()
    token = _MASK.set(value)
    try:
        yield
    finally:
        _MASK.reset(token)


def current_mask() -> torch.Tensor | None:
    """The (B, T) bool mask of the scope, or None when every token counts."""
    return _MASK.get()


def _covers(x: torch.Tensor, mask: torch.Tensor) -> str | None:
    """How `x` lines up with the (B, T) mask: 'tokens' ((B, T, ...) or (B * T, ...)), 'attention' ((B, H, T, S)
    with S >= T), or None (another tensor: a weight, or a batch the mask is not of)."""
    batch, length = mask.shape
    if x.dim() == 4 and x.shape[0] == batch and x.shape[2] == length and x.shape[3] >= length:
        return "attention"
    if x.dim() >= 3 and x.shape[:2] == (batch, length):
        return "tokens"
    if x.dim() == 2 and x.shape[0] == batch * length:
        return "tokens"
    return None


def _scope(x: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """The scope's (B, T) mask and how `x` lines up with it (`_covers`); (None, None) outside a scope."""
    mask = _MASK.get()
    return mask, None if mask is None else _covers(x, mask)


def _key_mask(mask: torch.Tensor, keys: int) -> torch.Tensor:
    """(B, S) real keys: the keys prepended before the sequence's are real."""
    prepended = keys - mask.shape[1]
    return torch.cat([mask.new_ones(mask.shape[0], prepended), mask], dim=1) if prepended else mask


def _real_pairs(mask: torch.Tensor, keys: int) -> torch.Tensor:
    """(B, 1, T, S) real query-key pairs of an attention map with `keys` keys."""
    return mask[:, None, :, None] & _key_mask(mask, keys)[:, None, None, :]


def real_values(x: torch.Tensor) -> torch.Tensor:
    """The values of `x` at real tokens: (N, C) rows for token tensors, a flat vector for attention maps, `x`
    itself outside a scope or for a tensor the mask does not describe."""
    mask, layout = _scope(x)
    if layout is None:
        return x
    if layout == "attention":
        return x[_real_pairs(mask, x.shape[3]).expand_as(x)]
    if x.dim() == 2:
        return x[mask.flatten()]
    return x[mask]


def real_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows over the last dimension at real tokens, for statistics per row (a token's extremes): token tensors
    as `real_values`; attention maps as the (N, H, S) rows of real queries, where each padded key takes the
    row's largest real value, which leaves every row's minimum and maximum as they are."""
    mask, layout = _scope(x)
    if layout != "attention":
        return real_values(x)
    rows = x.transpose(1, 2)[mask]  # (N, H, S)
    keys = _key_mask(mask, x.shape[3])[:, None, :].expand(-1, mask.shape[1], -1)[mask]  # (N, S)
    keys = keys[:, None, :].expand_as(rows)
    largest = rows.masked_fill(~keys, float("-inf")).amax(dim=-1, keepdim=True)
    return torch.where(keys, rows, largest)


def real_extremes(x: torch.Tensor) -> torch.Tensor:
    """The minimum and maximum of each row over the last dimension at real tokens, as (N, 2) rows: the extremes of
    `real_rows(x)` without copying its rows (a boolean index of a (B, T, C) activation costs as much as a clone;
    of the (B, T) row extremes, nothing; an attention map's padded keys are masked by value, five times faster
    than copying its real rows). `x` itself outside a scope or for a tensor the mask does not describe."""
    mask, layout = _scope(x)
    if layout is None:
        return x
    if layout == "attention":  # each row's extremes over its real keys, then the rows of real queries
        padded_keys = ~_key_mask(mask, x.shape[3])[:, None, None, :]
        lows = x.masked_fill(padded_keys, float("inf")).amin(dim=-1).transpose(1, 2)[mask]
        highs = x.masked_fill(padded_keys, float("-inf")).amax(dim=-1).transpose(1, 2)[mask]
        return torch.stack((lows, highs), dim=-1).reshape(-1, 2)
    real = mask.flatten() if x.dim() == 2 else mask
    lows, highs = x.amin(dim=-1)[real], x.amax(dim=-1)[real]
    return torch.stack((lows, highs), dim=-1).reshape(-1, 2)


def real_mask(x: torch.Tensor) -> torch.Tensor | None:
    """A bool mask that broadcasts against `x`, True at real tokens (real query-key pairs of attention maps), or None
    outside a scope or for a tensor the mask does not describe. `x.masked_fill_(~mask, 0)` then zeroes the padding in
    place, so a sum or a maximum of non-negative values reads real tokens without the copy `real_values` makes (and a
    padded position's inf, say a masked score, never turns into a NaN as a multiplication by 0 would)."""
    mask, layout = _scope(x)
    if layout is None:
        return None
    if layout == "attention":
        return _real_pairs(mask, x.shape[3])
    if x.dim() == 2:
        return mask.reshape(-1, 1)
    return mask.reshape(*mask.shape, *([1] * (x.dim() - 2)))


def token_weights(batch: int, length: int, device) -> torch.Tensor | None:
    """(B, T) float weights of the scope's real tokens (1.0 real, 0.0 padding), None when all count."""
    mask = _MASK.get()
    if mask is None or mask.shape != (batch, length):
        return None
    return mask.to(device=device, dtype=torch.float32)
