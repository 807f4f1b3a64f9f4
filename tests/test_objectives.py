"""Objectives: masking statistics and determinism, and the loss modules against stock HF losses."""

import pytest
import torch
from datasets import Dataset
from transformers import BertForMaskedLM, OPTForCausalLM

from tests.conftest import VOCAB, tiny_config
from transformers_language import build_model
from transformers_language.objectives import (
    IGNORE_INDEX,
    CausalLMLoss,
    MaskedLMLoss,
    Masking,
    get_objective,
    mask_eval_dataset,
)

MASKING = Masking(probability=0.15, mask_token_id=4, vocab_size=VOCAB, special_ids=(0, 1, 2))


def test_masking_is_80_10_10_and_never_touches_special_tokens():
    ids = torch.randint(5, VOCAB, (400, 512), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 1, 2
    inputs, labels = MASKING({"input_ids": ids}, torch.Generator().manual_seed(1))
    selected = labels != IGNORE_INDEX
    assert selected.float().mean().item() == pytest.approx(0.15 * 510 / 512, abs=0.002)
    assert not selected[:, 0].any() and not selected[:, -1].any()
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(inputs[~selected], ids[~selected])
    masked = (inputs[selected] == 4).float().mean().item()
    unchanged = (inputs[selected] == ids[selected]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.01)
    assert unchanged == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.01)  # a random token may equal the original


def test_eval_masks_are_fixed_by_the_seed():
    ids = torch.randint(5, VOCAB, (3000, 16), generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    first, again = mask_eval_dataset(dataset, MASKING, seed=7), mask_eval_dataset(dataset, MASKING, seed=7)
    other = mask_eval_dataset(dataset, MASKING, seed=8)
    assert torch.equal(first[:]["labels"], again[:]["labels"]) and torch.equal(
        first[:]["input_ids"], again[:]["input_ids"]
    )
    assert not torch.equal(first[:]["labels"], other[:]["labels"])
    # chunks get their own streams: the masks of later chunks differ from the first chunk's
    assert not torch.equal(first[:]["labels"][:1000] != IGNORE_INDEX, first[:]["labels"][1024:2024] != IGNORE_INDEX)


def test_masked_lm_loss_equals_stock_hf_loss_on_masked_positions():
    torch.manual_seed(0)
    config = tiny_config("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours = build_model(config).eval()
    stock = BertForMaskedLM(tiny_config("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    stock.load_state_dict(ours.state_dict(), strict=False)
    ids = torch.randint(5, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    inputs, labels = MASKING({"input_ids": ids}, torch.Generator().manual_seed(3))
    nll_sum = MaskedLMLoss(ours)(inputs, labels)
    count = get_objective("mlm").count_targets(labels)
    torch.testing.assert_close(nll_sum / count, stock(input_ids=inputs, labels=labels).loss)


def test_causal_lm_loss_equals_stock_hf_loss():
    torch.manual_seed(0)
    ours = build_model(tiny_config("opt", dropout=0.0)).eval()
    stock = OPTForCausalLM(tiny_config("opt", dropout=0.0)).eval()
    stock.load_state_dict(ours.state_dict(), strict=False)
    ids = torch.randint(3, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    nll_sum = CausalLMLoss(ours)(ids, ids)
    count = get_objective("clm").count_targets(ids)
    assert count == 3 * 19
    torch.testing.assert_close(nll_sum / count, stock(input_ids=ids, labels=ids).loss)


def test_unknown_objective_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid objectives: mlm, clm"):
        get_objective("seq2seq")
