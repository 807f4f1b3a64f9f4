"""bf16 mixed precision with plain `python run_*.py` / `validate_*.py` (`--mixed_precision bf16`): the training
runs under bf16 autocast with fp32 weights, a resumed bf16 run repeats the uninterrupted one bit for bit, and
validation evaluates the float model under autocast while the W8A8 simulation stays fp32."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_resume_repeats_run, read_log, run_main, text_trainer, train_argv
from tests.test_validate import CALIBRATION_DATA, checkpoints, run_validate, validate_argv  # noqa: F401

BF16 = ("--mixed_precision", "bf16")


def test_a_resumed_bf16_run_repeats_the_straight_one_and_bf16_is_really_used(tmp_path, data_cache, monkeypatch):
    straight = assert_resume_repeats_run(
        text_trainer("opt", data_cache), tmp_path, monkeypatch, *BF16, "--checkpointing_steps", "3"
    )
    settings = json.loads((straight / "run_settings.json").read_text())
    assert settings["mixed_precision"] == "bf16"
    assert all(value.dtype == torch.float32 for value in load_file(straight / "model.safetensors").values())
    fp32 = tmp_path / "fp32"
    run_main("opt", train_argv("opt", fp32, data_cache, "--max_train_steps", "6", "--checkpointing_steps", "3"))
    bf16_losses, fp32_losses = [r["loss"] for r in read_log(straight)], [r["loss"] for r in read_log(fp32)]
    assert bf16_losses != fp32_losses  # autocast changed the arithmetic
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.02)  # and only by bf16 rounding


def test_bf16_validation_evaluates_the_float_model_in_bf16_and_quantizes_in_fp32(checkpoints, tmp_path, data_cache):  # noqa: F811
    def figures(name, *extra):
        out = tmp_path / name
        run_validate("opt", validate_argv("opt", checkpoints["opt"], out, data_cache, *extra))
        return json.loads((out / "all_results.json").read_text())

    fp32, bf16 = figures("fp32"), figures("bf16", *BF16)
    assert bf16["settings"]["mixed_precision"] == "bf16"
    assert bf16["perplexity"] != fp32["perplexity"]
    assert math.isclose(bf16["perplexity"], fp32["perplexity"], rel_tol=0.02)
    quantize = ("--quantize", "--est_num_batches", "2", *CALIBRATION_DATA)
    assert figures("w8a8_bf16", *quantize, *BF16)["perplexity"] == figures("w8a8", *quantize)["perplexity"]
