"""The one attention function of this project, plugged into transformers' attention seam.

HF's BERT, OPT, ViT and Llama attention modules compute Q, K, V (Llama: with RoPE applied and the KV cache
updated) and then call
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, mask, ...)`. We register
`attention_variant_forward` under ATTENTION_FUNCTION_NAME in `AttentionInterface` and the boolean SDPA
mask builder under the same name in `AttentionMaskInterface` (a name missing there gets no mask at all).

Each HF attention module carries an `AttentionVariant` child (normaliser, gate, optional learned key/value and
the named points), so their parameters live in the state dict and `from_pretrained` rebuilds them before
loading. A learned key/value (`bias_kv`) is prepended to the keys, so in `scores` and `probs` it is key 0 and
the sequence's keys follow. The points are `nn.Identity` modules where metrics and quantizers attach (hooks or
module swaps):
  keys     the keys as they arrive, per key-value head             (B, S, H_kv, d)
           (Llama: RoPE'd, the key cache; quantized for Llama only, as elsewhere k_proj's output is the same)
  scores   attention scores after scaling, before the mask      (B, H, T, S)
  probs    probabilities after the softmax, before dropout       (B, H, T, S)
  context  gated context before the output projection           (B, T, H * d_head)
  key_mass attention mass on marked keys, before the gate       (B, T, H, K)
Under grouped-query attention (Llama with fewer key-value heads than query heads) each query head reads its
group's keys and values: the fused kernel shares them, the explicit path repeats them, after the learned key/value
(one per key-value head, like a real token's) is prepended; the gate, softmax1's and the sink's logits are per
query head.
`key_mass` runs only while `marked_keys` (B, S, K) holds K indicator columns over the sequence's keys (set
by the attention diagnostics): they ride along as K extra value channels, so the fused kernel computes
probabilities @ indicators together with the context and the fast path stays fast (the learned key of
`bias_kv` gets a zero row).
When nothing needs the weights (plain softmax, nothing attached to `scores` or `probs`, no attention weights
asked for), attention runs through torch's fused `scaled_dot_product_attention` instead, except in half
precision on a CPU, where that kernel is the slower one.

Attention weights are asked for by `output_attentions=True` per call, by `config.output_attentions`, or by
`generate(..., output_attentions=True)`. HF records them with a hook on the attention module while its
output collector holds an "attentions" entry; OPT's attention module swallows the per-call argument and the
config flag never reaches the function, so the function reads that collector (`weights_requested`) and runs
the explicit path whenever it is recording. The weights are (B, H, T, S) over every key the layer attends to:
with a static cache S is the cache length (slots not yet written get weight 0), as in HF's eager path.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama.modeling_llama import repeat_kv
from transformers.utils.output_capturing import _active_collector

from .attention_config import AttentionConfig
from .gates import AttentionGate
from .prepended_keys import BiasKeyValue, prepend_key, with_null_key
from .softmax import build_softmax

ATTENTION_FUNCTION_NAME = "attention_variant"


def weights_requested(module: nn.Module) -> bool:
    """True while HF records attention weights (per call, through the config, in `generate`): its output
    collector then holds an "attentions" entry. (Compile-safe: HF's collector is a global under dynamo.)"""
    collected = _active_collector.get()
    if collected is not None:
        return "attentions" in collected
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def is_attached(point: nn.Module) -> bool:
    """A point is in use when something hooks it or it was swapped for another module (e.g. a quantizer),
    unless that module says it passes values through unchanged right now (`is_identity`, e.g. a quantizer
    that is off), so the fused path, and with it the float model's exact numbers, stays."""
    swapped = type(point) is not nn.Identity and not getattr(point, "is_identity", False)
    return swapped or bool(point._forward_hooks) or bool(point._forward_pre_hooks)


def fused_kernel_is_slower(query: torch.Tensor) -> bool:
    """On a CPU, torch's fused attention kernel is 2-3x slower in bf16 / fp16 than the explicit matmuls (forward
    and backward of OPT-small's attention, AVX512-BF16, torch 2.14: 58 ms against 19 ms; in fp32 the two
    are equal), so half-precision attention on a CPU takes the explicit path."""
    return query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)


