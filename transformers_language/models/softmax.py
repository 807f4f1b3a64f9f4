"""The attention normalisers (what `--attn_softmax` names), in a registry keyed by idea, and the clip.

Each maps masked scores (B, H, T, S) to attention weights over the S keys:
  vanilla   softmax
  softmax1  exp(s_i) / (1 + sum_j exp(s_j)): softmax with an extra key of logit 0 and value 0 (Miller 2023)
  sink      exp(s_i) / (exp(b_h) + sum_j exp(s_j)): that extra key with a learned logit b_h per head (starts at 0)
  softpick  relu(exp(s_i) - 1) / (sum_j |exp(s_j) - 1| + eps) over the keys a query may attend (Zuhri et al.)
  sigmoid   sigmoid(s_i + b) with b = -log T_train, no normalisation across keys (Ramapuram et al.)
Clipped softmax (Bondarenko et al. 2023) is clip((zeta - gamma) * p + gamma, 0, 1) on the probabilities p of
a clippable normaliser (vanilla, softmax1, sink): 'clipped(GAMMA:ZETA)' clips softmax, 'clipped_NAME(GAMMA:ZETA)'
clips NAME. With gamma < 0 a head can give exact zeros without pushing its scores to extremes. Everything is
computed in float32 (float64 when given float64) and cast back, so half-precision training stays stable.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import torch
from torch import nn
from transformers import initialization as init

from ..errors import UsageError

SOFTPICK_EPS = 1e-6
SOFTMAX_VARIANTS: dict[str, type[Normaliser]] = {}


def register_softmax(name: str):
    def decorator(cls):
        SOFTMAX_VARIANTS[name] = cls
        cls.name = name
        return cls

    return decorator


def _wide(scores: torch.Tensor) -> torch.Tensor:
    """The scores in the precision the normalisers compute in: float32, or float64 when given float64."""
    return scores if scores.dtype == torch.float64 else scores.float()


def clipped_softmax(scores: torch.Tensor, gamma: float, zeta: float, dim: int = -1) -> torch.Tensor:
    """clip((zeta - gamma) * softmax(scores) + gamma, 0, 1); rows are not renormalised."""
    return _ClippedSoftmax.apply(scores, gamma, zeta, dim)


class _ClippedSoftmax(torch.autograd.Function):
    """Softmax, affine map and clip as one autograd node.

    Autograd's softmax -> mul -> add -> clamp chain allocates and keeps extra (B, H, T, S) tensors and is ~3x
    slower on CPU; here the affine map and clip run in place and the backward is one masked softmax backward.
    The gradient mask is 0 < y < 1: entries clipped to exactly 0 or 1 pass no gradient (entries that reach
    0 or 1 unclipped are p = 0 or one-hot rows, where the softmax gradient is zero anyway).
    """

    @staticmethod
    def forward(ctx, scores, gamma: float, zeta: float, dim: int):
        probs = torch.softmax(_wide(scores), dim=dim)
        clipped = probs.mul(zeta - gamma).add_(gamma).clamp_(0.0, 1.0)
        ctx.save_for_backward(probs, clipped)
        ctx.scale, ctx.dim, ctx.input_dtype = zeta - gamma, dim, scores.dtype
        return clipped.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        probs, clipped = ctx.saved_tensors
        inside = (clipped > 0) & (clipped < 1)
        grad_probs = torch.where(inside, grad_output.to(probs.dtype), 0.0)
        # The fused kernel computes probs * (g - sum(g * probs)), the softmax backward.
        grad_scores = torch._softmax_backward_data(grad_probs, probs, ctx.dim, probs.dtype).mul_(ctx.scale)
        return grad_scores.to(ctx.input_dtype), None, None, None


def softmax_with_sink(scores: torch.Tensor, sink_logit: torch.Tensor | float) -> torch.Tensor:
    """exp(s_i) / (exp(sink_logit) + sum_j exp(s_j)); `sink_logit` broadcasts against (..., 1)."""
    scores = _wide(scores)
    sink_logit = torch.as_tensor(sink_logit, device=scores.device).to(scores.dtype)
    total = torch.logaddexp(torch.logsumexp(scores, dim=-1, keepdim=True), sink_logit)
    return torch.exp(scores - total)


def softpick(scores: torch.Tensor, allowed: torch.Tensor | None, eps: float = SOFTPICK_EPS) -> torch.Tensor:
    """relu(e^s - 1) / (sum over allowed keys of |e^s - 1| + eps), with numerator and denominator both
    multiplied by e^-m, m = max(0, row max), so no exponential overflows; masked keys count nowhere."""
    scores = _wide(scores)
    shift = scores.detach().amax(dim=-1, keepdim=True).clamp_min(0.0)
    floor = torch.exp(-shift)
    shifted = torch.exp(scores - shift) - floor  # e^-m (e^s - 1)
    if allowed is not None:
        shifted = shifted.masked_fill(~allowed, 0.0)
    return torch.relu(shifted) / (shifted.abs().sum(dim=-1, keepdim=True) + eps * floor)


class Normaliser(nn.Module):
    """Masked scores -> attention weights, clipped when the config says so.

    Class facts the rest of the code reads: `clippable` (its weights are probabilities the clip may stretch),
    `sink` (rows sum to less than 1, the rest going to an implicit null key of logit `null_logit()`),
    `fused_form` (torch's fused kernel can compute it unclipped: plain, or with that null key), `exact_zeros`
    (it can give exact zeros unclipped), `needs_seq_length` (it reads T_train, fixed when the model is built)."""

    name: str
    form: str
    clippable = False
    sink = False
    fused_form = False
    exact_zeros = False
    needs_seq_length = False

    def __init__(self, config, num_heads: int):
        super().__init__()
        self.clip = (config.gamma, config.zeta) if config.clipped else None

    @property
    def fused(self) -> bool:
        """Whether torch's fused attention kernel computes these weights (the clip needs them explicitly)."""
        return self.fused_form and self.clip is None

    def null_logit(self) -> torch.Tensor | float | None:
        """The implicit null key's logit (per head, or one number) for the fused form; None: no null key."""
        return None

    def forward(self, scores: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """scores (B, H, T, S), masked entries at the dtype's minimum; allowed: boolean, True = may attend.
        Subclasses define `weights(scores, allowed)`, the unclipped weights in float32 (float64 if given)."""
        probs = self.weights(scores, allowed)
        if self.clip is not None:
            gamma, zeta = self.clip
            probs = probs.mul(zeta - gamma).add(gamma).clamp(0.0, 1.0)
        return probs.to(scores.dtype)

    def extra_repr(self) -> str:
        return "" if self.clip is None else f"gamma={self.clip[0]}, zeta={self.clip[1]}"


@register_softmax("vanilla")
class Softmax(Normaliser):
    form = "'vanilla'"
    clippable = fused_form = True

    def weights(self, scores, allowed):
        return torch.softmax(_wide(scores), dim=-1)

    def forward(self, scores: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        if self.clip is not None:  # one autograd node instead of softmax -> mul -> add -> clamp
            return clipped_softmax(scores, *self.clip)
        return self.weights(scores, allowed).to(scores.dtype)


@register_softmax("softmax1")
class Softmax1(Normaliser):
    form = "'softmax1'"
    clippable = sink = fused_form = True

    def weights(self, scores, allowed):
        return softmax_with_sink(scores, 0.0)

    def null_logit(self):
        return 0.0


@register_softmax("sink")
class LearnedSink(Normaliser):
    form = "'sink' (a learned logit per head)"
    clippable = sink = fused_form = True

    def __init__(self, config, num_heads: int):
        super().__init__(config, num_heads)
        self.sink_logit = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        init.zeros_(self.sink_logit)  # starts as softmax1; HF's guarded init keeps a loaded value

    def weights(self, scores, allowed):
        return softmax_with_sink(scores, self.sink_logit.view(-1, 1, 1))

    def null_logit(self):
        return self.sink_logit


@register_softmax("softpick")
class Softpick(Normaliser):
    form = "'softpick'"
    exact_zeros = True

    def weights(self, scores, allowed):
        return softpick(scores, allowed)


@register_softmax("sigmoid")
class SigmoidAttention(Normaliser):
    form = "'sigmoid' (bias -log T_train)"
    needs_seq_length = True

    def __init__(self, config, num_heads: int):
        super().__init__(config, num_heads)
        self.bias = -math.log(config.train_seq_length)

    def weights(self, scores, allowed):
        return torch.sigmoid(_wide(scores) + self.bias)

    def extra_repr(self) -> str:
        return f"bias={self.bias:.4f}"


class SoftmaxSpec(NamedTuple):
    """What an `--attn_softmax` text says: the normaliser, and (gamma, zeta) when it is clipped."""

    normaliser: str
    clip: tuple[float, float] | None


_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_CLIPPED = re.compile(rf"^clipped(?:_(\w+))?\(\s*({_NUMBER})\s*:\s*({_NUMBER})\s*\)$")
CLIPPABLE = [name for name, cls in SOFTMAX_VARIANTS.items() if cls.clippable]
SOFTMAX_FORMS = (
    " or ".join(cls.form for cls in SOFTMAX_VARIANTS.values())
    + ", or clipped: 'clipped(GAMMA:ZETA)' with GAMMA <= 0 <= 1 <= ZETA (e.g. 'clipped(-.025:1)'), "
    + " or ".join(f"'clipped_{name}(GAMMA:ZETA)'" for name in CLIPPABLE if name != "vanilla")
)


@functools.lru_cache(maxsize=64)  # configs ask on every attention forward
def softmax_variant(method: str) -> SoftmaxSpec:
    """The registered normaliser `method` names, with its clip."""
    text = method.strip()
    if text in SOFTMAX_VARIANTS:
        return SoftmaxSpec(text, None)
    match = _CLIPPED.match(text)
    if match is None:
        raise UsageError(f"Unknown softmax method {method!r}; accepted forms: {SOFTMAX_FORMS}.")
    base, gamma, zeta = match.group(1) or "vanilla", float(match.group(2)), float(match.group(3))
    if base not in CLIPPABLE or (base == "vanilla" and match.group(1)):
        raise UsageError(f"{method!r} clips {base!r}, which is not clippable; clippable: {', '.join(CLIPPABLE)}.")
    if not gamma <= 0.0:
        raise UsageError(f"Clipped softmax needs gamma <= 0, got gamma={gamma} in {text!r}.")
    if not zeta >= 1.0:
        raise UsageError(f"Clipped softmax needs zeta >= 1, got zeta={zeta} in {text!r}.")
    return SoftmaxSpec(base, (gamma, zeta))


def build_softmax(config, num_heads: int) -> Normaliser:
    """The normaliser module of an `AttentionConfig` (not imported here: attention_config.py imports this
    registry)."""
    return SOFTMAX_VARIANTS[config.normaliser](config, num_heads)
