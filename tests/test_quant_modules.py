"""Quantized modules share the float weights, are exact when off, hold at most 2^b values per quantized tensor
when on, and a calibrated state reloads to identical outputs."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from quantization.calibration import activation_quantizers, calibration, set_quantization, weight_quantizers
from quantization.modules import QuantEmbedding, QuantLayerNorm, QuantLinear
from quantization.quantizer import Quantizer


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.down = nn.Linear(32, 16)

    def forward(self, ids):
        return self.down(self.act(self.up(self.norm(self.embed(ids)))))


def _quantized(net: TinyNet, bits: int = 8, weights: str = "MSE", acts: str = "running_minmax") -> TinyNet:
    def weight():
        return Quantizer(bits, symmetric=True, estimator=weights)

    def act():
        return Quantizer(bits, symmetric=False, estimator=acts)

    net.embed = QuantEmbedding.from_float(net.embed, weight())
    net.norm = QuantLayerNorm.from_float(net.norm, weight(), act())
    net.up = QuantLinear.from_float(net.up, weight(), act(), activation=net.act)  # fused GELU
    net.act = nn.Identity()
    net.down = QuantLinear.from_float(net.down, weight(), act())
    return net


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(seed))


def _calibrated(bits: int = 8, weights: str = "MSE", batches=(0, 1, 2)) -> tuple[TinyNet, TinyNet]:
    torch.manual_seed(0)
    reference = TinyNet().eval()
    net = TinyNet().eval()
    net.load_state_dict(reference.state_dict())
    net = _quantized(net, bits, weights)
    with torch.no_grad(), calibration(net):
        for batch in batches:
            net(_ids(batch))
    return reference, net


def test_swaps_share_parameters_and_are_exact_when_off():
    torch.manual_seed(0)
    net = TinyNet().eval()
    params = {name: p for name, p in net.named_parameters()}
    expected = net(_ids(5))
    quantized = _quantized(net)
    assert all(p is params[name] for name, p in quantized.named_parameters())
    assert set(quantized.state_dict()) >= set(params)  # float keys kept, quantizer buffers added
    assert torch.equal(quantized(_ids(5)), expected)  # every quantizer is off


def test_w8a8_holds_at_most_256_values_per_tensor_and_off_restores_float():
    reference, net = _calibrated(bits=8)
    outputs = []
    handles = [q.register_forward_hook(lambda m, a, o: outputs.append(o)) for q in activation_quantizers(net)]
    with torch.no_grad():
        quantized = net(_ids(7))
    for handle in handles:
        handle.remove()
    assert len(outputs) == 3 and all(len(torch.unique(o)) <= 256 for o in outputs)
    assert all(len(torch.unique(m.quantized_weight())) <= 256 for m in (net.embed, net.norm, net.up, net.down))
    expected = reference(_ids(7))
    assert not torch.equal(quantized, expected)
    assert (quantized - expected).abs().max() < 0.1 * expected.abs().max()
    set_quantization(net, weights=False, activations=False)
    assert torch.equal(net(_ids(7)), expected)


def test_w16a16_is_close_to_float():
    """Min-max ranges that cover the evaluated batch: only rounding at 2^-16 of the range remains."""
    reference, net = _calibrated(bits=16, weights="current_minmax", batches=(3,))
    with torch.no_grad():
        torch.testing.assert_close(net(_ids(3)), reference(_ids(3)), rtol=1e-3, atol=1e-4)


def test_fused_activation_keeps_the_pre_activation_in_float():
    _, net = _calibrated()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = net.up.output_quantizer(F.gelu(F.linear(x, net.up.quantized_weight(), net.up.bias)))
        assert torch.equal(net.up(x), expected)


def test_ranges_freeze_and_a_calibrated_state_reloads_to_identical_outputs():
    _, net = _calibrated()
    frozen = [q.scale.clone() for q in activation_quantizers(net)]
    with torch.no_grad():
        before = net(_ids(9))
        net(_ids(10) * 0 + 49)  # more data after the scope changes no range
    assert all(torch.equal(q.scale, s) for q, s in zip(activation_quantizers(net), frozen, strict=True))
    assert all(q.mode == "quantize" for q in weight_quantizers(net) + activation_quantizers(net))
    torch.manual_seed(1)
    fresh = _quantized(TinyNet().eval())
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(_ids(9)), before)


def test_weight_cache_follows_the_weight():
    _, net = _calibrated()
    with torch.no_grad():
        first = net.down.quantized_weight().clone()
        net.down.weight.mul_(0.5)
        assert not torch.equal(net.down.quantized_weight(), first)


def test_an_error_during_calibration_leaves_no_half_calibrated_quantizer():
    torch.manual_seed(0)
    net = _quantized(TinyNet().eval())
    with pytest.raises(IndexError), calibration(net):
        net(torch.tensor([[99]]))  # id out of the table
    assert all(q.mode == "off" for q in activation_quantizers(net))
