"""W8A8 wiring of BERT, OPT and Llama: exact when off, every point on the grid when on, the head FP under fp32_head,
16-bit LayerNorms under the int16 presets, residual sums quantized exactly, and a calibrated model reloads."""

import pytest
import torch
from torch import nn

from quantization.calibration import activation_quantizers, calibration, set_quantization, weight_quantizers
from quantization.config import QuantConfig
from quantization.modules import QuantLayerNorm, QuantLinear, QuantRMSNorm
from quantization.quantizer import Quantizer
from tests.conftest import VOCAB, tiny_config
from transformers_language import AttentionConfig, build_model
from transformers_language.ptq.quantized_model import quantize_model

METHODS = {
    "vanilla": {},
    "clipped": {"softmax": "clipped(-0.05:1)"},
    "gated": {"gate_type": "conditional_per_token", "init_prob": 0.25},
}


@pytest.fixture(params=["bert", "opt", "llama"])
def model_type(request) -> str:
    """Every family with a text wiring (overrides conftest's BERT / OPT)."""
    return request.param


def _pair(model_type: str, method: str = "vanilla"):
    torch.manual_seed(0)
    reference = build_model(tiny_config(model_type), AttentionConfig(**METHODS[method])).eval()
    quantized = build_model(tiny_config(model_type), AttentionConfig(**METHODS[method])).eval()
    quantized.load_state_dict(reference.state_dict())
    return reference, quantized


def _ids(seed: int, batch: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _calibrate(model, batches=(0, 1)):
    with torch.no_grad(), calibration(model):
        for seed in batches:
            model(input_ids=_ids(seed))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_quantizers_off_give_the_float_model_bit_for_bit(model_type, method):
    reference, quantized = _pair(model_type, method)
    quantize_model(quantized, QuantConfig(quant_setup="all"))
    with torch.no_grad():
        assert torch.equal(quantized(input_ids=_ids(4)).logits, reference(input_ids=_ids(4)).logits)
    _calibrate(quantized)
    set_quantization(quantized, weights=False, activations=False)
    with torch.no_grad():
        assert torch.equal(quantized(input_ids=_ids(4)).logits, reference(input_ids=_ids(4)).logits)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_w8a8_every_point_holds_at_most_256_values(model_type, method):
    _, model = _pair(model_type, method)
    quantize_model(model, QuantConfig())
    _calibrate(model)
    seen = []
    acts = activation_quantizers(model)
    handles = [q.register_forward_hook(lambda m, a, o: seen.append(o)) for q in acts]
    with torch.no_grad():
        model(input_ids=_ids(5))
    for handle in handles:
        handle.remove()
    assert len(seen) == len(acts)  # every activation quantizer ran once
    assert all(len(torch.unique(o)) <= 256 for o in seen)
    layers = 2
    expected_points = 3 * layers  # scores, probs, context
    if model_type == "bert":  # Q K V out dense FFN-in FFN-out, 2 LN, 2 residual sums per layer; embeddings
        expected_points += layers * (6 + 2 + 2) + 2 + 1
    elif model_type == "llama":  # keys; Q K V O gate up down, 2 RMSNorms, 2 residual sums, SwiGLU product; final
        expected_points += layers * (1 + 7 + 2 + 2 + 1) + 1
    else:  # Q K V out_proj fc1 fc2, 2 LN, 2 residual sums per layer; final LN; embedding sum
        expected_points += layers * (6 + 2 + 2) + 1 + 1
    assert len(acts) == expected_points
    gates = [
        m for n, m in model.named_modules() if ".attention_variant.gate" in n and isinstance(m, QuantLinear | Quantizer)
    ]
    assert not gates  # the gate stays FP


def test_fp32_head_keeps_the_head_float_and_all_quantizes_it(model_type):
    head = "cls" if model_type == "bert" else "lm_head"
    for setup, quantized_head in (("fp32_head", False), ("all", True)):
        _, model = _pair(model_type)
        quantize_model(model, QuantConfig(quant_setup=setup))
        inside = [m for m in model.get_submodule(head).modules() if isinstance(m, Quantizer)]
        assert bool(inside) == quantized_head, setup


@pytest.mark.parametrize("setup", ["fp32_head+int16_final_LN", "fp32_head+int16_all_LN"])
def test_int16_presets_put_layernorms_at_16_bits(model_type, setup):
    _, model = _pair(model_type)
    quantize_model(model, QuantConfig(quant_setup=setup))
    norms = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerNorm | QuantRMSNorm)}
    assert len(norms) == 2 * 2 + 1  # two per layer, and the final one (BERT: the embeddings')
    final = model.family.wiring.final_layernorm.format(last=1)
    for name, norm in norms.items():
        sixteen = setup.endswith("all_LN") or name == final
        assert norm.output_quantizer.n_bits == norm.weight_quantizer.n_bits == (16 if sixteen else 8), name


