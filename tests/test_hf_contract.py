"""HF's model contract for our classes: attention weights come back whenever they are asked for (per call,
through the config, in `generate`), for every family and for variants that normally run fused, and equal the
weights the explicit path computes; with a static cache they have one column per cache slot, as HF's eager
path gives them."""

import pytest
import torch
from transformers import OPTForCausalLM

from transformers_language import AttentionConfig, build_model, model_class

from .conftest import VARIANTS, batch, tiny_config
from .test_vit_models import images, tiny_vit_config

FUSED_BY_DEFAULT = ("vanilla", "conditional_per_token", "softmax1")


def _tiny(family: str, name: str):
    torch.manual_seed(0)
    config = tiny_vit_config() if family == "vit" else tiny_config(family)
    return build_model(config, AttentionConfig(**VARIANTS[name])).eval()


def _inputs(family: str) -> dict:
    if family == "vit":
        return {"pixel_values": images()}
    ids, mask = batch(family)
    return {"input_ids": ids, "attention_mask": mask}


def _explicit_probs(model, inputs: dict) -> list[torch.Tensor]:
    """The probabilities the explicit path computes, read at every layer's `probs` point (a hook there forces
    that path)."""
    seen = []
    hooks = [v.probs.register_forward_hook(lambda m, i, o: seen.append(o)) for v in model.attention_variants().values()]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("name", FUSED_BY_DEFAULT)
@pytest.mark.parametrize("family", ["bert", "opt", "vit"])
def test_per_call_output_attentions_returns_the_explicit_weights(family, name):
    model, inputs = _tiny(family, name), _inputs(family)
    assert next(iter(model.attention_variants().values())).uses_fused_path()
    expected = _explicit_probs(model, inputs)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    assert attentions is not None and len(attentions) == 2
    for got, want in zip(attentions, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", FUSED_BY_DEFAULT)
@pytest.mark.parametrize("family", ["bert", "opt", "vit"])
def test_config_output_attentions_returns_the_explicit_weights(family, name, tmp_path):
    _tiny(family, name).save_pretrained(tmp_path)
    model = model_class(family).from_pretrained(tmp_path, output_attentions=True).eval()
    inputs = _inputs(family)
    expected = _explicit_probs(model, inputs)
    with torch.no_grad():
        attentions = model(**inputs).attentions
    assert attentions is not None and len(attentions) == 2
    for got, want in zip(attentions, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_weights_are_not_computed_when_nobody_asks(model_type):
    """Without a request the fused path runs: no `probs` tensor exists, so no attentions come back."""
    model = _tiny(model_type, "vanilla")
    ids, mask = batch(model_type)
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).attentions is None


def _generate(model, ids, cache: str):
    return model.generate(
        ids,
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        output_attentions=True,
        return_dict_in_generate=True,
        cache_implementation=cache,
    )


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", FUSED_BY_DEFAULT)
def test_opt_generate_returns_attentions_shaped_and_valued_as_hf_eager(name, cache):
    ours = _tiny("opt", name)
    ids = torch.randint(3, 90, (1, 5), generator=torch.Generator().manual_seed(1))
    out = _generate(ours, ids, cache)
    stock = OPTForCausalLM(tiny_config("opt", attn_implementation="eager")).eval()
    stock.load_state_dict(ours.state_dict(), strict=False)  # the variant's own parameters stay ours alone
    expected = _generate(stock, ids, cache)
    assert len(out.attentions) == len(expected.attentions) == 3  # the prompt pass and two new tokens
    for ours_step, stock_step in zip(out.attentions, expected.attentions, strict=True):
        assert len(ours_step) == len(stock_step) == 2
        for got, want in zip(ours_step, stock_step, strict=True):
            assert got.shape == want.shape  # static cache: one column per cache slot
            rows = got.sum(-1)  # probabilities over the keys (softmax1: the null key takes the rest)
            assert ((rows > 0) & (rows <= 1 + 1e-5)).all()
            if name == "vanilla":
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if name == "vanilla":
        assert torch.equal(out.sequences, expected.sequences)
