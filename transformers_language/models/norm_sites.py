"""Where a model's LayerNorms are and what reads each one's output (the Linears, the attention gate, a post-LN
shortcut), from its family's table (families.py `Wiring.norm_readers`); and the shortcut affines a model carries
once an equivalent transform (ptq/equivalent_transforms.py) has folded a per-channel scale and shift into a
LayerNorm whose output is also a residual, or leaves the transformed body. `config.equivalent_transforms`
(CONFIG_KEY) names the transforms applied, so a saved transformed model rebuilds its shortcut affines (as
identities, then loaded)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantization.transforms import ChannelAffine

from ..wiring import LAYER_INPUT

CONFIG_KEY = "equivalent_transforms"


@dataclass(frozen=True)
class NormSite:
    """A LayerNorm (model path) and what reads its output."""

    norm: str
    linears: tuple[str, ...]
    gates: tuple[str, ...] = ()
    shortcut: str | None = None
    restores_output: bool = False
    """Its output leaves the transformed part (a post-LN body's last hidden state, read by any head): an
    `output_affine` after it puts back the float values, so every reader outside sees FP-equal values."""


def norm_sites(model: nn.Module) -> list[NormSite]:
    """Every LayerNorm the transforms fold into, with its readers, from the family's table."""
    wiring = model.family.wiring
    prefix, count = model.layers_path, len(model.transformer_layers())
    sites = []
    for index in range(count):
        layer = f"{prefix}.{index}"
        for readers in wiring.norm_readers:
            if readers.norm == LAYER_INPUT:
                norm = wiring.input_norm if index == 0 else f"{prefix}.{index - 1}.{wiring.layer_output_norm}"
            else:
                norm = f"{layer}.{readers.norm}"
            gates = ()
            if readers.gated_attention is not None:
                gate = model.get_submodule(f"{layer}.{readers.gated_attention}").attention_variant.gate
                if gate is not None and gate.needs_input:
                    gates = (f"{layer}.{readers.gated_attention}.attention_variant.gate",)
            shortcut = None if readers.shortcut is None else f"{layer}.{readers.shortcut}"
            sites.append(NormSite(norm, tuple(f"{layer}.{path}" for path in readers.linears), gates, shortcut))
    if wiring.layer_output_norm is not None:
        sites.append(NormSite(f"{prefix}.{count - 1}.{wiring.layer_output_norm}", (), restores_output=True))
    return sites


def _restore_shortcut(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: the residual (second positional input) goes through the module's shortcut affine."""
    return (args[0], module.shortcut_affine(args[1]), *args[2:]), kwargs


def _restore_output(module: nn.Module, args: tuple, output):
    """Forward hook: the LayerNorm's (quantized) output goes through its output affine."""
    return module.output_affine(output)


def install_shortcut_affines(model: nn.Module) -> None:
    """Identity `ChannelAffine`s on every shortcut and restored output of the family's table (once); a transform
    composes into them."""
    for site in norm_sites(model):
        if site.shortcut is not None:
            module = model.get_submodule(site.shortcut)
            if not hasattr(module, "shortcut_affine"):
                module.shortcut_affine = ChannelAffine(model.config.hidden_size)
                module.register_forward_pre_hook(_restore_shortcut, with_kwargs=True)
        if site.restores_output:
            module = model.get_submodule(site.norm)
            if not hasattr(module, "output_affine"):
                module.output_affine = ChannelAffine(model.config.hidden_size)
                module.register_forward_hook(_restore_output)
