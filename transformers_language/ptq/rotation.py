"""QuaRot's rotations (Ashkboos et al., NeurIPS 2024) of a pre-norm model (OPT pre-LN, Llama), in place and
before quantization (`--quarot`): the float function is unchanged, and the activations that get quantized have
their outliers spread over all channels.

For an orthogonal M, a tensor x that becomes x M is written by Linears whose weights become M^T W (bias M^T b)
and read by Linears whose weights become W M; a table's rows become E M. The rotations (the family's
`Wiring.rotation` names the modules):
- R1, the residual stream: M = Q, a random Hadamard matrix diag(signs) H / sqrt(d) (quantization/hadamard.py,
  seeded by `--rotation_seed`). It commutes with a weightless RMSNorm, so every norm first hands its weight (and
  a LayerNorm its bias) to its readers and keeps weight 1; a LayerNorm also subtracts the mean, which does not
  commute, so OPT's residual stream is first made zero-mean (every writer and table centred over the hidden
  channels) and its LayerNorms become RMSNorms, equal on zero-mean inputs. The head is untied from the table.
  Attention gates read the block input in per-head slices, which no fold can rotate: a gate gets the block input
  back at run time, x M^T times the norm's weight plus its bias (gates stay in floating point).
- R4, the FFN's inner activation: an online Hadamard transform (x H^T / sqrt(n)) before the output projection,
  whose weight takes H^T; the quantizer of that input sees the transformed values.
- R2 / R3, per head (d_head Hadamard): values into the value and output projections, and queries and keys
  into their projections (OPT) or at run time after RoPE (Llama, where the key cache holds them). A learned
  key / value (`bias_kv`) turns with them. Values stay as they are under an elementwise output gate (it scales
  context channels one by one).
BERT (post-LN) and ViT take no rotation: refused before any weight loads.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from quantization.hadamard import hadamard_matrix, hadamard_transform, random_hadamard, split_order
from quantization.sums import hidden_from_sums
from quantization.transforms import fold_into_linear

from ..errors import UsageError
from ..families import Family
from ..models.gates import ElementwiseGate
from ..models.norms import is_rms_norm


class OnlineHadamard(nn.Module):
    """x -> x H^T / sqrt(n) over the last dimension (orthonormal; quantization/hadamard.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with hidden_from_sums():  # the butterfly's additions are no residual sum of the model
            return hadamard_transform(x)


def _sizes(config) -> dict[str, int]:
    heads = config.num_attention_heads
    return {
        "hidden size": config.hidden_size,
        "FFN width": getattr(config, "ffn_dim", None) or config.intermediate_size,
        "head size": getattr(config, "head_dim", None) or config.hidden_size // heads,
    }


def check_rotatable(family: Family, config) -> None:
    """One clear error, before any weights load, for a model the rotations do not fit."""
    if family.wiring.rotation is None:
        raise UsageError(
            f"--quarot rotates the residual stream of a pre-norm model (OPT pre-LN, Llama); {family.model_type} has "
            "no rotation sites in its wiring (BERT's post-LN residual passes through its LayerNorms); drop --quarot."
        )
    requirement = family.wiring.transform_requires
    if requirement is not None and getattr(config, requirement[0], None) != requirement[1]:
        raise UsageError(
            f"--quarot needs {requirement[0]}={requirement[1]} (a pre-norm model); this checkpoint has "
            f"{getattr(config, requirement[0], None)}; drop --quarot."
        )
    projection = getattr(config, "word_embed_proj_dim", None)
    if projection is not None and projection != config.hidden_size:
        raise UsageError(
            f"--quarot: word_embed_proj_dim {projection} != hidden_size {config.hidden_size} (project_in / "
            "project_out layers) is not wired; drop --quarot."
        )
    for what, size in _sizes(config).items():
        try:
            split_order(size)
        except ValueError as error:
            raise UsageError(f"--quarot: the {what} {size} has no Hadamard transform here ({error})") from error


def _linear(model: nn.Module, path: str) -> nn.Linear:
    return model.get_submodule(path)


def _turn_rows(rows: torch.Tensor, m: torch.Tensor) -> None:
    """Rows that are vectors of the rotated space (a table, a learned key or value) become rows @ m (fp64 math)."""
    rows.copy_((rows.double() @ m).to(rows.dtype))


def _write(linear: nn.Linear, m: torch.Tensor, rows: slice = slice(None)) -> None:
    """The Linear's output rows `rows` become (output @ m): W -> m^T W, b -> m^T b on those rows (fp64 math)."""
    weight = linear.weight[rows]
    weight.copy_((m.T @ weight.double()).to(weight.dtype))
    if linear.bias is not None:
        bias = linear.bias[rows]
        bias.copy_((m.T @ bias.double()).to(bias.dtype))


def _read(linear: nn.Linear, m: torch.Tensor, columns: slice = slice(None)) -> None:
    """The Linear reads (input @ m) on input channels `columns`: W -> W m."""
    _turn_rows(linear.weight[:, columns], m)


def _heads(count: int, size: int) -> list[slice]:
    return [slice(h * size, (h + 1) * size) for h in range(count)]


def _untie_head(model: nn.Module) -> nn.Linear:
    head = model.get_submodule(model.family.head_projection)
    if any(head.weight is module.weight for module in model.modules() if isinstance(module, nn.Embedding)):
        head.weight = nn.Parameter(head.weight.detach().clone())
    return head


def _centre_writers(model: nn.Module, sites, layers: list[str]) -> None:
    """Make every vector added to the residual stream zero-mean over the hidden channels."""
    for path in sites.embeddings:
        table = model.get_submodule(path).weight
        table.sub_(table.mean(dim=1, keepdim=True))
    for layer in layers:
        for writer in sites.writers:
            linear = _linear(model, f"{layer}.{writer}")
            linear.weight.sub_(linear.weight.mean(dim=0, keepdim=True))
            if linear.bias is not None:
                linear.bias.sub_(linear.bias.mean())


def _hand_over_norm(model: nn.Module, norm_path: str, readers: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm's weight (and bias) into its readers; the norm becomes a weightless RMSNorm. Returns (gamma,
    beta) for the readers that cannot take them (gates)."""
    norm = model.get_submodule(norm_path)
    gamma = norm.weight.detach().double().clone()
    bias = getattr(norm, "bias", None)
    beta = torch.zeros_like(gamma) if bias is None else bias.detach().double().clone()
    for linear in readers:
        if linear.bias is None and bool(beta.ne(0).any()):  # a bias-free reader (OPT's LM head) takes W beta
            linear.bias = nn.Parameter(linear.weight.new_zeros(linear.out_features))
        fold_into_linear(linear, gamma, beta)  # it reads the normalised input: W diag(gamma), b + W beta
    if is_rms_norm(norm):
        norm.weight.fill_(1.0)
    else:
        rms = LlamaRMSNorm(gamma.numel(), eps=norm.eps).to(device=norm.weight.device, dtype=norm.weight.dtype)
        model.set_submodule(norm_path, rms)
    return gamma, beta


def _restore_gate_input(gate: nn.Module, q: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """The gate reads the block input as before the rotation: x Q^T * gamma + beta."""
    back = (q.T * gamma).float()  # x Q^T diag(gamma) = x (Q^T diag(gamma))
    shift = beta.float()

    def hook(module, args, kwargs):
        x = args[0]
        with hidden_from_sums():  # an addition of hidden width that is no residual sum of the model
            restored = (x.float() @ back.to(x.device) + shift.to(x.device)).to(x.dtype)
        return (restored, *args[1:]), kwargs

    gate.register_forward_pre_hook(hook, with_kwargs=True)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> dict:
    """Apply R1, R2, R3 and R4 to the float `model` in place (see the module docstring); returns the record."""
    check_rotatable(model.family, model.config)
    wiring, sites = model.family.wiring, model.family.wiring.rotation
    sizes = _sizes(model.config)
    hidden, ffn, head_size = sizes["hidden size"], sizes["FFN width"], sizes["head size"]
    layers = [f"{model.layers_path}.{index}" for index in range(len(model.transformer_layers()))]
    head = _untie_head(model)
    final_norm = wiring.final_layernorm.format(last=len(layers) - 1)
    norms = [
        (f"{layer}.{r.norm}", [f"{layer}.{p}" for p in r.linears], r, layer)
        for layer in layers
        for r in wiring.norm_readers
    ]
    norms.append((final_norm, [model.family.head_projection], None, None))
    if not is_rms_norm(model.get_submodule(final_norm)):
        _centre_writers(model, sites, layers)

    q = random_hadamard(hidden, torch.Generator().manual_seed(seed)).to(head.weight.device)
    for norm_path, reader_paths, readers, layer in norms:
        linears = [_linear(model, path) for path in reader_paths]
        gamma, beta = _hand_over_norm(model, norm_path, linears)
        for linear in linears:
            _read(linear, q)
        gate = None
        if readers is not None and readers.gated_attention is not None:
            gate = model.get_submodule(f"{layer}.{readers.gated_attention}").attention_variant.gate
        if gate is not None and gate.needs_input:
            _restore_gate_input(gate, q, gamma, beta)
    for path in sites.embeddings:
        _turn_rows(model.get_submodule(path).weight, q)

    rotate_values = True
    per_head = hadamard_matrix(head_size, torch.float64, head.weight.device).T / head_size**0.5  # x -> x H^T
    ffn_m = hadamard_matrix(ffn, torch.float64, head.weight.device).T / ffn**0.5
    for layer in layers:
        for writer in sites.writers:
            _write(_linear(model, f"{layer}.{writer}"), q)
        # R4: the FFN output projection reads its input through an online Hadamard transform.
        _read(_linear(model, f"{layer}.{sites.ffn_out}"), ffn_m)
        _install_online_ffn(model, layer, sites.ffn_out)
        variant = model.get_submodule(f"{layer}.{sites.output.rpartition('.')[0]}").attention_variant
        value, output = _linear(model, f"{layer}.{sites.value}"), _linear(model, f"{layer}.{sites.output}")
        kv_heads = value.out_features // head_size
        if isinstance(getattr(variant.gate, "network", None), ElementwiseGate):
            rotate_values = False
        else:  # R2
            for rows in _heads(kv_heads, head_size):
                _write(value, per_head, rows)
            for columns in _heads(output.in_features // head_size, head_size):
                _read(output, per_head, columns)
            if variant.bias_kv is not None:
                _turn_rows(variant.bias_kv.value, per_head)
        # R3: queries and keys, in their projections or after RoPE.
        if sites.online_keys:
            variant.head_rotation = OnlineHadamard()
        else:
            for projection in (sites.query, sites.key):
                linear = _linear(model, f"{layer}.{projection}")
                for rows in _heads(linear.out_features // head_size, head_size):
                    _write(linear, per_head, rows)
        if variant.bias_kv is not None:
            _turn_rows(variant.bias_kv.key, per_head)
    return {"seed": seed, "hidden": hidden, "ffn": ffn, "head": head_size, "values_rotated": rotate_values}


def _install_online_ffn(model: nn.Module, layer: str, ffn_out: str) -> None:
    """The online Hadamard before the FFN output projection: where its input is a product made for it (Llama),
    a pre-hook on it (quantized after it by quantize_model's own pre-hook); otherwise after the FFN activation,
    which quantize_model fuses into the input projection, so the quantizer of that output sees it."""
    wiring = model.family.wiring
    if ffn_out in wiring.product_inputs:
        module = model.get_submodule(f"{layer}.{ffn_out}")
        module.online_hadamard = OnlineHadamard()
        module.register_forward_pre_hook(lambda mod, args: (mod.online_hadamard(args[0]), *args[1:]))
        return
    activation = f"{layer}.{wiring.ffn_activation}"
    model.set_submodule(activation, nn.Sequential(model.get_submodule(activation), OnlineHadamard()))
