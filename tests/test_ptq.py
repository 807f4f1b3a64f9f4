"""The post-training baselines' quantizers: PEG against per-tensor / per-channel, the permutation, per-token
ranges, per-channel weights, per-point bits, LLM.int8() decomposition at its two limits, and on tiny trained
BERT / OPT models with a planted outlier channel, each method recovering most of what per-tensor W8A8 loses."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from quantization.affine import scale_and_zero_point
from quantization.calibration import calibration_passes, weight_quantizers
from quantization.config import QuantConfig, point_matches
from quantization.decomposition import OutlierDecomposition
from quantization.dynamic import TokenQuantizer
from quantization.groups import GroupQuantizer
from quantization.modules import QuantLinear
from quantization.quantizer import Quantizer, fake_quantize
from tests.conftest import tiny_config
from tests.planted import markov_ids as _markov_ids
from tests.planted import perplexity as _perplexity
from transformers_language import AttentionConfig, build_model
from transformers_language.families import FAMILIES
from transformers_language.ptq.quantized_model import outlier_point_patterns, quantize_model

ESTIMATORS = [
    ("current_minmax", {}),
    ("running_minmax", {}),
    ("MSE", {}),
    ("L2.4", {}),
    ("current_minmax", {"percentile": 99.0}),
]


def _activations(seed: int, channels: int = 24) -> torch.Tensor:
    """(4, 10, channels) values with a few wide channels, as outliers make them."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 10, channels, generator=generator)
    x[..., 3] *= 40
    x[..., 17 % channels] = x[..., 17 % channels] * 15 + 5
    return x


def _calibrated(quantizer: Quantizer, batches=(0, 1, 2)) -> Quantizer:
    quantizer.set_mode("observe")
    for seed in batches:
        quantizer(_activations(seed))
    quantizer.freeze()
    return quantizer


@pytest.mark.parametrize("estimator, options", ESTIMATORS)
def test_peg_with_one_group_is_per_tensor_bit_for_bit(estimator, options):
    per_tensor = _calibrated(Quantizer(8, False, estimator, **options))
    peg = _calibrated(GroupQuantizer(8, False, estimator, groups=1, **options))
    x = _activations(5)
    assert torch.equal(peg(x), per_tensor(x))
    with torch.enable_grad():  # the straight-through kernel path agrees too
        assert torch.equal(peg(x.requires_grad_()), per_tensor(x))


@pytest.mark.parametrize("estimator, options", ESTIMATORS)
@pytest.mark.parametrize("permute", [False, True])
def test_peg_with_a_group_per_channel_is_per_channel_bit_for_bit(estimator, options, permute):
    per_channel = _calibrated(Quantizer(8, False, estimator, axis=-1, **options))
    peg = GroupQuantizer(8, False, estimator, groups=24, permute=permute, **options)
    if permute:
        peg.set_mode("order")
        for seed in (0, 1, 2):
            peg(_activations(seed))
        peg.freeze_channel_order()
    _calibrated(peg)
    x = _activations(6)
    assert torch.equal(peg(x), per_channel(x))


def test_the_range_based_permutation_is_a_bijection_that_groups_the_wide_channels():
    peg = GroupQuantizer(8, False, "current_minmax", groups=4, permute=True)
    assert peg.needs_channel_order
    peg.set_mode("order")
    x = _activations(0)
    assert torch.equal(peg(x), x)  # the ordering pass changes nothing
    peg.freeze_channel_order()
    assert torch.equal(peg.permutation.sort().values, torch.arange(24))
    widths = x.amax(dim=(0, 1)) - x.amin(dim=(0, 1))
    assert torch.equal(peg.permutation, torch.argsort(widths, stable=True))
    last = set(peg.members()[-1].tolist())
    assert {3, 17} <= last  # the two outlier channels share the last group
    assert [len(m) for m in peg.members()] == [6, 6, 6, 6]
    # Uneven groups: sizes differ by at most one and cover every channel once.
    uneven = GroupQuantizer(8, False, "current_minmax", groups=5)
    _calibrated(uneven)
    sizes = [len(m) for m in uneven.members()]
    assert max(sizes) - min(sizes) <= 1 and sorted(torch.cat(uneven.members()).tolist()) == list(range(24))


def test_each_group_gets_the_range_of_its_own_channels():
    peg = _calibrated(GroupQuantizer(8, False, "current_minmax", groups=3), batches=(0,))
    x = _activations(0)
    for members in peg.members():
        values = x[..., members]
        expected, _, _, _ = scale_and_zero_point(values.min(), values.max(), 8, False)
        assert torch.allclose(peg.scale[members], expected.expand(len(members)))


