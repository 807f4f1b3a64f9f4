"""The Llama family against stock HF: parity (eager and SDPA, logits and cached generation), every variant with
grouped-query attention, checkpoints round-trip, and a stock checkpoint loads unchanged."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from quantization.calibration import calibration
from quantization.config import QuantConfig
from quantization.modules import QuantRMSNorm
from transformers_language import AttentionConfig, build_model, model_class
from transformers_language.errors import UsageError
from transformers_language.models.attention import AttentionVariant
from transformers_language.models.norm_sites import norm_sites
from transformers_language.ptq.equivalent_transforms import apply_transforms
from transformers_language.ptq.quantized_model import quantize_model
from transformers_language.ptq.recipes import BIT_SETTINGS, PTQ_METHODS

from .conftest import TRAIN_TEXT, VALID_TEXT, VARIANTS, batch, run_main, tiny_config, train_argv


def make(seed=0, **attention):
    torch.manual_seed(seed)
    return build_model(tiny_config("llama"), AttentionConfig(**attention)).eval()


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def force_explicit(model):
    return [v.probs.register_forward_hook(lambda *a: None) for v in model.attention_variants().values()]


@pytest.mark.parametrize("left_padding", [False, True])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_vanilla_equals_stock_hf_on_both_paths(implementation, left_padding):
    torch.manual_seed(0)
    stock = LlamaForCausalLM(tiny_config("llama", attn_implementation=implementation)).eval()
    ours = model_class("llama")(tiny_config("llama")).eval()
    ours.load_state_dict(stock.state_dict(), strict=True)
    ids, mask = batch("llama", left_padding=left_padding)
    valid = mask.bool()
    expected = logits(stock, ids, mask)
    for explicit in (False, True):
        hooks = force_explicit(ours) if explicit else []
        torch.testing.assert_close(logits(ours, ids, mask)[valid], expected[valid], rtol=1e-5, atol=1e-5)
        for hook in hooks:
            hook.remove()


def test_cached_generation_equals_stock_hf():
    torch.manual_seed(0)
    stock = LlamaForCausalLM(tiny_config("llama")).eval()
    ours = model_class("llama")(tiny_config("llama")).eval()
    ours.load_state_dict(stock.state_dict(), strict=True)
    prompt = torch.randint(3, 90, (2, 5))
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=1)
    expected = stock.generate(prompt, **options)
    assert torch.equal(ours.generate(prompt, **options), expected)
    assert torch.equal(ours.generate(prompt, use_cache=False, **options), expected)


def test_stock_checkpoint_saved_and_reloaded_through_our_class(tmp_path):
    torch.manual_seed(0)
    stock = LlamaForCausalLM(tiny_config("llama")).eval()
    stock.save_pretrained(tmp_path / "stock")
    ours, info = model_class("llama").from_pretrained(tmp_path / "stock", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = batch("llama")
    torch.testing.assert_close(logits(ours.eval(), ids, mask), logits(stock, ids, mask), rtol=1e-5, atol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, ids, mask), logits(stock, ids, mask), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_round_trips_and_is_causal(tmp_path, name):
    model = make(**VARIANTS[name])
    for module in model.modules():  # non-trivial values in every variant parameter
        if isinstance(module, AttentionVariant):
            for parameter in module.parameters():
                parameter.data.normal_(0, 0.5)
    ids, mask = batch("llama")
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded, info = model_class("llama").from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.attention_config == model.attention_config
    torch.testing.assert_close(logits(loaded.eval(), ids, mask), before, rtol=0, atol=0)
    changed = ids.clone()
    changed[:, 8:] = 5  # a later token never moves an earlier position's logits
    torch.testing.assert_close(logits(model, changed, None)[:, :8], logits(model, ids, None)[:, :8])


@pytest.mark.parametrize("name", ["vanilla", "headwise", "elementwise", "softmax1", "sink", "bias_kv"])
def test_fused_path_equals_explicit_path_and_the_cache_repeats_the_full_forward(name):
    model = make(**VARIANTS[name])
    for module in model.modules():
        if isinstance(module, AttentionVariant):
            for parameter in module.parameters():
                parameter.data.normal_(0, 0.5)
    ids, mask = batch("llama")
    fused = logits(model, ids, mask)
    hooks = force_explicit(model)
    torch.testing.assert_close(logits(model, ids, mask), fused, rtol=1e-5, atol=1e-5)
    for hook in hooks:
        hook.remove()
    prompt = ids[:1, :6]
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=1)
    uncached = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=1, use_cache=False)
    assert torch.equal(generated, uncached)


def test_learned_key_is_per_key_value_head_and_gates_per_query_head():
    model = make(**VARIANTS["sink+bias_kv+elementwise"])
    variant = next(iter(model.attention_variants().values()))
    config = model.config
    assert variant.bias_kv.key.shape == (config.num_key_value_heads, 1, config.hidden_size // 4)
    assert variant.softmax.sink_logit.numel() == config.num_attention_heads
    assert variant.gate.network.proj.out_features == config.hidden_size  # H x d_head gate values per token


def test_every_variant_trains_in_bfloat16_with_gradients_into_its_parameters():
    for name in ("headwise", "softmax1", "bias_kv", "clipped"):
        model = make(**VARIANTS[name]).train()
        ids, _ = batch("llama")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        for parameter in model.parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache) -> Path:
    """A tiny gated (headwise) GQA Llama trained 3 steps by run_llama."""
    run = tmp_path_factory.mktemp("llama") / "run"
    run_main("llama", train_argv("llama", run, data_cache, "--attn_gate_type", "headwise", steps=3))
    return run


def _validation_flags(run: Path, data_cache: Path) -> tuple[list[str], list[str]]:
    """(evaluation flags, calibration flags) of validate_llama on the tiny model."""
    common = ["--model_name_or_path", str(run), "--validation_file", str(VALID_TEXT), "--block_size", "32"]
    common += ["--validation_percentage", "1", "--per_device_eval_batch_size", "16"]
    common += ["--data_cache_dir", str(data_cache)]
    calibration = ["--quantize", "--train_file", str(TRAIN_TEXT), "--train_percentage", "10", "--est_num_batches", "1"]
    return common, calibration


def test_w8a8_end_to_end_through_the_scripts(trained, tmp_path, data_cache):
    """run_llama trained a gated GQA model; validate_llama lists its points and evaluates it FP and W8A8 (with
    SmoothQuant and a 4-bit KV cache) from its saved config; OS+ is refused in one line before loading."""
    import validate_llama

    saved = model_class("llama").from_pretrained(trained)
    assert saved.attention_config.gate_type == "headwise" and saved.config.num_key_value_heads == 2
    common, calibration = _validation_flags(trained, data_cache)
    listing = validate_llama.main([*common, *calibration, "--list_quant_points", "--output_dir", str(tmp_path / "l")])
    names = [point["name"] for point in listing["points"]]
    assert "model.layers.0.mlp.down_proj.input" in names and "model.layers.1.ffn_residual_sum" in names
    assert "model.layers.0.self_attn.attention_variant.keys" in names
    fp = validate_llama.main([*common, "--output_dir", str(tmp_path / "fp")])
    assert fp["max_ffn_product_inf_norm"] > 0 and fp["max_first_token_inf_norm"] > 0
    sites = fp["activations"]
    assert sites["model.layers.0.mlp.down_proj[input]"]["kind"] == "ffn_product"
    kv4 = ["--point_bits", "**.attention_variant.keys=4", "**.v_proj.output=4"]
    quantized = validate_llama.main([*common, *calibration, "--smoothquant", *kv4, "--output_dir", str(tmp_path / "q")])
    written = json.loads((tmp_path / "q" / "all_results.json").read_text())
    assert written["settings"]["quantization"]["points"]["activation 4 bits per_tensor"] == 2 * 2
    assert math.isfinite(quantized["perplexity"]) and quantized["perplexity"] != fp["perplexity"]
    with pytest.raises(UsageError, match=r"--os_plus.*RMSNorm"):
        validate_llama.main([*common, *calibration, "--os_plus", "--output_dir", str(tmp_path / "os")])


@pytest.mark.parametrize("recipe", [name for name in PTQ_METHODS if name != "os_plus"])
def test_every_other_recipe_runs_on_llama_at_w6a6(recipe, trained, tmp_path, data_cache):
    """Per-channel, PEG (on the SwiGLU product too), MP-PTQ, per-token, LLM.int8(), OS and SmoothQuant through
    validate_llama at W6A6: a finite perplexity and the recipe's settings recorded."""
    import validate_llama

    common, calibration = _validation_flags(trained, data_cache)
    flags = [*calibration, *PTQ_METHODS[recipe].flags, "--n_bits", "6", "--n_bits_act", "6"]
    results = validate_llama.main([*common, *flags, "--output_dir", str(tmp_path / recipe)])
    assert math.isfinite(results["perplexity"])
    setup = json.loads((tmp_path / recipe / "all_results.json").read_text())["settings"]["quantization"]
    assert (setup["n_bits"], setup["n_bits_act"]) == (6, 6)
    if recipe == "peg":
        assert setup["points"]["activation 6 bits per_embedding_group(K=6, permuted)"] == 2 * 4
    if recipe == "mp_ptq":
        assert setup["points"]["activation 16 bits per_tensor"] == 2 * 4


