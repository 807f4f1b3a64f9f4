"""Floating-point and block-scaled formats against torch's float8 casts and brute force; the Hadamard
matrices and transform; GPTQ against round-to-nearest and a brute-force layer error."""

import itertools
import math

import pytest
import torch

from quantization.float_quantizers import BlockQuantizer, FloatQuantizer
from quantization.formats import BLOCK_FORMATS, FLOAT_FORMATS, block_quantize, round_to_format
from quantization.gptq import HessianAccumulator, gptq, round_to_grid
from quantization.hadamard import hadamard_matrix, hadamard_transform, random_hadamard, split_order
from quantization.token_mask import real_tokens


def _format_values(fmt) -> torch.Tensor:
    """Every finite value of `fmt`, enumerated from its bit fields (brute force)."""
    bias = 2 ** (fmt.exponent_bits - 1) - 1
    values = set()
    for exponent, mantissa in itertools.product(range(2**fmt.exponent_bits), range(2**fmt.mantissa_bits)):
        if exponent == 0:
            value = mantissa / 2**fmt.mantissa_bits * 2.0 ** (1 - bias)
        else:
            value = (1 + mantissa / 2**fmt.mantissa_bits) * 2.0 ** (exponent - bias)
        if value <= fmt.max_value:
            values |= {value, -value}
    return torch.tensor(sorted(values), dtype=torch.float64)


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_rounding_equals_torch_float8_cast_on_values_midpoints_subnormals_and_beyond(name):
    fmt = FLOAT_FORMATS[name]
    grid = _format_values(fmt)
    midpoints = (grid[1:] + grid[:-1]) / 2
    nudged = torch.cat([midpoints * (1 + 2.0**-20), midpoints * (1 - 2.0**-20)])
    beyond = torch.tensor([fmt.max_value * 1.03, -fmt.max_value * 1.5, 1e30, -1e30, 1e-30])
    tiny = torch.randn(4096, dtype=torch.float64) * 2.0 ** (fmt.min_exponent - 1)  # the subnormal range
    x = torch.cat([grid, midpoints, nudged, beyond, tiny, torch.randn(4096, dtype=torch.float64) * fmt.max_value / 8])
    x = x.float()
    expected = x.clamp(-fmt.max_value, fmt.max_value).to(fmt.torch_dtype).float()
    assert torch.equal(round_to_format(x, fmt), expected)


@pytest.mark.parametrize("name", ["e2m1", "e3m2", "e2m3"])
def test_small_formats_round_to_the_nearest_enumerated_value(name):
    fmt = FLOAT_FORMATS[name]
    grid = _format_values(fmt)
    if name == "e2m1":
        assert grid[grid >= 0].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    x = torch.linspace(-1.2 * fmt.max_value, 1.2 * fmt.max_value, 5001, dtype=torch.float64)
    distance = (x[:, None] - grid[None, :]).abs()
    nearest = grid[distance.argmin(dim=1)]
    tied = distance.sort(dim=1).values[:, :2].diff(dim=1).squeeze(1) == 0
    got = round_to_format(x.float(), fmt).double()
    assert torch.equal(got[~tied], nearest[~tied])
    assert torch.isin(got, grid).all()


def test_mx_block_scale_is_the_power_of_two_of_the_spec():
    x = torch.randn(3, 70) * torch.logspace(-3, 3, 70)
    out = block_quantize(x, BLOCK_FORMATS["mxfp4"])
    element = FLOAT_FORMATS["e2m1"]
    padded = torch.nn.functional.pad(x, (0, 26)).reshape(3, 3, 32)
    for row, block in itertools.product(range(3), range(3)):
        values = padded[row, block]
        scale = 2.0 ** (math.floor(math.log2(values.abs().max())) - 2)  # emax of E2M1 is 2
        expected = round_to_format(values / scale, element) * scale
        got = out[row, block * 32 : (block + 1) * 32]
        assert torch.equal(got, expected[: got.numel()])
    assert out.shape == x.shape


