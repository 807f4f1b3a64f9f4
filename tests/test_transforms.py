"""The equivalent transforms (gamma migration, SmoothQuant, OS+) and token-wise clipping: float outputs unchanged
for BERT and OPT with every attention variant, through save / reload; each transform's identity case; the
token-wise ranges against brute-force quantiles and the quantile search against a brute-force grid; and on the
planted-outlier tiny models, each recipe recovering most of what per-tensor W8A8 loses."""

import copy
import math
from unittest import mock

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from quantization.affine import learnable_fake_quantize
from quantization.channel_statistics import ChannelStatistics
from quantization.config import QuantConfig
from quantization.quantizer import Quantizer
from quantization.token_clipping import TokenQuantileEstimator, token_clipping_quantizers
from quantization.transforms import TRANSFORMS, fold_into_linear, fold_into_norm, os_plus_search
from tests.conftest import VARIANTS, VOCAB, batch, tiny_config
from tests.planted import markov_ids as _markov_ids
from tests.planted import perplexity as _perplexity
from transformers_language import AttentionConfig, build_model
from transformers_language.families import FAMILIES
from transformers_language.models.model_classes import model_class
from transformers_language.ptq.equivalent_transforms import CONFIG_KEY, apply_transforms, norm_sites
from transformers_language.ptq.validation import quantize_for_validation

TRANSFORM_SETS = [("gamma_migration",), ("smoothquant",), ("os_plus",), tuple(TRANSFORMS)]
TESTED_VARIANTS = [
    "vanilla",
    "clipped",
    "conditional_per_token",
    "conditional_per_head",
    "unconditional_per_head",
    "mlp",
    "all_heads_linear",
    "clipped+gate",
    "elementwise",
    "sink+bias_kv+elementwise",
]


def _model(model_type: str, variant: str, seed: int = 0):
    """A tiny model whose LayerNorms have random, wide gammas and betas (so no transform is near the identity)."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(model_type), AttentionConfig(**VARIANTS[variant])).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(torch.randn_like(module.weight) * 2)
                module.bias.copy_(torch.randn_like(module.bias))
    return model


def _calibration():
    return [torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _logits(model, model_type):
    ids, mask = batch(model_type)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("transforms", TRANSFORM_SETS, ids="+".join)
@pytest.mark.parametrize("variant", TESTED_VARIANTS)
def test_a_transform_leaves_the_float_model_unchanged_and_survives_save_and_reload(
    model_type, variant, transforms, tmp_path
):
    model = _model(model_type, variant)
    reference = _logits(model, model_type)
    records = apply_transforms(model, QuantConfig(transforms=transforms), _calibration)
    assert list(records) == list(transforms)
    changed = _logits(model, model_type)
    scale = reference.abs().max()
    assert float((changed - reference).abs().max() / scale) < 1e-5
    # The transform really moved something: no LayerNorm is the float model's.
    original = _model(model_type, variant)
    for site in norm_sites(model):
        norm, before = model.get_submodule(site.norm), original.get_submodule(site.norm)
        assert not (torch.allclose(norm.weight, before.weight) and torch.allclose(norm.bias, before.bias))

    model.save_pretrained(tmp_path)
    reloaded = model_class(model_type).from_pretrained(tmp_path).eval()
    assert reloaded.config.to_dict()[CONFIG_KEY] == list(transforms)
    assert torch.equal(_logits(reloaded, model_type), changed)


def test_post_ln_shortcuts_need_their_affine(tmp_path):
    """BERT's LayerNorm outputs are also residuals: without the shortcut affine the transform is not equivalent
    (so the equivalence test above can fail)."""
    model = _model("bert", "vanilla")
    reference = _logits(model, "bert")
    apply_transforms(model, QuantConfig(transforms=("gamma_migration",)), _calibration)
    for site in norm_sites(model):
        if site.shortcut is not None:
            model.get_submodule(site.shortcut).shortcut_affine.scale.fill_(1.0)
    assert float((_logits(model, "bert") - reference).abs().max() / reference.abs().max()) > 1e-2


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "_affine." not in k}


def _assert_unchanged(before, model):
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_gamma_migration_with_unit_gamma_is_the_identity(model_type):
    model = _model(model_type, "conditional_per_token")
    with torch.no_grad():
        for site in norm_sites(model):
            model.get_submodule(site.norm).weight.fill_(1.0)
    before = _state(model)
    apply_transforms(model, QuantConfig(transforms=("gamma_migration",)), _calibration)
    _assert_unchanged(before, model)


def test_smoothquant_with_alpha_zero_and_equal_scales_is_the_identity(model_type):
    """alpha = 0 gives s_j = 1 / max|W_:,j|: with every reader's column maxima at 1, every scale is 1."""
    model = _model(model_type, "conditional_per_token")
    with torch.no_grad():
        for site in norm_sites(model):
            linears = [model.get_submodule(path) for path in site.linears]
            if not linears:  # the body's restored output: its reader is an identity (column maxima 1)
                continue
            column_max = torch.stack([linear.weight.abs().amax(dim=0) for linear in linears]).amax(dim=0)
            for linear in linears:
                linear.weight.div_(column_max)
    before = _state(model)
    apply_transforms(model, QuantConfig(transforms=("smoothquant",), smoothquant_alpha=0.0), _calibration)
    _assert_unchanged(before, model)