TRANSFORM_SETS = [("gamma_migration",), ("smoothquant",), ("gamma_migration", "smoothquant")]
GATED = ["vanilla", "conditional_per_token", "headwise", "elementwise", "sink+bias_kv+elementwise"]


def _wide_norms(model):
    """Random, wide RMSNorm gammas, so no transform is near the identity."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                module.weight.copy_(torch.randn_like(module.weight) * 2)
    return model


@pytest.mark.parametrize("transforms", TRANSFORM_SETS, ids="+".join)
@pytest.mark.parametrize(
    "name", ["vanilla", "conditional_per_token", "headwise", "elementwise", "sink+bias_kv+elementwise"]
)
def test_a_transform_folds_into_rmsnorm_and_readers_leaving_the_float_model_unchanged(tmp_path, name, transforms):
    model = _wide_norms(make(**VARIANTS[name]))
    original = copy.deepcopy(model)
    ids, mask = batch("llama")
    reference = logits(model, ids, mask)
    calibration = [torch.randint(3, 90, (4, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    apply_transforms(model, QuantConfig(transforms=transforms), lambda: calibration)
    changed = logits(model, ids, mask)
    assert float((changed - reference).abs().max() / reference.abs().max()) < 1e-5
    for site in norm_sites(model):  # every RMSNorm of the table moved, and its readers with it
        assert not torch.allclose(model.get_submodule(site.norm).weight, original.get_submodule(site.norm).weight)
        for path in site.linears:
            assert not torch.allclose(model.get_submodule(path).weight, original.get_submodule(path).weight)
    assert {site.norm for site in norm_sites(model)} == {
        f"model.layers.{i}.{norm}" for i in range(2) for norm in ("input_layernorm", "post_attention_layernorm")
    }
    model.save_pretrained(tmp_path)
    reloaded = model_class("llama").from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, ids, mask), changed)


def test_os_plus_is_refused_in_one_line_where_rmsnorm_has_no_bias():
    model = make()
    with pytest.raises(UsageError, match=r"--os_plus .* \(RMSNorm, bias-free Linears\); use --smoothquant"):
        apply_transforms(model, QuantConfig(transforms=("os_plus",)), lambda: [])


def test_the_quantized_rmsnorm_is_the_float_one_and_the_swiglu_product_is_quantized_alone():
    """Off, the W8A8 model is the float model bit for bit; on, the down projection reads the quantized product
    act(gate) * up (the gate's SiLU fused into its Linear), and the KV-cache point sees (B, S, H_kv, d)."""
    reference = make()
    model = copy.deepcopy(reference)
    quantize_model(model, QuantConfig())
    ids, _ = batch("llama")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        with calibration(model):
            model(input_ids=ids)
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, QuantRMSNorm) and isinstance(layer.input_layernorm, LlamaRMSNorm)
    seen = {}
    layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("product", args[0]))
    variant = layer.self_attn.attention_variant
    variant.keys.register_forward_hook(lambda m, args, out: seen.setdefault("keys", out))
    with torch.no_grad():
        model(input_ids=ids)
    product_quantizer = layer.mlp.down_proj.input_quantizer
    assert torch.equal(product_quantizer(seen["product"]), seen["product"])  # already on its grid
    assert len(torch.unique(seen["product"])) <= 256
    assert seen["keys"].shape == (3, 12, 2, 8)
    assert layer.mlp.gate_proj.activation is not None and isinstance(layer.mlp.act_fn, torch.nn.Identity)