@pytest.mark.parametrize("symmetric", [False, True])
def test_per_token_ranges_equal_a_per_row_brute_force(symmetric):
    quantizer = TokenQuantizer(6, symmetric)
    quantizer.set_mode("quantize")
    x = _activations(3)
    x[0, 0] = x[0, 0].abs()  # a row without negative values
    out = quantizer(x)
    rows = x.reshape(-1, x.shape[-1])
    signed_low = x.min() if symmetric else None
    for index, row in enumerate(rows):
        low = row.min() if signed_low is None else torch.minimum(row.min(), -row.abs().max())
        scale, zero, q_min, q_max = scale_and_zero_point(low, row.max(), 6, symmetric)
        expected = fake_quantize(row, scale, zero, q_min, q_max, None)
        assert torch.equal(out.reshape(rows.shape)[index], expected), index
    # Attention scores: a row is one query's scores over the keys.
    scores = torch.randn(2, 4, 5, 7)
    per_query = quantizer(scores)
    assert all(len(torch.unique(row)) <= 64 for row in per_query.reshape(-1, 7))


def test_per_channel_weights_equal_a_loop_over_rows():
    weight = torch.randn(6, 16) * torch.logspace(-2, 1, 6)[:, None]
    config = QuantConfig(weight_granularity="per_channel")
    quantizer = config.weight_quantizer("w.weight", rows=True)
    quantizer.set_mode("observe")
    quantizer(weight)
    quantizer.freeze()
    out = quantizer(weight)
    for index, row in enumerate(weight):
        scale, zero, q_min, q_max = scale_and_zero_point(row.min(), row.max(), 8, True)
        assert torch.equal(out[index], fake_quantize(row, scale, zero, q_min, q_max, None))
    assert quantizer.axis == 0 and config.weight_quantizer("ln.weight", rows=False).axis is None


def _tiny(model_type: str):
    torch.manual_seed(0)
    return build_model(tiny_config(model_type), AttentionConfig()).eval()


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(seed))


def _calibrate(model, config: QuantConfig, batches=2):
    for scope in calibration_passes(model, config.calibration_inputs):
        with torch.no_grad(), scope:
            for seed in range(batches):
                model(input_ids=_ids(seed))


def test_per_point_bits_put_exactly_those_points_on_their_grid(model_type):
    ffn_out = "**.fc2.output" if model_type == "opt" else "bert.encoder.layer.*.output.dense.output"
    config = QuantConfig(point_bits=((ffn_out, 4), ("**.0.**.weight", 3)))
    model = quantize_model(_tiny(model_type), config)
    _calibrate(model, config)
    seen = {}
    handles = [
        quantizer.register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, o))
        for name, quantizer in model.quantization_points.items()
        if not name.endswith(".weight")
    ]
    with torch.no_grad():
        model(input_ids=_ids(9))
    for handle in handles:
        handle.remove()
    four_bit = [name for name in seen if point_matches(name, ffn_out)]
    assert len(four_bit) == 2
    for name, output in seen.items():
        distinct = len(torch.unique(output))
        assert distinct <= (16 if name in four_bit else 256), name
    assert max(len(torch.unique(o)) for name, o in seen.items() if name not in four_bit) > 16
    for name, quantizer in model.quantization_points.items():
        if name.endswith(".weight"):
            expected = 3 if ".0." in name else 8
            assert quantizer.n_bits == expected, name
            values = len(torch.unique(model.get_submodule(name.removesuffix(".weight")).quantized_weight()))
            assert values <= 2**expected, name


def _decomposed(threshold: float):
    torch.manual_seed(1)
    linear = nn.Linear(16, 8)
    config = QuantConfig(llm_int8_threshold=threshold)
    quantized = QuantLinear.from_float(
        linear, config.weight_quantizer("fc.weight", rows=True), None, decomposition=config.decomposition("fc")
    )
    quantized.weight_quantizer.set_mode("observe")
    quantized.weight_quantizer(linear.weight)
    quantized.weight_quantizer.freeze()
    quantized.decomposition.input_quantizer.set_mode("quantize")
    return linear, quantized


def _inputs() -> torch.Tensor:
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    x[..., 4] *= 30  # an outlier channel
    return x


@torch.no_grad()
def test_llm_int8_without_outliers_is_per_token_times_per_channel_int8():
    linear, quantized = _decomposed(math.inf)
    x = _inputs()
    token = TokenQuantizer(8)
    token.set_mode("quantize")
    expected = F.linear(token(x), quantized.quantized_weight(), linear.bias)
    assert torch.equal(quantized(x), expected)
    assert quantized.weight_quantizer.axis == 0
    assert quantized.decomposition.float_channel_share(16) == 0.0


