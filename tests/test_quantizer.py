"""The quantizer's math (grid, zero point, error bound, per-channel, STE) and every range estimator against a
brute-force reference."""

import numpy as np
import pytest
import torch
from torch import nn

from quantization import estimators
from quantization.affine import scale_and_zero_point
from quantization.config import QuantConfig
from quantization.estimators import ESTIMATOR_NAMES, build_estimator, quantization_error
from quantization.quantizer import Quantizer


def _calibrated(x: torch.Tensor, **options) -> Quantizer:
    quantizer = Quantizer(**options)
    quantizer.set_mode("observe")
    quantizer(x)
    quantizer.freeze()
    return quantizer


def test_asymmetric_grid_endpoints_zero_and_error_bound():
    x = torch.linspace(-1.0, 3.0, 10001)
    quantizer = _calibrated(x, n_bits=8, symmetric=False)
    scale, zero_point = quantizer.scale.item(), quantizer.zero_point.item()
    assert scale == pytest.approx(4.0 / 255) and 0 <= zero_point <= 255
    y = quantizer(x)
    assert y.min().item() == pytest.approx(-1.0, abs=scale / 2) and y.max().item() == pytest.approx(3.0, abs=scale / 2)
    assert quantizer(torch.zeros(3)).eq(0).all()  # zero is exactly representable
    assert (y - x).abs().max().item() <= scale / 2 + 1e-6
    assert len(torch.unique(y)) <= 256
    outside = quantizer(torch.tensor([-5.0, 9.0]))
    assert outside.tolist() == pytest.approx([y.min().item(), y.max().item()])  # clamped to the grid ends


def test_asymmetric_range_is_widened_to_include_zero():
    quantizer = _calibrated(torch.linspace(2.0, 5.0, 100), n_bits=8)
    assert quantizer.zero_point.item() == 0 and quantizer.scale.item() == pytest.approx(5.0 / 255)


def test_symmetric_signed_and_unsigned_grids():
    signed = _calibrated(torch.tensor([-2.0, 0.5, 1.0]), n_bits=8, symmetric=True)
    assert signed.q_range == (-128, 127) and signed.zero_point.item() == 0
    assert signed.scale.item() == pytest.approx(2.0 / 127)
    assert signed(torch.tensor([-2.0, 2.0])).tolist() == pytest.approx([-2.0, 2.0])
    unsigned = _calibrated(torch.tensor([0.0, 0.5, 3.0]), n_bits=4, symmetric=True)
    assert unsigned.q_range == (0, 15) and unsigned.scale.item() == pytest.approx(3.0 / 15)


def test_per_channel_scales_follow_each_channel():
    weight = torch.randn(6, 40) * torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0, 1000.0])[:, None]
    quantizer = _calibrated(weight, n_bits=8, symmetric=True, axis=0)
    assert quantizer.scale.shape == (6,)
    expected = weight.abs().amax(dim=1) / 127
    torch.testing.assert_close(quantizer.scale, expected)
    error = (quantizer(weight) - weight).abs().amax(dim=1)
    assert (error <= expected / 2 * (1 + 1e-5)).all()