def test_opt_residual_sums_are_quantized_exactly():
    """Recompute one OPT layer by hand from its (quantized) parts: both residual sums are quantized, and the
    FFN branch and the LayerNorm read the same quantized first sum."""
    _, model = _pair("opt")
    quantize_model(model, QuantConfig())
    _calibrate(model)
    layer = model.transformer_layers()[1]
    captured = {}
    hook = layer.register_forward_pre_hook(
        lambda m, a, k: captured.update(x=(a[0] if a else k["hidden_states"])), with_kwargs=True
    )
    out_hook = layer.register_forward_hook(lambda m, a, k, o: captured.update(out=o), with_kwargs=True)
    attn_hook = layer.self_attn.register_forward_hook(lambda m, a, k, o: captured.update(attn=o[0]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=_ids(6))
    for h in (hook, out_hook, attn_hook):
        h.remove()
    first, second = layer.sum_quantizers.quantizers
    with torch.no_grad():
        x = captured["x"]
        sum1 = first(x + captured["attn"])
        flat = sum1.reshape(-1, sum1.shape[-1])
        ffn = layer.fc2(layer.fc1(layer.final_layer_norm(flat)))
        expected = second(flat + ffn).view_as(x)
    assert torch.equal(captured["out"], expected)
    assert len(torch.unique(sum1)) <= 256


def test_opt_embedding_sum_is_quantized_behind_a_project_in():
    """With word_embed_proj_dim < hidden (facebook/opt-350m's layout) the sum after project_in is the point:
    project_in reads the table lookup, already on the weight grid, and its output is quantized too."""
    torch.manual_seed(0)
    model = build_model(tiny_config("opt", word_embed_proj_dim=16), AttentionConfig()).eval()
    assert model.model.decoder.project_in is not None
    quantize_model(model, QuantConfig())
    _calibrate(model)
    inputs = []
    first = model.transformer_layers()[0]
    handle = first.register_forward_pre_hook(  # runs after the quantizing hook
        lambda m, a, k: inputs.append(a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        model(input_ids=_ids(8))
    handle.remove()
    assert len(torch.unique(inputs[0])) <= 256
    project_in = model.model.decoder.project_in
    assert not hasattr(project_in, "input_quantizer")
    assert isinstance(project_in, QuantLinear) and project_in.output_quantizer.mode == "quantize"


def test_bert_residual_sums_and_embedding_sums_are_quantized():
    _, model = _pair("bert")
    quantize_model(model, QuantConfig())
    _calibrate(model)
    layer = model.transformer_layers()[0]
    norm = layer.output.LayerNorm
    inputs = []
    handle = norm.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))  # runs after the quantizing hook
    embed = model.bert.embeddings
    with torch.no_grad():
        model(input_ids=_ids(7))
    handle.remove()
    assert len(torch.unique(inputs[0])) <= 256
    assert len(embed.sum_quantizers.quantizers) == 2 and all(
        q.mode == "quantize" for q in embed.sum_quantizers.quantizers
    )


def test_w16a16_logits_match_float_closely(model_type):
    reference, model = _pair(model_type)
    quantize_model(model, QuantConfig(n_bits=16, n_bits_act=16, quant_setup="all"))
    _calibrate(model, batches=(8,))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=_ids(8)).logits, reference(input_ids=_ids(8)).logits, rtol=0, atol=2e-3
        )


def test_a_calibrated_model_reloads_to_identical_outputs(model_type, tmp_path):
    _, model = _pair(model_type, "gated")
    quantize_model(model, QuantConfig(ranges_weights="MSE", percentile=99.9))
    _calibrate(model)
    with torch.no_grad():
        expected = model(input_ids=_ids(9)).logits
    torch.save(model.state_dict(), tmp_path / "state.pt")
    _, fresh = _pair(model_type, "gated")
    quantize_model(fresh, QuantConfig(ranges_weights="MSE", percentile=99.9))
    fresh.load_state_dict(torch.load(tmp_path / "state.pt"))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=_ids(9)).logits, expected)
    assert all(q.mode == "quantize" for q in weight_quantizers(fresh) + activation_quantizers(fresh))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ranges_acts": "L_inf"}, "valid estimators"),
        ({"ranges_weights": "running_minmax"}, "valid weight ranges: minmax, MSE, L<p>"),
        ({"quant_setup": "fp16_head"}, "valid presets: all, fp32_head"),
        ({"n_bits": 1}, "valid bit widths"),
        ({"qmethod_acts": "log"}, "valid methods: asymmetric_uniform, symmetric_uniform"),
    ],
)
def test_bad_quantization_settings(options, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**options)


def test_modules_are_swapped_not_copied(model_type):
    _reference, model = _pair(model_type)
    params = dict(model.named_parameters())
    quantize_model(model, QuantConfig())
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not any(
        type(m) is nn.Linear
        for n, m in model.named_modules()
        if ".attention_variant." not in n and "cls" not in n and "lm_head" not in n
    )


def test_a_deep_copy_uses_its_own_sum_quantizers():
    import copy

    _, model = _pair("opt")
    quantize_model(model, QuantConfig())
    _calibrate(model)
    clone = copy.deepcopy(model)
    layer = clone.transformer_layers()[0]
    calls = []
    layer.sum_quantizers.quantizers[0].register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        model(input_ids=_ids(1))
        assert not calls  # the original does not reach the copy's quantizers
        clone(input_ids=_ids(1))
    assert calls == [1]