@torch.no_grad()
def test_llm_int8_with_threshold_zero_is_the_float_linear():
    linear, quantized = _decomposed(0.0)
    x = _inputs()
    assert torch.equal(quantized(x), linear(x))
    assert quantized.decomposition.float_channel_share(16) == 1.0


@torch.no_grad()
def test_llm_int8_keeps_the_outlier_channels_float_and_reports_their_share():
    linear, quantized = _decomposed(6.0)
    x = _inputs()
    outliers = (x.abs() >= 6).flatten(0, 1).any(dim=0)
    assert outliers[4] and outliers.sum() < 16
    regular = x.masked_fill(outliers, 0)
    token = TokenQuantizer(8)
    token.set_mode("quantize")
    expected = F.linear(token(regular), quantized.quantized_weight(), linear.bias) + F.linear(
        x[..., outliers], linear.weight[:, outliers]
    )
    assert torch.equal(quantized(x), expected)
    assert quantized.decomposition.float_channel_share(16) == outliers.sum().item() / 16
    quantized.decomposition.reset_statistics()
    assert quantized.decomposition.float_channel_share(16) is None
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        OutlierDecomposition(TokenQuantizer(8), -1.0)


def test_llm_int8_quantizes_only_the_linears(model_type):
    config = QuantConfig(llm_int8_threshold=6.0)
    model = quantize_model(_tiny(model_type), config)
    names = list(model.quantization_points)
    assert names and all(n.endswith((".weight", ".input")) for n in names)
    linears = [n.removesuffix(".input") for n in names if n.endswith(".input")]
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in linears)
    assert all(q.axis == 0 for q in weight_quantizers(model))  # per output channel
    assert calibration_passes(model) == []  # nothing to calibrate: dynamic inputs, weights at once


# --- Planted outliers (tests/planted.py builds the models) ----------------------------------------------------


def _quantized_perplexity(model, model_type: str, config: QuantConfig) -> float:
    quantized = quantize_model(copy.deepcopy(model), config)
    calibration = _markov_ids(32, 32, 99)
    for scope in calibration_passes(quantized, config.calibration_inputs):
        with torch.no_grad(), scope:
            for start in range(0, 32, 8):
                quantized(input_ids=calibration[start : start + 8])
    return _perplexity(quantized, model_type)


def _methods(model_type: str) -> dict[str, QuantConfig]:
    family = FAMILIES[model_type]
    base = {"ranges_weights": family.weight_ranges}
    points = outlier_point_patterns(family)
    return {
        "PEG K=6 permuted": QuantConfig(
            **base, act_granularity="per_embedding_group", peg_groups=6, peg_permute=True, peg_points=points
        ),
        "MP-PTQ": QuantConfig(**base, point_bits=tuple((p, 16) for p in points)),
        "per-token": QuantConfig(**base, act_granularity="per_token", weight_granularity="per_channel"),
        "LLM.int8()": QuantConfig(**base, llm_int8_threshold=6.0),
    }


def test_each_method_recovers_most_of_what_per_tensor_w8a8_loses_on_a_planted_outlier(model_type, planted):
    model = planted[model_type]
    fp = _perplexity(model, model_type)
    base = QuantConfig(ranges_weights=FAMILIES[model_type].weight_ranges)
    per_tensor_gap = _quantized_perplexity(model, model_type, base) - fp
    assert per_tensor_gap > 0.05 * fp  # per-tensor W8A8 degrades badly
    for name, config in _methods(model_type).items():
        gap = _quantized_perplexity(model, model_type, config) - fp
        assert gap < 0.5 * per_tensor_gap, (name, gap, per_tensor_gap)


def test_a_calibrated_peg_model_reloads_with_its_groups(model_type):
    points = outlier_point_patterns(FAMILIES[model_type])
    config = QuantConfig(act_granularity="per_embedding_group", peg_groups=3, peg_permute=True, peg_points=points)
    model = quantize_model(_tiny(model_type), config)
    _calibrate(model, config)
    fresh = quantize_model(_tiny(model_type), config)
    fresh.load_state_dict(model.state_dict())
    grouped = [q for q in fresh.quantization_points.values() if isinstance(q, GroupQuantizer)]
    assert len(grouped) == 3 * 2 and all(q.mode == "quantize" and not q.needs_channel_order for q in grouped)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=_ids(7)).logits, model(input_ids=_ids(7)).logits)
