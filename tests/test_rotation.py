"""QuaRot's rotations: the rotated float model equals the original (OPT and Llama, every attention variant), the
rotation really moves the activations, quantization after it beats round-to-nearest on a planted outlier, and
models it does not fit are refused in one line."""

import copy
import math

import pytest
import torch

from quantization.calibration import calibration_passes
from quantization.config import QuantConfig
from tests.conftest import VARIANTS, batch, tiny_config
from tests.planted import CHANNEL, markov_ids
from tests.planted import perplexity as planted_perplexity
from transformers_language import AttentionConfig, build_model
from transformers_language.errors import UsageError
from transformers_language.families import FAMILIES
from transformers_language.ptq.quantized_model import quantize_model
from transformers_language.ptq.rotation import check_rotatable, rotate_model


def _wide_model(model_type: str, variant: str):
    """A tiny model whose norms have random, wide weights (and LayerNorm biases), so no fold is near identity."""
    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), AttentionConfig(**VARIANTS[variant])).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower():
                parameter.copy_(torch.randn_like(parameter) * (2.0 if name.endswith("weight") else 1.0))
            elif "bias_kv" in name or "gate" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("model_type", ["opt", "llama"])
def test_the_rotated_model_computes_the_same_logits(model_type, variant):
    model = _wide_model(model_type, variant)
    ids, mask = batch(model_type)
    residual = {}
    layer = model.transformer_layers()[0]
    layer.register_forward_hook(lambda _m, _a, out: residual.update(out=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        before = residual["out"]
        record = rotate_model(model, seed=3)
        rotated = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    error = (rotated - reference)[real].abs().max() / reference[real].abs().max()
    assert error < 1e-5  # fp32 rounding: 3e-7 typical, 2.5e-6 for softpick
    assert not torch.allclose(residual["out"], before, atol=1e-3)  # the residual stream itself turned
    assert record["values_rotated"] == ("elementwise" not in variant)


def test_the_residual_rotation_spreads_a_planted_outlier_channel():
    model = _wide_model("llama", "vanilla")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, CHANNEL] *= 50.0
    ids, mask = batch("llama")
    stream = {}
    model.transformer_layers()[0].register_forward_pre_hook(
        lambda _m, args, kwargs: stream.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        peak = stream["x"].abs().amax(dim=(0, 1))
        rotate_model(model)
        model(input_ids=ids, attention_mask=mask)
        rotated_peak = stream["x"].abs().amax(dim=(0, 1))
    assert peak.max() / peak.median() > 20 and rotated_peak.max() / rotated_peak.median() < 5


def test_quarot_beats_round_to_nearest_at_w4a8_on_a_planted_outlier(planted):
    model = planted["opt"]
    fp = planted_perplexity(model, "opt")
    calibration = markov_ids(32, 32, 99)

    def quantized(rotate: bool) -> float:
        copied = copy.deepcopy(model)
        config = QuantConfig(n_bits=4, n_bits_act=8, weight_granularity="per_channel", quarot=rotate)
        if rotate:
            rotate_model(copied)
        quantize_model(copied, config)
        for scope in calibration_passes(copied, config.calibration_inputs):
            with torch.no_grad(), scope:
                for start in range(0, 32, 8):
                    copied(input_ids=calibration[start : start + 8])
        return planted_perplexity(copied, "opt")

    rtn, rotated = quantized(False), quantized(True)
    assert math.isfinite(rotated) and rotated - fp < 0.5 * (rtn - fp)


def test_models_the_rotation_does_not_fit_are_refused_in_one_line():
    with pytest.raises(UsageError, match="BERT's post-LN residual"):
        check_rotatable(FAMILIES["bert"], tiny_config("bert"))
    with pytest.raises(UsageError, match="do_layer_norm_before=True"):
        check_rotatable(FAMILIES["opt"], tiny_config("opt", do_layer_norm_before=False))
    with pytest.raises(UsageError, match="the FFN width 100 has no Hadamard transform"):
        check_rotatable(FAMILIES["llama"], tiny_config("llama", intermediate_size=100))