@pytest.mark.parametrize("recipe", ["rtn", "gptq", "quarot", "quarot_gptq", "mxfp4"])
def test_the_2024_recipes_run_on_llama_at_w4a4kv4(recipe, trained, tmp_path, data_cache):
    """Rotations (with the online Hadamard on the SwiGLU product and on queries / keys after RoPE), GPTQ and MXFP4
    through validate_llama at W4A4KV4: a finite perplexity, the key cache at 4 bits."""
    import validate_llama

    common, calibration = _validation_flags(trained, data_cache)
    flags = PTQ_METHODS[recipe].validate_flags(BIT_SETTINGS["W4A4KV4"])
    results = validate_llama.main([*common, *calibration, *flags, "--output_dir", str(tmp_path / recipe)])
    assert math.isfinite(results["perplexity"])
    written = json.loads((tmp_path / recipe / "all_results.json").read_text())
    setup = written["settings"]["quantization"]
    if recipe.startswith("quarot"):
        assert written["rotation"]["values_rotated"] is True and setup["quarot"] is True
    if recipe != "mxfp4":
        assert setup["n_bits_kv"] == 4


def test_rotated_llama_checkpoint_evaluates_as_the_float_one(trained, tmp_path, data_cache):
    import validate_llama

    common, calibration = _validation_flags(trained, data_cache)
    fp = validate_llama.main([*common, "--output_dir", str(tmp_path / "fp")])["perplexity"]
    flags = ["--quantize", "--quarot", "--no_weight_quant", "--no_act_quant"]
    rotated = validate_llama.main([*common, *calibration, *flags, "--output_dir", str(tmp_path / "rotated")])
    assert rotated["perplexity"] == pytest.approx(fp, rel=1e-5)
