"""The equivalent transforms of quantization/transforms.py (gamma migration, SmoothQuant, OS+) on this project's
BERT / OPT / ViT / Llama models, before quantization (Llama's RMSNorms take scales only: no OS+).

Where they apply is the family's table (families.py `Wiring.norm_readers`): each LayerNorm with the Linears, the
attention gate and the shortcut that read its output. A transform computes one per-channel (scale, shift) per
LayerNorm and folds it into all of them; a post-LN shortcut (BERT: the LayerNorm output is the next residual)
gets a `ChannelAffine` that adds back scale and shift, run by a forward pre-hook on the module that adds the
residual, and so does the body's last output (BERT's last LayerNorm), so a head of any kind reads FP-equal
values. The transforms applied are recorded in `config.equivalent_transforms`, so a saved transformed model
rebuilds its shortcut affines (as identities, then loaded) and reloads as itself.

Statistics (SmoothQuant's and OS+'s) come from one pass of the float model over the calibration batches;
callers may share them between runs on the same model and data through `statistics_cache`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from quantization.channel_statistics import ChannelStatistics
from quantization.config import QuantConfig
from quantization.token_mask import real_tokens
from quantization.transforms import TRANSFORMS, TransformSite, fold_into_linear, fold_into_norm

from ..errors import UsageError
from ..families import Family
from ..models.norm_sites import CONFIG_KEY, NormSite, install_shortcut_affines, norm_sites
from ..objectives.inputs import attention_mask

SAMPLE_TOKENS_PER_BATCH = 256  # OS+ searches its threshold on this many tokens of each calibration batch


def check_transformable(family: Family, config, transforms: tuple[str, ...] = ()) -> None:
    """One clear error, before any weights load, for a model whose LayerNorms the table does not describe, or
    a shift (OS+) where the norms and their readers have no bias to take it."""
    if "os_plus" in transforms and not family.wiring.norm_bias:
        raise UsageError(
            f"--os_plus shifts each channel into the norm's bias and its readers' biases, and {family.model_type} "
            "has neither (RMSNorm, bias-free Linears); use --smoothquant or --gamma_migration for this model."
        )
    requirement = family.wiring.transform_requires
    if requirement is not None and getattr(config, requirement[0], None) != requirement[1]:
        key, value = requirement
        raise UsageError(
            f"The equivalent transforms need {key}={value} in the checkpoint's config ({family.model_type} with "
            f"{key}={getattr(config, key, None)} adds LayerNorm outputs as residuals inside its layers); drop "
            "--gamma_migration / --smoothquant / --os_plus for this model."
        )


@torch.no_grad()
def collect_statistics(model: nn.Module, norms: list[str], batches: Iterable) -> dict:
    """Per-channel statistics (ChannelStatistics, with a token sample) of each LayerNorm output in `norms` over
    the float model's pass on `batches` (model inputs; the transformer body alone runs; padding never counts)."""
    statistics = {name: ChannelStatistics(SAMPLE_TOKENS_PER_BATCH) for name in norms}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda _m, _a, out, s=stats: s.observe(out))
        for name, stats in statistics.items()
    ]
    try:
        for inputs in batches:
            with real_tokens(attention_mask(inputs)):
                model.body_output(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return statistics


def _simulated(make_quantizer: Callable[[], object | None]) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x fake-quantized by a fresh quantizer of `make_quantizer()` calibrated on x itself (None: x)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        quantizer = make_quantizer()
        if quantizer is None:
            return x
        if getattr(quantizer, "needs_channel_order", False):  # PEG with permutation: its order first
            quantizer.set_mode("order")
            quantizer(x)
            quantizer.freeze_channel_order()
        if quantizer.needs_calibration:
            quantizer.set_mode("observe")
            quantizer(x)
        quantizer.freeze()
        return quantizer(x)

    return apply


def _site(model: nn.Module, site: NormSite, quant: QuantConfig, statistics: dict | None, int16: set) -> TransformSite:
    """The transform's view of `site`: gamma, the readers' weights, the statistics, and its points' quantizers
    (fresh ones for every call, so OS+ scores each candidate as the quantized model would quantize it)."""

    def weight_quantizer(path: str):
        if not quant.weight_quant or (model.family.wiring.in_head(path) and not quant.preset.quantize_head):
            return None
        return quant.weight_quantizer(f"{path}.weight", rows=True)

    point, bits = f"{site.norm}.output", 16 if site.norm in int16 else None
    weights = [model.get_submodule(path).weight for path in site.linears]
    quantize_weights = [_simulated(lambda path=path: weight_quantizer(path)) for path in site.linears]
    if site.restores_output:  # its float output-affine reads it as an identity Linear would
        gamma = model.get_submodule(site.norm).weight
        weights.append(torch.eye(gamma.numel(), dtype=gamma.dtype, device=gamma.device))
        quantize_weights.append(lambda weight: weight)
    return TransformSite(
        name=site.norm,
        gamma=model.get_submodule(site.norm).weight,
        weights=weights,
        statistics=None if statistics is None else statistics[site.norm],
        quantize_activation=_simulated(lambda: quant.act_quantizer(point, bits) if quant.act_quant else None),
        quantize_weights=quantize_weights,
    )


def apply_transforms(
    model: nn.Module,
    quant: QuantConfig,
    calibration_batches: Callable[[], Iterable[torch.Tensor]],
    int16_norms: set | None = None,
    statistics_cache: dict | None = None,
) -> dict:
    """Apply `quant.transforms` to the float `model` in place (registry order); returns, per transform and
    LayerNorm, what it chose. `calibration_batches()` yields the input ids of the calibration batches (a fresh
    iterable per call); `int16_norms`: LayerNorms whose outputs the preset keeps at 16 bits."""
    check_transformable(model.family, model.config, quant.transforms)
    sites = norm_sites(model)
    install_shortcut_affines(model)
    records, applied = {}, []
    for name, method in TRANSFORMS.items():
        if name not in quant.transforms:
            continue
        statistics = None
        if method.needs_statistics:
            key = (tuple(applied), repr(quant) if applied else None)
            cache = statistics_cache if statistics_cache is not None else {}
            if key not in cache:
                cache[key] = collect_statistics(model, [s.norm for s in sites], calibration_batches())
            statistics = cache[key]
        records[name] = {}
        for site in sites:
            scale, shift, record = method.compute(_site(model, site, quant, statistics, int16_norms or set()), quant)
            fold_into_norm(model.get_submodule(site.norm), scale, shift)
            for path in site.linears:
                fold_into_linear(model.get_submodule(path), scale, shift)
            for path in site.gates:
                model.get_submodule(path).fold_input_affine(scale, shift)
            if site.shortcut is not None:
                model.get_submodule(site.shortcut).shortcut_affine.compose(scale, shift)
            if site.restores_output:
                model.get_submodule(site.norm).output_affine.compose(scale, shift)
            records[name][site.norm] = record
        applied.append(name)
    earlier = getattr(model.config, CONFIG_KEY, None) or []
    model.config.update({CONFIG_KEY: [*earlier, *applied]})
    return records