def test_nvfp4_blocks_of_16_with_e4m3_scales_under_a_tensor_scale():
    x = torch.randn(2, 64) * torch.logspace(-2, 2, 64)
    out = block_quantize(x, BLOCK_FORMATS["nvfp4"])
    tensor_scale = x.abs().max() / (448 * 6)
    blocks = x.reshape(2, 4, 16)
    block_amax = blocks.abs().amax(-1, keepdim=True)
    scales = round_to_format(block_amax / 6 / tensor_scale, FLOAT_FORMATS["e4m3"]) * tensor_scale
    expected = round_to_format(blocks / scales, FLOAT_FORMATS["e2m1"]) * scales
    assert torch.allclose(out, expected.reshape(2, 64), rtol=0, atol=0)
    assert (out - x).abs().max() <= x.abs().max() / 6  # no block saturates badly


def test_float_quantizer_per_tensor_and_per_channel_scales_and_gradient():
    w = torch.randn(8, 16) * torch.arange(1, 9)[:, None]
    per_tensor, per_channel = FloatQuantizer("e4m3"), FloatQuantizer("e4m3", axis=0)
    for quantizer in (per_tensor, per_channel):
        quantizer.set_mode("observe")
        quantizer(w)
        quantizer.freeze()
    assert per_tensor.scale.item() == pytest.approx(w.abs().max().item() / 448)
    assert torch.allclose(per_channel.scale, w.abs().amax(1) / 448)
    expected = round_to_format(w / per_channel.scale[:, None], FLOAT_FORMATS["e4m3"]) * per_channel.scale[:, None]
    assert torch.equal(per_channel(w), expected)
    assert per_channel(w).abs().amax(1).allclose(w.abs().amax(1))  # the channel's maximum is on the grid
    x = w.clone().requires_grad_()
    per_tensor(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(w))
    reloaded = FloatQuantizer("e4m3")
    reloaded.load_state_dict(per_tensor.state_dict())
    assert reloaded.mode == "quantize" and torch.equal(reloaded(w), per_tensor(w))


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_block_quantizer_needs_no_calibration_and_padding_moves_no_real_value(name):
    quantizer = BlockQuantizer(name)
    assert not quantizer.needs_calibration
    quantizer.freeze()
    x = torch.randn(2, 5, 64)
    assert torch.equal(quantizer(x), block_quantize(x, BLOCK_FORMATS[name]))
    padded = torch.cat([x, 1e4 * torch.randn(2, 3, 64)], dim=1)
    mask = torch.cat([torch.ones(2, 5), torch.zeros(2, 3)], dim=1)
    with real_tokens(mask):
        assert torch.equal(quantizer(padded)[:, :5], quantizer(x))


