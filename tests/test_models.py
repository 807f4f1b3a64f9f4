"""Our BERT / OPT classes against stock HF: parity, fused == explicit, causality, checkpoints round-trip."""

import pytest
import torch
from transformers import BertForMaskedLM, LlamaForCausalLM, OPTForCausalLM

from transformers_language import AttentionConfig, build_model, model_class
from transformers_language.models.attention_config import logit

from .conftest import VARIANTS, batch, tiny_config

STOCK = {"bert": BertForMaskedLM, "opt": OPTForCausalLM, "llama": LlamaForCausalLM}


def make(model_type, seed=0, **attention):
    torch.manual_seed(seed)
    return build_model(tiny_config(model_type), AttentionConfig(**attention)).eval()


def logits(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def force_explicit(model):
    """Attach a no-op hook to every probs point: the explicit (non-fused) path must then run."""
    return [v.probs.register_forward_hook(lambda *a: None) for v in model.attention_variants().values()]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(("model_type", "left_padding"), [("bert", False), ("opt", False), ("opt", True)])
def test_vanilla_equals_stock_hf(model_type, implementation, left_padding):
    torch.manual_seed(0)
    stock = STOCK[model_type](tiny_config(model_type, attn_implementation=implementation)).eval()
    assert stock.config._attn_implementation == implementation
    ours = model_class(model_type)(tiny_config(model_type)).eval()
    ours.load_state_dict(stock.state_dict(), strict=True)
    ids, mask = batch(model_type, left_padding=left_padding)
    valid = mask.bool()  # fully masked query rows of left padding are undefined in HF's SDPA path
    expected = logits(stock, ids, mask)
    for explicit in (False, True):
        hooks = force_explicit(ours) if explicit else []
        torch.testing.assert_close(logits(ours, ids, mask)[valid], expected[valid], rtol=1e-5, atol=1e-5)
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("name", ["vanilla", "conditional_per_token", "unconditional_per_head", "mlp"])
def test_fused_path_equals_explicit_path(model_type, name):
    model = make(model_type, **VARIANTS[name])
    ids, mask = batch(model_type)
    variant = next(iter(model.attention_variants().values()))
    assert variant.uses_fused_path()
    fused = logits(model, ids, mask)
    force_explicit(model)
    assert not variant.uses_fused_path()
    torch.testing.assert_close(logits(model, ids, mask), fused, rtol=1e-5, atol=1e-5)


def test_clipped_variants_take_explicit_path_and_clipped_0_1_is_vanilla(model_type):
    vanilla = make(model_type)
    clipped = make(model_type, softmax="clipped(0:1)")
    assert not next(iter(clipped.attention_variants().values())).uses_fused_path()
    clipped.load_state_dict(vanilla.state_dict())
    ids, mask = batch(model_type)
    torch.testing.assert_close(logits(clipped, ids, mask), logits(vanilla, ids, mask), rtol=1e-5, atol=1e-5)
    strongly_clipped = make(model_type, softmax="clipped(-0.3:1)")
    strongly_clipped.load_state_dict(vanilla.state_dict())
    assert not torch.allclose(logits(strongly_clipped, ids, mask), logits(vanilla, ids, mask), atol=1e-3)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_opt_is_causal_for_every_variant(name):
    model = make("opt", **VARIANTS[name])
    ids, mask = batch("opt")
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 5) % 90 + 3
    before, after = logits(model, ids, mask), logits(model, changed, mask)
    torch.testing.assert_close(after[:, :6], before[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(after[0, 6:], before[0, 6:])


def test_every_variant_trains_with_gradient_into_every_variant_parameter(model_type, variant):
    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), variant).train()
    ids, mask = batch(model_type)
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        if "attention_variant." in name:  # gates, sink logits, learned keys and values
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_save_load_round_trip_every_variant(tmp_path, model_type, variant):
    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), variant).eval()
    with torch.no_grad():  # move gate weights away from their init, so a re-init on load would show
        for name, param in model.named_parameters():
            if "attention_variant" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.attention_config == variant
    ids, mask = batch(model_type)
    torch.testing.assert_close(logits(reloaded.eval(), ids, mask), logits(model, ids, mask), rtol=0, atol=0)


def test_fine_tuning_scale_survives_reload(tmp_path):
    model = make("bert", gate_type="conditional_per_token", init_prob=0.25, fine_tuning=True)
    model.save_pretrained(tmp_path)
    reloaded = model_class("bert").from_pretrained(tmp_path)
    gates = [v.gate for v in reloaded.attention_variants().values()]
    assert gates and all(g.scale == 4.0 for g in gates)


def test_stock_checkpoint_loads_unchanged(tmp_path, model_type):
    torch.manual_seed(0)
    stock = STOCK[model_type](tiny_config(model_type)).eval()
    stock.save_pretrained(tmp_path)
    ours, info = model_class(model_type).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ours.attention_config == AttentionConfig()
    ids, mask = batch(model_type)
    torch.testing.assert_close(logits(ours.eval(), ids, mask), logits(stock, ids, mask), rtol=1e-5, atol=1e-5)


