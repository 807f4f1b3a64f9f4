"""The chunked linear cross-entropy equals F.cross_entropy on materialised logits, value and gradients."""

import pytest
import torch
from torch.nn import functional as F

import transformers_language.objectives.linear_cross_entropy as lce
from tests.conftest import VOCAB, tiny_config
from transformers_language import build_model
from transformers_language.objectives import CausalLMLoss, MaskedLMLoss, Masking


def _inputs(with_bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=gen, requires_grad=True)
    bias = torch.randn(VOCAB, generator=gen, requires_grad=True) if with_bias else None
    targets = torch.randint(VOCAB, (37,), generator=gen)
    targets[[3, 10, 11]] = lce.IGNORE_INDEX
    return hidden, weight, bias, targets


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_elements", [1 << 22, VOCAB * 5])  # one chunk; 8 chunks, the last one short
def test_value_and_gradients_match_cross_entropy(with_bias, chunk_elements, monkeypatch):
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", chunk_elements)
    hidden, weight, bias, targets = _inputs(with_bias)
    ours = lce.linear_cross_entropy_sum(hidden, weight, bias, targets)
    (ours * 0.7).backward()
    ours_grads = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    reference = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    (reference * 0.7).backward()
    torch.testing.assert_close(ours, reference)
    for mine, theirs in zip(ours_grads, [t.grad for t in (hidden, weight, bias) if t is not None], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_no_grad_gives_the_same_value_and_keeps_nothing():
    hidden, weight, bias, targets = _inputs(True)
    with torch.no_grad():
        value = lce.linear_cross_entropy_sum(hidden, weight, bias, targets)
    assert value.grad_fn is None
    torch.testing.assert_close(value, F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum"))


def test_bfloat16_autocast_is_close_to_fp32():
    hidden, weight, bias, targets = _inputs(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = lce.linear_cross_entropy_sum(hidden, weight, bias, targets)
    value.backward()
    assert value.dtype == torch.float32 and weight.grad.dtype == torch.float32
    reference = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    torch.testing.assert_close(value, reference, rtol=2e-2, atol=0.5)


@pytest.mark.parametrize("model_type", ["bert", "opt"])
def test_loss_module_gradients_equal_the_stock_hf_loss(model_type):
    torch.manual_seed(0)
    dropout = (
        {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if model_type == "bert" else {"dropout": 0.0}
    )
    model = build_model(tiny_config(model_type, **dropout))
    ids = torch.randint(5, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    if model_type == "bert":
        inputs, labels = Masking(0.3, 4, VOCAB, (0, 1, 2))({"input_ids": ids}, torch.Generator().manual_seed(2))
        ours = MaskedLMLoss(model)(inputs, labels) / (labels != -100).sum()
    else:
        inputs, labels = ids, ids
        ours = CausalLMLoss(model)(inputs, labels) / (3 * 19)
    ours.backward()
    mine = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(input_ids=inputs, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(mine[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