class AttentionVariant(nn.Module):
    """Normaliser, optional gate, optional learned key/value and the named points of one self-attention
    layer."""

    def __init__(
        self, config: AttentionConfig, num_heads: int, head_dim: int, is_causal: bool, num_kv_heads: int | None = None
    ):
        super().__init__()
        self.settings = config
        self.is_causal = is_causal
        self.softmax = build_softmax(config, num_heads)
        self.gate = AttentionGate(config, num_heads, head_dim, is_causal) if config.gated else None
        self.bias_kv = BiasKeyValue(num_kv_heads or num_heads, head_dim) if config.bias_kv else None
        self.head_rotation: nn.Module | None = None  # QuaRot's online transform of queries and keys (ptq/rotation.py)
        self.keys = nn.Identity()
        self.scores = nn.Identity()
        self.probs = nn.Identity()
        self.context = nn.Identity()
        self.key_mass = nn.Identity()
        self.marked_keys: torch.Tensor | None = None

    def uses_fused_path(self, output_attentions: bool = False, query: torch.Tensor | None = None) -> bool:
        """Whether attention runs through torch's fused kernel (for `query`, when given: not in half precision
        on a CPU, see `fused_kernel_is_slower`)."""
        if query is not None and fused_kernel_is_slower(query):
            return False
        return self.softmax.fused and not (output_attentions or is_attached(self.scores) or is_attached(self.probs))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        scaling: float,
        dropout: float,
        is_causal: bool,
        gate_input: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, H, T, d) query and (B, H_kv, S, d) key/value (H_kv divides H) -> context (B, T, H, d), probabilities
        or None."""
        batch, num_heads, q_length, head_dim = query.shape
        if self.head_rotation is not None:  # the same orthogonal map on queries and keys leaves the scores alone
            query, key = self.head_rotation(query), self.head_rotation(key)
        key = self.keys(key.transpose(1, 2)).transpose(1, 2)  # token-major, as padding masks and caches see it
        if self.settings.skip_attn:
            context = query.new_zeros(batch, q_length, num_heads * head_dim)
            return self.context(context).view(batch, q_length, num_heads, head_dim), None

        gate = None
        if self.gate is not None:
            if self.gate.needs_input and gate_input is None:
                raise ValueError(
                    "This attention gate needs the block input: attach variants with install_attention_variant(), "
                    "which also registers the hook that passes it."
                )
            gate = self.gate(gate_input, attention_mask, kv_length=key.shape[2])

        fused = self.uses_fused_path(output_attentions, query)
        null_logit = self.softmax.null_logit() if fused else None  # softmax1 / learned sink in fused form
        # Same convention as HF's SDPA path: upper-left causal, so query i sees keys 0..i (a static-cache prefill
        # has more keys than queries; the unwritten slots are masked, and explicit weights keep one column per
        # slot). The fused kernel takes is_causal itself unless keys are prepended.
        implicit_causal = attention_mask is None and is_causal and q_length > 1
        if implicit_causal and (self.bias_kv is not None or null_logit is not None or not fused):
            attention_mask = torch.ones(q_length, key.shape[2], dtype=torch.bool, device=query.device).tril()
            is_causal = False

        marked = self.marked_keys
        if self.bias_kv is not None:
            key, value, attention_mask, marked = prepend_key(
                key, value, attention_mask, marked, *self.bias_kv.rows(batch, key.dtype)
            )
        # Grouped-query attention: each query head reads its group's keys. The fused kernel shares them itself
        # (HF's SDPA path reads `num_key_value_groups`); per-head null keys, marked keys and the explicit path
        # need them repeated.
        groups = num_heads // key.shape[1]
        if groups > 1 and (not fused or null_logit is not None or marked is not None):
            key, value, groups = repeat_kv(key, groups), repeat_kv(value, groups), 1
        self.num_key_value_groups = groups
        if null_logit is not None:
            query, key, value, null_key, null_value = with_null_key(query, key, value, null_logit, scaling)
            key, value, attention_mask, marked = prepend_key(key, value, attention_mask, marked, null_key, null_value)
        width = value.shape[-1]  # the context's channels before the marked keys' columns
        if marked is not None:  # (B, S, K) indicators become K extra value channels of every head
            extra = marked.to(value.dtype).unsqueeze(1).expand(batch, num_heads, -1, -1)
            value = torch.cat([value, extra], dim=-1)

        probs = None
        if fused:
            if marked is not None:
                # Zero channels on queries and keys leave the scores exactly as they are, and equal query and
                # value widths keep torch on its flash kernel (unequal widths fall back to a 3x slower path).
                query = nn.functional.pad(query, (0, marked.shape[-1]))
                key = nn.functional.pad(key, (0, marked.shape[-1]))
            context, _ = sdpa_attention_forward(
                self, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal
            )  # (B, T, H, d)
            if marked is not None:
                self.key_mass(context[..., width:])
            context = context[..., :head_dim]
            if gate is not None:
                context = context * gate.transpose(1, 2)
        else:
            # Scale the (B, H, T, d) query, not the (B, H, T, S) scores: fewer values, and none at all for OPT,
            # which scales its query projection itself and passes 1.0.
            scaled_query = query if scaling == 1.0 else query * scaling
            scores = self.scores(torch.matmul(scaled_query, key.transpose(-1, -2)))
            allowed = None
            if attention_mask is not None:
                if attention_mask.dtype == torch.bool:
                    allowed = attention_mask
                    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
                else:
                    allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
                    scores = scores + attention_mask
            probs = self.probs(self.softmax(scores, allowed))
            weights = nn.functional.dropout(probs, p=dropout, training=dropout > 0)
            context = torch.matmul(weights, value)  # (B, H, T, d)
            if marked is not None:
                self.key_mass(context[..., width:].transpose(1, 2))
                context = context[..., :head_dim]
            if gate is not None:
                context = context * gate
            context = context.transpose(1, 2)
        context = self.context(context.reshape(batch, q_length, num_heads * head_dim))
        return context.view(batch, q_length, num_heads, head_dim), probs


def attention_variant_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    gate_input: torch.Tensor | None = None,
    is_causal: bool | None = None,
    output_attentions: bool = False,
    **_unused,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF attention-interface entry: dispatch to the calling module's `attention_variant`."""
    variant = getattr(module, "attention_variant", None)
    if variant is None:
        raise ValueError(
            f"{type(module).__name__} has no attention_variant: load the model with this project's class of its "
            "family (transformers_language.models.model_classes, e.g. LlamaForCausalLMWithVariants) instead of the "
            "stock HF class."
        )
    return variant(
        query,
        key,
        value,
        attention_mask,
        scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
        dropout=dropout,
        is_causal=getattr(module, "is_causal", False) if is_causal is None else is_causal,
        gate_input=gate_input,
        output_attentions=output_attentions or weights_requested(module),
    )


def _pass_gate_input(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: hand the attention block's input (BERT passes it positionally, OPT by keyword)
    to the attention function, which HF calls without it."""
    kwargs["gate_input"] = args[0] if args else kwargs["hidden_states"]
    return args, kwargs


def install_attention_variant(
    attention: nn.Module,
    config: AttentionConfig,
    num_heads: int,
    head_dim: int,
    is_causal: bool,
    num_kv_heads: int | None = None,
) -> AttentionVariant:
    """Attach an `AttentionVariant` as `attention.attention_variant` (and the gate-input hook if needed)."""
    variant = AttentionVariant(config, num_heads, head_dim, is_causal, num_kv_heads)
    attention.attention_variant = variant
    if variant.gate is not None and variant.gate.needs_input:
        attention.register_forward_pre_hook(_pass_gate_input, with_kwargs=True)
    return variant


AttentionInterface.register(ATTENTION_FUNCTION_NAME, attention_variant_forward)
AttentionMaskInterface.register(ATTENTION_FUNCTION_NAME, sdpa_mask)