def test_os_plus_with_zero_shift_and_unit_scale_is_the_identity(model_type):
    model = _model(model_type, "conditional_per_token")
    before = _state(model)
    for site in norm_sites(model):
        ones = torch.ones(model.config.hidden_size)
        fold_into_norm(model.get_submodule(site.norm), ones, torch.zeros_like(ones))
        for path in site.linears:
            fold_into_linear(model.get_submodule(path), ones, torch.zeros_like(ones))
    _assert_unchanged(before, model)
    # Through the transform itself: symmetric statistics (no shift) and a one-point grid (t = the widest range).
    statistics = {}
    for site in norm_sites(model):
        stats = ChannelStatistics(sample_per_batch=8)
        stats.observe(torch.linspace(-1, 1, 16).repeat(model.config.hidden_size, 1).T)
        statistics[site.norm] = stats
    apply_transforms(
        model, QuantConfig(transforms=("os_plus",), os_plus_grid=1), _calibration, None, {((), None): statistics}
    )
    _assert_unchanged(before, model)


def test_os_plus_picks_the_threshold_with_the_least_quantized_output_error():
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(256, 16, generator=generator)
    sample[:, 3] = sample[:, 3] * 40 + 25  # a wide, shifted channel
    weight = torch.randn(8, 16, generator=generator)
    quantize = Quantizer(8, False, "current_minmax")

    def quantize_activation(x):
        q = copy.deepcopy(quantize)
        q.set_mode("observe")
        q(x)
        q.freeze()
        return q(x)

    scale, shift, record = os_plus_search(
        sample, sample.amin(0), sample.amax(0), [(weight, lambda w: w)], quantize_activation, grid=10
    )
    assert torch.allclose(shift, (sample.amin(0) + sample.amax(0)) / 2)
    errors = dict(record["errors"])
    assert record["threshold"] == min(errors, key=errors.get)
    assert record["scaled_channels"] >= 1 and float(scale[3]) > 1  # the wide channel is scaled down
    assert errors[record["threshold"]] < errors[max(errors)]  # better than shifting alone


def test_a_post_ln_opt_is_refused_before_loading():
    from transformers_language.errors import UsageError
    from transformers_language.ptq.equivalent_transforms import check_transformable

    with pytest.raises(UsageError, match="do_layer_norm_before=True"):
        check_transformable(FAMILIES["opt"], tiny_config("opt", do_layer_norm_before=False))


def test_the_coarse_range_is_the_brute_force_quantile_of_token_extremes():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 20, 16, generator=generator) * (1 + i) for i in range(3)]
    for quantile in (1.0, 0.99, 0.9):
        estimator = TokenQuantileEstimator(8, False, None, quantile=quantile)
        for x in batches:
            estimator.observe(x)
        low, high = estimator.range()
        rows = torch.cat([x.reshape(-1, 16) for x in batches]).numpy().astype(np.float64)
        assert float(high) == pytest.approx(np.quantile(rows.max(axis=1), quantile), rel=1e-6)
        assert float(low) == pytest.approx(np.quantile(rows.min(axis=1), 1 - quantile), rel=1e-6)


def test_the_learnable_quantizer_matches_the_frozen_one_and_passes_gradients():
    x = torch.randn(5, 40) * 3
    for symmetric in (False, True):
        frozen = Quantizer(6, symmetric, "current_minmax")
        low, high = torch.tensor(-2.3), torch.tensor(4.1)
        frozen.freeze(low, high)
        ends = [low.clone().requires_grad_(), high.clone().requires_grad_()]
        learnt = learnable_fake_quantize(x, *ends, 6, symmetric)
        assert torch.equal(learnt.detach(), frozen(x))
        learnt.square().sum().backward()
        assert ends[1].grad is not None and float(ends[1].grad.abs()) > 0