def test_straight_through_gradient_inside_the_range_only():
    quantizer = _calibrated(torch.tensor([-1.0, 1.0]), n_bits=8)
    x = torch.tensor([-3.0, -0.5, 0.2, 0.99, 4.0], requires_grad=True)
    quantizer(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_modes_and_reload():
    x = torch.randn(4, 16)
    quantizer = Quantizer(n_bits=6, estimator="running_minmax")
    assert quantizer(x) is x  # off
    with pytest.raises(RuntimeError, match="calibrate"):
        quantizer.set_mode("quantize")
    with pytest.raises(ValueError, match="valid modes: off, observe, quantize"):
        quantizer.set_mode("estimate")
    quantizer.set_mode("observe")
    assert quantizer(x) is x  # observing passes values through
    quantizer.freeze()
    reloaded = Quantizer(n_bits=6, estimator="running_minmax")
    reloaded.load_state_dict(quantizer.state_dict())
    assert reloaded.mode == "quantize" and torch.equal(reloaded(x), quantizer(x))
    assert len(torch.unique(quantizer(x))) <= 64


def test_minmax_estimators_and_percentiles():
    torch.manual_seed(0)
    batches = [torch.randn(1000) * (i + 1) for i in range(3)]
    current = build_estimator("current_minmax", 8, False, None)
    running = build_estimator("running_minmax", 8, False, None)
    for batch in batches:
        current.observe(batch)
        running.observe(batch)
    assert current.range()[0].item() == batches[-1].min().item()
    low, high = batches[0].min().item(), batches[0].max().item()
    for batch in batches[1:]:
        low, high = 0.9 * low + 0.1 * batch.min().item(), 0.9 * high + 0.1 * batch.max().item()
    assert running.range()[0].item() == pytest.approx(low) and running.range()[1].item() == pytest.approx(high)

    percentile = build_estimator("current_minmax", 8, False, 0, percentile=99.0)
    data = torch.randn(3, 2001)
    percentile.observe(data)
    low, high = percentile.range()
    for channel in range(3):
        values = data[channel].numpy()
        assert low[channel].item() == np.percentile(values, 1.0, method="inverted_cdf")  # low end from 100 - P
        assert high[channel].item() == np.percentile(values, 99.0, method="inverted_cdf")


def _brute_force_range(x: torch.Tensor, n_bits: int, symmetric: bool, p: float, grid_size: int):
    """Every candidate of the estimator's grid, one at a time through the quantizer's own arithmetic."""
    low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    fractions = torch.linspace(1 / grid_size, 1.0, grid_size).tolist()
    if symmetric:
        absmax = max(-low, high)
        candidates = [(-f * absmax, f * absmax) for f in fractions]
    else:
        candidates = [(a * low, b * high) for a in fractions for b in fractions]
    best, best_error = None, float("inf")
    for lo, hi in candidates:
        scale, zero_point, q_min, q_max = scale_and_zero_point(torch.tensor(lo), torch.tensor(hi), n_bits, symmetric)
        y = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, q_min, q_max)
        error = (y - x).abs().pow(p).sum().item()
        if error < best_error * (1 - 1e-6):
            best, best_error = (lo, hi), error
    return best