@pytest.mark.parametrize("n", [1, 2, 16, 12, 20, 28, 24, 384, 1536])
def test_hadamard_orthogonal_and_fast_transform_equals_the_product(n):
    h = hadamard_matrix(n, torch.float64)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    x = torch.randn(3, 4, n)
    assert torch.allclose(hadamard_transform(x), x @ h.float().T / math.sqrt(n), atol=1e-5)
    q = random_hadamard(n, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_hadamard_orders_without_a_construction_are_refused():
    assert split_order(768) == (64, 12)
    with pytest.raises(ValueError, match="No Hadamard matrix of order 6"):
        split_order(6)


def _symmetric_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    q_max = 2 ** (bits - 1) - 1
    scale = w.abs().amax(1, keepdim=True) / q_max
    return scale, torch.zeros_like(scale, dtype=torch.int32), -q_max - 1, q_max


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    w = torch.randn(16, 40)
    grid = _symmetric_grid(w, 4)
    rounded = gptq(w, torch.eye(40), *grid, block_size=16)
    assert torch.equal(rounded, round_to_grid(w, *grid))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_layer_output_error_on_a_planted_model(act_order):
    torch.manual_seed(0)
    mixing = torch.randn(64, 64) * torch.logspace(-1, 1, 64)  # correlated inputs with spread scales
    x = torch.randn(512, 64) @ mixing
    w = torch.randn(32, 64)
    accumulator = HessianAccumulator(64)
    mask = torch.ones(2, 256, dtype=torch.bool)
    mask[0, 128:] = False  # half of the first sequence is padding: left out
    with real_tokens(mask):
        accumulator.add(x.reshape(2, 256, 64))
    assert accumulator.rows == 384
    real = x.reshape(2, 256, 64)[mask].double()
    expected = 2 * real.T @ real / 384
    assert (accumulator.hessian().double() - expected).abs().max() < 1e-5 * expected.abs().max()  # fp32 sums
    grid = _symmetric_grid(w, 3)
    for block in (8, 128):
        rounded = gptq(w, accumulator.hessian(), *grid, block_size=block, act_order=act_order)
        on_grid = round_to_grid(rounded, *grid)
        assert torch.allclose(rounded, on_grid, atol=1e-6)  # GPTQ's output is on the quantizer's grid
        error = (x @ (w - rounded).T).square().mean()
        rtn_error = (x @ (w - round_to_grid(w, *grid)).T).square().mean()
        assert error < (0.4 if act_order else 0.9) * rtn_error  # act-order rounds the loud inputs first


def _reference_gptq(w, h, grid, damping=0.01):
    """GPTQ unblocked, as the paper writes it: the full inverse Hessian, shrunk by a Schur step per column."""
    w, h = w.double().clone(), h.double().clone()
    h.diagonal().add_(damping * h.diagonal().mean())
    inverse = torch.linalg.inv(h)
    rounded = torch.zeros_like(w)
    for j in range(w.shape[1]):
        rounded[:, j] = round_to_grid(w[:, j : j + 1].float(), *grid)[:, 0].double()
        error = (w[:, j] - rounded[:, j]) / inverse[j, j]
        w[:, j + 1 :] -= error[:, None] * inverse[j, j + 1 :][None, :]
        inverse = inverse - inverse[:, j : j + 1] @ inverse[j : j + 1, :] / inverse[j, j]
    return rounded.float()


def test_blocked_gptq_equals_the_unblocked_algorithm():
    torch.manual_seed(1)
    x = torch.randn(256, 48) @ torch.randn(48, 48)
    w = torch.randn(12, 48)
    h = 2 * x.double().T @ x.double() / 256
    grid = _symmetric_grid(w, 3)
    assert torch.equal(gptq(w, h, *grid, block_size=8), _reference_gptq(w, h, grid))


def test_a_points_format_is_its_last_rule_then_the_integer_grid_its_bits_set_then_the_default():
    from quantization.config import QuantConfig
    from quantization.quantizer import Quantizer

    config = QuantConfig(
        act_format="fp8_e4m3",
        point_bits=(("a.*", 16),),
        point_formats=(("a.b", "fp8_e5m2"), ("a.b", "mxfp4")),
    )
    assert isinstance(config.act_quantizer("a.b"), BlockQuantizer)  # the last format rule wins
    ruled = config.act_quantizer("a.c")  # a --point_bits rule keeps the integer grid
    assert type(ruled) is Quantizer and ruled.n_bits == 16
    assert isinstance(config.act_quantizer("x.y"), FloatQuantizer)  # the default format
    assert type(config.act_quantizer("x.y", n_bits=16)) is Quantizer  # a preset's 16-bit point
    with pytest.raises(ValueError, match="unknown format"):
        QuantConfig(point_formats=(("a.b", "fp9"),))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_gptq_rounds_onto_the_grid_the_weight_quantizer_froze(granularity):
    """With an identity Hessian GPTQ is round-to-nearest: on `weight_grid` it equals the frozen weight quantizer's
    own output, per tensor, per output channel and per group of input channels."""
    from quantization.config import QuantConfig
    from transformers_language.ptq.gptq_step import weight_grid

    weight = torch.randn(8, 64) * torch.logspace(-1, 1, 64)
    config = QuantConfig(n_bits=4, weight_granularity=granularity, weight_group_size=16)
    quantizer = config.weight_quantizer("w", rows=True)
    quantizer.set_mode("observe")
    quantizer(weight)
    quantizer.freeze()
    rounded = gptq(weight, torch.eye(64), *weight_grid(quantizer, weight))
    assert torch.equal(rounded, quantizer(weight))
    assert torch.equal(quantizer(rounded), rounded)  # re-quantizing GPTQ's output changes nothing