def test_gates_added_to_stock_checkpoint_get_our_init(tmp_path, model_type):
    """Fine-tuning a stock checkpoint with gates: HF's _init_weights must not overwrite the gate init."""
    stock = STOCK[model_type](tiny_config(model_type))
    stock.save_pretrained(tmp_path)
    config = AttentionConfig(gate_type="conditional_per_token", init_prob=0.25, fine_tuning=True).apply_to(
        type(stock.config).from_pretrained(tmp_path)
    )
    model, info = model_class(model_type).from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert info["missing_keys"] and all("attention_variant.gate" in k for k in info["missing_keys"])
    for variant in model.attention_variants().values():
        out = variant.gate.network.out
        torch.testing.assert_close(out.bias, torch.full_like(out.bias, logit(0.25)))
        assert 0.005 < out.weight.std().item() < 0.02  # N(0, 0.01), not HF's N(0, 0.02) nor zeros
    for name, param in stock.state_dict().items():  # every pretrained weight kept
        torch.testing.assert_close(model.state_dict()[name], param)


def test_fresh_gate_init_is_ours_not_hf_default(model_type):
    model = make(model_type, gate_type="conditional_per_token", gate_network="all_heads_linear", init_prob=0.9)
    for variant in model.attention_variants().values():
        proj = variant.gate.network.proj
        torch.testing.assert_close(proj.bias, torch.full_like(proj.bias, logit(0.9)))
        bound = proj.weight.shape[1] ** -0.5
        assert proj.weight.abs().max() <= bound and proj.weight.std() > 0.5 * bound / 3**0.5


def test_points_are_hookable_with_documented_shapes(model_type):
    model = make(model_type, gate_type="conditional_per_token")
    ids, mask = batch(model_type)
    seen = {}
    for name, variant in model.attention_variants().items():
        for point in ("scores", "probs", "context"):
            getattr(variant, point).register_forward_hook(
                lambda m, i, o, key=f"{name}.{point}": seen.__setitem__(key, o.shape)
            )
    logits(model, ids, mask)
    assert len(seen) == 2 * 3
    shapes = set(seen.values())
    assert shapes == {torch.Size([3, 4, 12, 12]), torch.Size([3, 12, 32])}


def test_context_point_alone_keeps_the_fused_path(model_type):
    model = make(model_type)
    variant = next(iter(model.attention_variants().values()))
    variant.context.register_forward_hook(lambda *a: None)
    assert variant.uses_fused_path()


class Sharpen(torch.nn.Module):
    def forward(self, scores):
        return scores * 1000.0  # near one-hot attention instead of the near-uniform attention of a fresh model


def test_quantizer_like_swap_of_scores_point_changes_output(model_type):
    """A point replaced by another module (as a quantizer will be) is used and forces the explicit path."""
    model = make(model_type)
    ids, mask = batch(model_type)
    before = logits(model, ids, mask)
    for variant in model.attention_variants().values():
        variant.scores = Sharpen()
    assert not torch.allclose(logits(model, ids, mask), before, atol=1e-4)


def test_output_attentions_returns_probabilities(model_type):
    model = make(model_type, softmax="clipped(-0.1:1)")
    ids, mask = batch(model_type)
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, 12, 12)
    assert (out.attentions[0] == 0).any()  # clipped softmax gives exact zeros


def test_skip_attn_returns_zero_context(model_type):
    model = make(model_type, skip_attn=True)
    ids, mask = batch(model_type)
    contexts = []
    for variant in model.attention_variants().values():
        variant.context.register_forward_hook(lambda m, i, o: contexts.append(o))
    first = logits(model, ids, mask)
    assert contexts and all(torch.equal(c, torch.zeros_like(c)) for c in contexts)
    # Tokens do not mix: changing one token leaves every other position unchanged.
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 90 + 3
    torch.testing.assert_close(logits(model, changed, mask)[:, 1:], first[:, 1:])


def test_other_attention_implementations_are_rejected(model_type, tmp_path):
    make(model_type).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="leave attn_implementation unset"):
        model_class(model_type).from_pretrained(tmp_path, attn_implementation="flex_attention")
    model = model_class(model_type).from_pretrained(tmp_path, attn_implementation="sdpa")
    assert model.config._attn_implementation == "attention_variant"


def test_unknown_model_type():
    with pytest.raises(ValueError, match="valid model types: bert, opt"):
        model_class("gpt2")


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_every_variant_trains_in_bfloat16(model_type, variant, mode):
    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), variant).train()
    if mode == "bf16_weights":
        model = model.to(torch.bfloat16)
    ids, mask = batch(model_type)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_stock_class_on_our_attention_function_names_the_fix(model_type):
    stock = STOCK[model_type](tiny_config(model_type, attn_implementation="attention_variant"))
    ids, mask = batch(model_type)
    with pytest.raises(ValueError, match="WithVariants"):
        stock(input_ids=ids, attention_mask=mask)
