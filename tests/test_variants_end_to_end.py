"""The later no-op mechanisms and Muon through the scripts: train a tiny model with the method's flags, reload it
without them, validate FP and W8A8 with every figure; Muon's parameter split and its exact resume."""

import json
import math

import pytest
import torch

from transformers_language import AttentionConfig, build_model
from transformers_language.training.optim import MuonWithAdamW, build_optimizer, muon_parameter_names

from .conftest import assert_resume_repeats_run, read_log, run_main, text_trainer, tiny_config, train_argv
from .test_validate import CALIBRATION_DATA, PAPER_W8A8, run_validate, validate_argv

# Flags, and the attention figures each method's FP validation must report for every layer.
METHODS = {
    "softmax1": (["--attn_softmax", "softmax1"], {"row_sum", "sink_mass"}),
    "clipped_softmax1": (["--attn_softmax", "softmax1", "--alpha", "4"], {"row_sum", "exact_zero_fraction"}),
    "sink": (["--attn_softmax", "sink"], {"row_sum", "sink_mass"}),
    "bias_kv": (["--attn_bias_kv"], {"row_sum", "sink_mass"}),
    "softpick": (["--attn_softmax", "softpick"], {"row_sum", "exact_zero_fraction"}),
    "sigmoid": (["--attn_softmax", "sigmoid"], {"row_sum"}),
    "headwise": (["--attn_gate_type", "headwise"], {"gate_mean"}),
    "elementwise": (["--attn_gate_type", "elementwise"], {"gate_mean"}),
    "muon": (["--optimizer", "muon"], set()),
}
CASES = [("opt", name) for name in METHODS] + [("bert", "sink"), ("bert", "softpick"), ("bert", "elementwise")]
SMALL = ["--validation_percentage", "1"]  # a few blocks: this checks that everything runs and is written


def validate(model_type, run, out, data_cache, *extra):
    return run_validate(model_type, validate_argv(model_type, run, out, data_cache, *SMALL, *extra))


@pytest.mark.parametrize(("model_type", "method"), CASES)
def test_each_method_trains_reloads_and_validates_fp_and_w8a8(model_type, method, tmp_path, data_cache):
    flags, figures = METHODS[method]
    run = tmp_path / "run"
    run_main(model_type, train_argv(model_type, run, data_cache, *flags, steps=2))
    config = json.loads((run / "config.json").read_text())["attention_variant"]
    fp = validate(model_type, run, tmp_path / "fp", data_cache)  # no method flags
    written = json.loads((tmp_path / "fp" / "all_results.json").read_text())
    assert written["perplexity"] == fp["perplexity"] and written["settings"]["attention"] == config
    assert math.isfinite(fp["perplexity"])
    for layer in fp["attention"].values():
        assert figures <= set(layer), (method, sorted(layer))
        assert all(math.isfinite(v) for key in figures for v in layer[key])
    extra = [*PAPER_W8A8[model_type], *CALIBRATION_DATA]
    w8a8 = validate(model_type, run, tmp_path / "w8a8", data_cache, *extra)
    assert math.isfinite(w8a8["perplexity"]) and w8a8["perplexity"] != fp["perplexity"]
    assert set(w8a8["activations"]) == set(fp["activations"])
    if method != "muon":  # the method's flags may be repeated on validation; another method is refused
        validate(model_type, run, tmp_path / "again", data_cache, *flags)
        other = {"--attn_softmax": ["--attn_softmax", "vanilla"], "--attn_bias_kv": ["--attn_softmax", "softpick"]}
        with pytest.raises(ValueError, match="contradict the checkpoint"):
            validate(model_type, run, tmp_path / "bad", data_cache, *other.get(flags[0], ["--attn_gate_type", "none"]))


def test_muon_trains_exactly_the_hidden_matrices(model_type):
    model = build_model(tiny_config(model_type), AttentionConfig(gate_type="elementwise", softmax="sink"))
    names = muon_parameter_names(model)
    layers = model.family.layers_path
    expected = {
        "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"),
        "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    }[model_type]  # fmt: skip
    assert sorted(names) == sorted(f"{layers}.{i}.{path}.weight" for i in range(2) for path in expected)
    optimizer = build_optimizer(model, 1e-3, 0.1, False, (0.9, 0.95), 1e-8, "muon")
    assert isinstance(optimizer, MuonWithAdamW)
    by_id = {id(p): n for n, p in model.named_parameters()}
    on_muon = {by_id[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    on_adamw = {by_id[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert on_muon == set(names) and not on_muon & on_adamw
    assert on_muon | on_adamw == set(by_id.values())  # every parameter is trained, once
    assert all(torch.as_tensor(n.count("embed") + n.count("word_embeddings")) == 0 for n in on_muon)
    assert any("gate" in n for n in on_adamw) and any("sink_logit" in n for n in on_adamw)


def test_muon_learning_rate_needs_muon(tmp_path, data_cache):
    with pytest.raises(ValueError, match="add --optimizer muon"):
        run_main("opt", train_argv("opt", tmp_path / "run", data_cache, "--muon_learning_rate", "0.02"))


def test_muon_resume_repeats_the_uninterrupted_run(tmp_path, data_cache, monkeypatch):
    extra = ["--optimizer", "muon", "--muon_learning_rate", "0.01", "--checkpointing_steps", "3"]
    extra += ["--attn_gate_type", "headwise", "--sample_with_replacement"]
    straight = assert_resume_repeats_run(text_trainer("opt", data_cache), tmp_path, monkeypatch, *extra)
    adamw_only = tmp_path / "adamw"
    run_main("opt", train_argv("opt", adamw_only, data_cache, *extra[4:], steps=6))
    assert [r["loss"] for r in read_log(adamw_only)][1:] != [r["loss"] for r in read_log(straight)][1:]