def _tiny_trained():
    """A tiny OPT trained briefly on the Markov chain (so its activations are not those of an initialisation)."""
    torch.manual_seed(0)
    model = build_model(tiny_config("opt"), AttentionConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        ids = _markov_ids(16, 24, 500 + step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _batches(count=3):
    return [(ids, ids) for ids in (_markov_ids(8, 24, 700 + i) for i in range(count))]


def _prepare(model, config, batches, cache=None):
    return quantize_for_validation(Accelerator(cpu=True), model, None, config, batches, cache)


def test_the_chosen_quantile_minimises_the_output_loss_over_the_grid():
    """Brute force: each quantile of the grid calibrated on its own model copy, scored as the search scores."""
    model = _tiny_trained()
    grid = (1.0, 0.999, 0.99, 0.95, 0.8)
    config = QuantConfig(n_bits_act=4, token_clipping_points=("**",), token_clipping_quantiles=grid)
    batches = _batches()
    chosen = _prepare(copy.deepcopy(model), config, batches)["token_clipping"]
    with torch.no_grad():
        references = [model.base_model(input_ids=ids).last_hidden_state for ids, _ in batches]
    losses = {}
    for quantile in grid:
        single = QuantConfig(n_bits_act=4, token_clipping_points=("**",), token_clipping_quantiles=(quantile,))
        copy_ = copy.deepcopy(model)
        with mock.patch("quantization.token_clipping.widened_quantile", return_value=None):  # exactly this q
            _prepare(copy_, single, batches)
        with torch.no_grad():
            outputs = [copy_.base_model(input_ids=ids).last_hidden_state for ids, _ in batches]
        losses[quantile] = float(
            torch.stack([torch.nn.functional.mse_loss(o, r) for o, r in zip(outputs, references, strict=True)]).mean()
        )
    assert chosen["quantile"] == min(losses, key=losses.get)
    searched = chosen["loss_by_quantile"]
    assert {q: searched[q] for q in grid} == pytest.approx(losses, rel=1e-5)
    assert all(loss >= searched[chosen["quantile"]] for loss in searched.values())  # widened: until it rose
    assert len(set(losses.values())) > 1  # the grid matters at 4 bits


def test_the_fine_stage_learns_ranges_that_lower_the_loss():
    model = _tiny_trained()
    config = QuantConfig(
        n_bits_act=4, token_clipping_points=("**",), token_clipping_quantiles=(1.0,), token_clipping_fine_steps=30
    )
    record = _prepare(model, config, _batches())["token_clipping"]
    assert record["fine_steps"] == 30
    assert record["fine_loss"] < record["loss_by_quantile"][1.0]
    quantizers = token_clipping_quantizers(list(model.quantization_points.values()))
    assert quantizers and all(q.mode == "quantize" and q.learnable_range is None for q in quantizers)
    assert all(p.requires_grad for p in model.parameters())


RECIPES = {
    "OS": QuantConfig(transforms=("gamma_migration",), token_clipping_points=("**",), weight_granularity="per_channel"),
    "SmoothQuant": QuantConfig(transforms=("smoothquant",), weight_granularity="per_channel"),
    "OS+": QuantConfig(transforms=("os_plus",), weight_granularity="per_channel"),
}


def test_each_transform_recipe_recovers_most_of_what_per_tensor_w8a8_loses_on_a_planted_outlier(model_type, planted):
    model = planted[model_type]
    fp = _perplexity(model, model_type)
    weights = {"ranges_weights": FAMILIES[model_type].weight_ranges}
    calibration = [(ids, ids) for ids in _markov_ids(32, 32, 99).split(8)]

    def quantized_perplexity(config):
        copy_ = copy.deepcopy(model)
        _prepare(copy_, config, calibration)
        return _perplexity(copy_, model_type)

    per_tensor_gap = quantized_perplexity(QuantConfig(**weights)) - fp
    assert per_tensor_gap > 0.05 * fp
    for name, recipe in RECIPES.items():
        config = QuantConfig(**{**recipe.__dict__, **weights})
        gap = quantized_perplexity(config) - fp
        assert gap < 0.5 * per_tensor_gap, (name, gap, per_tensor_gap)
        assert math.isfinite(gap)
