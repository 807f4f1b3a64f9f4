"""The ViT family: parity with stock HF ViT (eager, SDPA; fused and explicit paths), every attention variant
saved and reloaded, stock checkpoints loading unchanged, and the LayerNorm after the patch embedding."""

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from transformers_language import AttentionConfig, ViTForImageClassificationWithVariants, build_model
from transformers_language.models.model_classes import PATCH_LAYERNORM_KEY

from .conftest import VARIANTS


def tiny_vit_config(**overrides) -> ViTConfig:
    """2 layers, hidden 64, 4 heads, 8 x 8 patches of 32 x 32 RGB images (16 patches + [CLS]), 10 classes."""
    values = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    return ViTConfig(**(values | overrides))


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels).logits


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_vanilla_equals_stock_hf_vit(implementation):
    torch.manual_seed(0)
    stock = ViTForImageClassification(tiny_vit_config(attn_implementation=implementation)).eval()
    ours = ViTForImageClassificationWithVariants(tiny_vit_config()).eval()
    ours.load_state_dict(stock.state_dict(), strict=True)
    pixels = images()
    expected = logits(stock, pixels)
    torch.testing.assert_close(logits(ours, pixels), expected, rtol=1e-5, atol=1e-5)
    for variant in ours.attention_variants().values():  # the explicit path computes the same
        variant.probs.register_forward_hook(lambda *a: None)
    torch.testing.assert_close(logits(ours, pixels), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_trains_and_round_trips(tmp_path, name):
    torch.manual_seed(0)
    attention = dict(VARIANTS[name])
    if "train_seq_length" in attention:
        attention["train_seq_length"] = 17  # [CLS] + 16 patches
    model = build_model(tiny_vit_config(), AttentionConfig(**attention)).train()
    loss = model(pixel_values=images(), labels=torch.tensor([1, 2, 3])).loss
    loss.backward()
    assert torch.isfinite(loss)
    for param_name, param in model.named_parameters():
        if "attention_variant." in param_name:
            assert param.grad is not None and param.grad.abs().sum() > 0, param_name
    model.eval()
    with torch.no_grad():  # move the variant's weights away from their init, so a re-init on load would show
        for param_name, param in model.named_parameters():
            if "attention_variant" in param_name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path)
    reloaded, info = ViTForImageClassificationWithVariants.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.attention_config == model.attention_config
    torch.testing.assert_close(logits(reloaded.eval(), images()), logits(model, images()), rtol=0, atol=0)


def test_stock_checkpoint_loads_unchanged(tmp_path):
    torch.manual_seed(0)
    stock = ViTForImageClassification(tiny_vit_config()).eval()
    stock.save_pretrained(tmp_path)
    ours, info = ViTForImageClassificationWithVariants.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ours.attention_config == AttentionConfig()
    torch.testing.assert_close(logits(ours.eval(), images()), logits(stock, images()), rtol=1e-5, atol=1e-5)


def test_the_patch_layernorm_normalises_the_patch_embeddings_and_round_trips(tmp_path):
    config = tiny_vit_config(**{PATCH_LAYERNORM_KEY: True})
    torch.manual_seed(0)
    model = build_model(config, AttentionConfig(gate_type="conditional_per_token")).eval()
    patches = model.vit.embeddings.patch_embeddings
    with torch.no_grad():
        patches.norm.weight.uniform_(0.5, 2.0)
        patches.norm.bias.uniform_(-1.0, 1.0)
        raw = patches.projection(images()).flatten(2).transpose(1, 2)
        expected = torch.nn.functional.layer_norm(raw, (64,), patches.norm.weight, patches.norm.bias, 1e-12)
        torch.testing.assert_close(patches(images()), expected)
    model.save_pretrained(tmp_path)
    reloaded, info = ViTForImageClassificationWithVariants.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert "vit.embeddings.patch_embeddings.norm.weight" in reloaded.state_dict()
    torch.testing.assert_close(logits(reloaded.eval(), images()), logits(model, images()), rtol=0, atol=0)
    without = build_model(tiny_vit_config(), AttentionConfig())
    assert not hasattr(without.vit.embeddings.patch_embeddings, "norm")


ACT_RANGES = "current_minmax"


def _calibrated_w8a8(model, bits: int = 8):
    from quantization.calibration import calibration
    from quantization.config import QuantConfig
    from transformers_language.ptq.quantized_model import quantize_model

    # One calibration batch and its own min-max: that batch is never clipped, and 16 bits are near exact.
    quantize_model(model, QuantConfig(n_bits=bits, n_bits_act=bits, quant_setup="all", ranges_acts=ACT_RANGES))
    with torch.no_grad(), calibration(model):
        model(pixel_values=images(4, seed=10))
    return model


@pytest.mark.parametrize("attention", [{}, {"gate_type": "conditional_per_token"}, {"softmax": "clipped(-0.05:1)"}])
def test_the_family_wiring_quantizes_every_point_and_16_bits_stay_close(attention):
    torch.manual_seed(0)
    reference = build_model(tiny_vit_config(), AttentionConfig(**attention)).eval()
    points, errors = {}, {}
    for bits in (8, 16):
        model = build_model(tiny_vit_config(), AttentionConfig(**attention)).eval()
        model.load_state_dict(reference.state_dict())
        points[bits] = set(_calibrated_w8a8(model, bits).quantization_points)
        seen = images(4, seed=10)  # the calibration batch: its values lie inside the calibrated ranges
        error = (logits(model, seen) - logits(reference, seen)).abs().max() / logits(reference, seen).abs().max()
        errors[bits] = float(error)
    assert errors[16] < 5e-3 and 10 * errors[16] < errors[8] < 0.5, errors
    names = points[8]
    layers = "vit.layers"
    for index in range(2):
        for point in ("attn_residual_sum", "ffn_residual_sum", "mlp.fc1.output", "attention.q_proj.weight"):
            assert f"{layers}.{index}.{point}" in names, point
        assert f"{layers}.{index}.attention.attention_variant.probs" in names
    assert "vit.embeddings.embedding_sum" in names and "classifier.weight" in names


@pytest.mark.parametrize(
    "transforms", [("gamma_migration",), ("smoothquant",), ("gamma_migration", "smoothquant", "os_plus")]
)
def test_the_equivalent_transforms_leave_the_float_vit_unchanged(transforms):
    from quantization.config import QuantConfig
    from transformers_language.ptq.equivalent_transforms import apply_transforms, norm_sites

    torch.manual_seed(0)
    model = build_model(tiny_vit_config(), AttentionConfig(gate_type="conditional_per_token")).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(torch.randn_like(module.weight) * 2)
                module.bias.copy_(torch.randn_like(module.bias))
    reference = logits(model, images())
    apply_transforms(model, QuantConfig(transforms=transforms), lambda: [images(4, seed=20 + i) for i in range(2)])
    assert len(norm_sites(model)) == 4  # each layer's two LayerNorms
    error = (logits(model, images()) - reference).abs().max() / reference.abs().max()
    assert float(error) < 1e-5
