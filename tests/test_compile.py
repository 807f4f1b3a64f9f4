"""`--torch_compile`: a resumed compiled bf16 run repeats the uninterrupted one (losses and weights bit for bit), its
measured steps run with every statistics hook (growth.jsonl holds every figure of every layer), and a compiled
validation gives the eager one's figures, the zero-out intervention's compiled passes included."""

import json
import math

import pytest

from tests.conftest import assert_resume_repeats_run, text_trainer
from tests.test_validate import checkpoints, run_validate, validate_argv  # noqa: F401
from transformers_language.evaluation.literature_metrics import LAYER_FIGURES

COMPILED = ("--mixed_precision", "bf16", "--torch_compile")
TRACKED = ("--with_tracking", "--extra_tb_stats", "--tb_scalar_log_interval", "2")


def test_a_resumed_compiled_run_repeats_the_straight_one_with_every_hook(tmp_path, data_cache, monkeypatch, caplog):
    caplog.set_level("INFO")
    straight = assert_resume_repeats_run(
        text_trainer("opt", data_cache),
        tmp_path,
        monkeypatch,
        *COMPILED,
        *TRACKED,
        "--checkpointing_steps",
        "3",
    )
    growth = [json.loads(line) for line in (straight / "growth.jsonl").read_text().splitlines()]
    assert [record["step"] for record in growth] == [2, 4, 6]
    for record in growth:  # a hook dropped by compile would leave its figures out
        for key in ("kurtosis", "inf_norm", "first_token_mass", "sink_ratio", *LAYER_FIGURES):
            if key != "max_attention_logit":  # validation only: its hook changes the attention path
                assert len(record[key]) == 2 and all(v is not None for v in record[key]), key
    settings = json.loads((straight / "run_settings.json").read_text())
    assert settings["torch_compile"] is True
    assert "--torch_compile: the steps that log statistics (every 2) run eagerly, so every hook is seen" in caplog.text


def _numbers(value, path=""):
    """Every number of a results tree, by path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{path}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{path}/{i}").items()}
    return {path: value} if isinstance(value, int | float) and not isinstance(value, bool) else {}


def test_a_compiled_validation_gives_the_eager_figures(checkpoints, tmp_path, data_cache, caplog):  # noqa: F811
    """On BERT (bidirectional, padded batches); OPT's compiled graph is the resumed run's above."""
    caplog.set_level("INFO")
    model_type = "bert"

    def figures(name, *extra):
        out = tmp_path / name
        argv = validate_argv(model_type, checkpoints[model_type], out, data_cache, "--zero_out_top_k", "2", *extra)
        run_validate(model_type, argv)
        return json.loads((out / "all_results.json").read_text())

    eager, compiled = figures("eager"), figures("compiled", "--torch_compile")
    assert compiled["settings"]["torch_compile"] is True
    assert "--torch_compile: the statistics pass and W8A8 run eagerly; compiled: the zero-out passes" in caplog.text
    eager_numbers, compiled_numbers = _numbers(eager), _numbers(compiled)
    measured = {k for k in eager_numbers if not k.startswith("/settings")}
    assert measured <= set(compiled_numbers)  # every figure is there
    for key in measured:
        a, b = eager_numbers[key], compiled_numbers[key]
        assert (math.isnan(a) and math.isnan(b)) or b == pytest.approx(a, rel=1e-4, abs=1e-5), key
    assert eager["zero_out"]["zero"]["perplexity"] != eager["perplexity"]  # the intervention changed the model