@pytest.mark.parametrize("name, p", [("MSE", 2.0), ("L2.4", 2.4), ("L1", 1.0)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("default_grid", [False, True])
def test_search_estimators_find_the_brute_force_optimum(name, p, symmetric, default_grid):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4000, generator=generator)
    x[:4] = torch.tensor([40.0, -25.0, 60.0, 33.0])  # outliers that min-max would cover
    grid_size = None if default_grid else (60 if symmetric else 12)
    estimator = build_estimator(name, 4, symmetric, None, grid_size=grid_size)
    estimator.observe(x)
    low, high = (v.item() for v in estimator.range())
    reference = _brute_force_range(x, 4, symmetric, p, estimator.grid_size)
    assert (low, high) == pytest.approx(reference, rel=1e-5)
    assert high < 60.0  # the optimum clips the outliers


def test_search_estimator_per_channel_and_vectorised_error(monkeypatch):
    # Heavy-tailed rows (Student's t, 3 degrees of freedom) of different widths, at the default grid of 100.
    torch.manual_seed(5)
    weight = torch.distributions.StudentT(3.0).sample((5, 300)) * torch.arange(1, 6)[:, None]
    scored = []

    def counting_error(flat, low, high, *args):
        scored.append(low.shape[0])
        return quantization_error(flat, low, high, *args)

    monkeypatch.setattr(estimators, "quantization_error", counting_error)
    estimator = build_estimator("MSE", 8, True, 0)
    estimator.observe(weight)
    low, high = estimator.range()
    for channel in range(5):
        reference = _brute_force_range(weight[channel], 8, True, 2.0, 100)
        assert (low[channel].item(), high[channel].item()) == pytest.approx(reference, rel=1e-5)
    assert sum(scored) == 10 + 19  # coarse to fine: every 10th fraction, then the 19 around the best one
    # quantization_error scores K candidates x C channels at once
    errors = quantization_error(weight, -torch.ones(3, 5), torch.ones(3, 5) * 2, 8, True, 2.0)
    assert errors.shape == (3, 5)


def test_bad_settings_name_the_valid_values():
    with pytest.raises(ValueError, match=r"valid estimators: current_minmax, running_minmax, MSE, L<p>"):
        build_estimator("L_inf", 8, False, None)
    with pytest.raises(ValueError, match=r"valid bit widths: 2\.\.16"):
        Quantizer(n_bits=1)
    with pytest.raises(ValueError, match=r"valid bit widths"):
        Quantizer(n_bits=17)
    with pytest.raises(ValueError, match="percentile"):
        build_estimator("MSE", 8, False, None, percentile=99.9)
    with pytest.raises(ValueError, match="percentile must lie"):
        build_estimator("running_minmax", 8, False, None, percentile=20)
    assert "L<p>" in ESTIMATOR_NAMES


def test_the_no_grad_path_is_bit_identical_to_torch_fake_quantize():
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        x = torch.randn(20000, generator=generator) * (trial + 1) / 7
        symmetric, n_bits = trial % 2 == 0, (8, 4, 16)[trial % 3]
        quantizer = _calibrated(x[:5000] * 0.9, n_bits=n_bits, symmetric=symmetric)  # some values fall outside
        kernel = torch.fake_quantize_per_tensor_affine(x, quantizer.scale, quantizer.zero_point, *quantizer.q_range)
        with torch.no_grad():
            assert torch.equal(quantizer(x), kernel)
            quantizer.in_place = True
            overwritten = x.clone()
            assert quantizer(overwritten).data_ptr() == overwritten.data_ptr()
            assert torch.equal(overwritten, kernel)


def test_only_activation_quantizers_overwrite_their_input():
    config = QuantConfig()
    assert config.act_quantizer().in_place and not config.weight_quantizer().in_place
    weight = torch.randn(8, 8)
    quantizer = config.weight_quantizer()
    quantizer.set_mode("observe")
    quantizer(weight)
    quantizer.freeze()
    before = weight.clone()
    with torch.no_grad():
        quantizer(weight)
    assert torch.equal(weight, before)


def test_linear_percentiles_match_numpy():
    """The paper's --percentile: numpy.percentile's default (linear interpolation between the two ranks)."""
    data = torch.randn(3, 65_536, generator=torch.Generator().manual_seed(4)) * torch.tensor([[1.0], [3.0], [0.1]])
    estimator = build_estimator("current_minmax", 8, False, 0, percentile=99.999, interpolation="linear")
    estimator.observe(data)
    low, high = estimator.range()
    for channel, values in enumerate(data.double().numpy()):
        assert low[channel].item() == pytest.approx(np.percentile(values, 100 - 99.999), rel=1e-6)
        assert high[channel].item() == pytest.approx(np.percentile(values, 99.999), rel=1e-6)
        assert high[channel].item() < values.max()  # nearest rank would give exactly the maximum here
    with pytest.raises(ValueError, match="Unknown percentile interpolation 'cubic'; valid: nearest, linear"):
        build_estimator("current_minmax", 8, False, None, percentile=99.0, interpolation="cubic")


def test_calibration_on_quantized_inputs_sees_the_quantized_upstream():
    """inputs='quantized' (the paper's order): the second quantizer observes the first one's quantized output;
    inputs='float': the float values."""
    from quantization.calibration import calibration

    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    for inputs in ("float", "quantized"):
        chain = nn.Sequential(Quantizer(4, estimator="current_minmax"), Quantizer(8, estimator="current_minmax"))
        with torch.no_grad(), calibration(chain, inputs):
            chain(x)
        first, second = chain
        upstream = first(x) if inputs == "quantized" else x  # first is frozen now: its quantized output
        assert second.estimator.range()[0].item() == upstream.min().item()
        assert second.estimator.range()[1].item() == upstream.max().item()
        assert (first(x) != x).any()  # 4 bits: the two cases really differ


@pytest.mark.parametrize("symmetric, axis", [(False, None), (True, None), (True, 0), (False, 1)])
def test_quantizing_while_observing_without_gradient_equals_the_kernel(symmetric, axis):
    """Calibration on quantized inputs takes the no-gradient path: bit-identical to torch's fake-quantize kernel."""
    x = torch.randn(6, 40, 5) * torch.logspace(-2, 2, 5)
    outputs = []
    for grad in (False, True):
        quantizer = Quantizer(n_bits=6, symmetric=symmetric, axis=axis)
        quantizer.set_mode("observe")
        quantizer.quantize_while_observing = True
        with torch.set_grad_enabled(grad):
            outputs.append(quantizer(x.clone().requires_grad_(grad)).detach())
    assert torch.equal(outputs[0], outputs[1])
