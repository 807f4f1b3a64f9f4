"""End-to-end runs of run_mlm.main / run_clm.main on tiny models and the local WikiText-2 text."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import VARIANTS, assert_resume_repeats_run, read_log, run_main, text_trainer, train_argv
from transformers_language import AttentionConfig, model_class
from transformers_language.objectives import CausalLMLoss
from transformers_language.training.loop import EpochPermutationSampler

REPO = Path(__file__).resolve().parents[1]

# Method flags for a spread of variants (each maps to an AttentionConfig the saved model must carry).
METHOD_FLAGS = {
    "vanilla": [],
    "clipped": ["--attn_softmax", "clipped(-0.1:1.05)"],
    "alpha": ["--alpha", "3.2"],
    "conditional_per_token": ["--attn_gate_type", "conditional_per_token", "--attn_gate_init", "0.25"],
    "mlp": ["--attn_gate_type", "conditional_per_token", "--attn_gate_mlp"],
    "all_heads_linear": ["--attn_gate_type", "conditional_per_token", "--attn_gate_linear_all_features"],
    "unconditional_per_head": ["--attn_gate_type", "unconditional_per_head", "--attn_gate_init", "0.25"],
    "conditional_per_head": ["--attn_gate_type", "conditional_per_head"],
    "mlp2": ["--attn_gate_type", "conditional_per_token", "--attn_gate_mlp2"],
    "clipped+gate": ["--attn_softmax", "clipped(-0.03:1.03)", "--attn_gate_type", "conditional_per_token"],
    "skip_attn": ["--skip_attn"],
}


@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_training_writes_loadable_model_and_finite_perplexity(model_type, method, tmp_path, data_cache):
    out = tmp_path / "run"
    results = run_main(model_type, train_argv(model_type, out, data_cache, *METHOD_FLAGS[method]))

    written = json.loads((out / "all_results.json").read_text())
    assert math.isfinite(written["perplexity"]) and written["perplexity"] > 1
    assert written["perplexity"] == pytest.approx(math.exp(written["eval_loss"]))
    assert written["step"] == 4 and len(read_log(out)) == 4
    assert results["perplexity"] == written["perplexity"]
    assert written["settings"]["seq_length"] == 32

    model = model_class(model_type).from_pretrained(out)
    expected = VARIANTS[method] if method != "alpha" else {"alpha": 3.2, "train_seq_length": 32}
    assert model.attention_config == AttentionConfig(**expected)
    assert type(model).__name__ == (
        "BertForMaskedLMWithVariants" if model_type == "bert" else "OPTForCausalLMWithVariants"
    )
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def _losses(out: Path) -> list[float]:
    return [record["loss"] for record in read_log(out)]


def test_resume_gives_identical_losses(model_type, tmp_path, data_cache, monkeypatch):
    extra = ["--checkpointing_steps", "3", "--attn_dropout", "0.1", "--hidden_dropout", "0.1"]
    if model_type == "opt":  # the other sampler: blocks drawn with replacement
        extra.append("--sample_with_replacement")
    assert_resume_repeats_run(text_trainer(model_type, data_cache), tmp_path, monkeypatch, *extra)


def test_samplers_are_functions_of_seed_and_epoch():
    permutation, replacement = EpochPermutationSampler(50, 7), EpochPermutationSampler(50, 7, replacement=True)
    assert sorted(permutation) == list(range(50))  # each block once per epoch
    drawn = list(replacement)
    assert len(drawn) == 50 and len(set(drawn)) < 50 and all(0 <= i < 50 for i in drawn)  # repeats
    assert list(EpochPermutationSampler(50, 7, replacement=True)) == drawn
    replacement.set_epoch(1)
    assert list(replacement) != drawn


def test_gradient_accumulation_matches_large_batch(model_type, tmp_path, data_cache):
    no_dropout = ["--attn_dropout", "0", "--hidden_dropout", "0"]
    big = tmp_path / "big"
    run_main(model_type, train_argv(model_type, big, data_cache, *no_dropout, "--per_device_train_batch_size", "8"))
    small = tmp_path / "small"
    accumulated = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
    run_main(model_type, train_argv(model_type, small, data_cache, *no_dropout, *accumulated))
    assert _losses(small) == pytest.approx(_losses(big), rel=1e-5)
    first, second = load_file(big / "model.safetensors"), load_file(small / "model.safetensors")
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-5)


def test_fine_tuning_with_a_gate_keeps_every_pretrained_weight(model_type, tmp_path, data_cache):
    base = tmp_path / "base"
    run_main(model_type, train_argv(model_type, base, data_cache))
    tuned = tmp_path / "tuned"
    gate = ["--attn_gate_type", "conditional_per_token", "--fine_tuning", "--attn_gate_init", "0.25"]
    argv = train_argv(model_type, tuned, data_cache, *gate, "--learning_rate", "0", steps=1)
    argv[argv.index("--config_path") : argv.index("--config_path") + 2] = ["--model_name_or_path", str(base)]
    argv[argv.index("--tokenizer_name") : argv.index("--tokenizer_name") + 2] = []  # from the checkpoint
    run_main(model_type, argv)

    before, after = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert all(torch.equal(before[key], after[key]) for key in before)
    added = set(after) - set(before)
    assert added and all(".gate." in key for key in added)
    model = model_class(model_type).from_pretrained(tuned)
    assert model.attention_config.fine_tuning and model.attention_config.gate_type == "conditional_per_token"


@pytest.mark.slow
def test_two_processes_train_save_and_match_one_process(tmp_path, data_cache):
    """2 processes x batch 4 see the examples of 1 process x batch 8, so the step losses agree."""
    no_dropout = ["--attn_dropout", "0", "--hidden_dropout", "0"]
    out = tmp_path / "ddp"
    argv = train_argv("opt", out, data_cache, *no_dropout, "--checkpointing_steps", "2")
    # accelerate's own CPU multi-process launcher needs MPI; torchrun starts the same processes, and
    # ACCELERATE_USE_CPU makes Accelerator join them with gloo.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "run_clm.py", *argv]
    env = os.environ | {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["settings"]["num_processes"] == 2 and math.isfinite(results["perplexity"])
    assert (out / "step_4" / "random_states_1.pkl").is_file()
    model_class("opt").from_pretrained(out)
    single = tmp_path / "single"
    run_main("opt", train_argv("opt", single, data_cache, *no_dropout, "--per_device_train_batch_size", "8"))
    assert _losses(out) == pytest.approx(_losses(single), rel=1e-5)


@pytest.mark.slow
def test_accelerate_launch_runs_the_script(tmp_path, data_cache):
    out = tmp_path / "launched"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["run_mlm.py", *train_argv("bert", out, data_cache, steps=2)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Validation: perplexity" in done.stderr
    assert json.loads((out / "all_results.json").read_text())["step"] == 2


# --- bad input -------------------------------------------------------------------------------------------------


def test_missing_file_is_a_clear_error(tmp_path, data_cache):
    argv = train_argv("opt", tmp_path / "run", data_cache)
    argv[argv.index("--train_file") + 1] = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"--train_file .*nope\.txt does not exist"):
        run_main("opt", argv)


def test_unknown_dataset_setup_lists_the_valid_ones(tmp_path, data_cache):
    argv = train_argv("opt", tmp_path / "run", data_cache)
    for flag in ("--train_file", "--validation_file"):
        del argv[argv.index(flag) : argv.index(flag) + 2]
    with pytest.raises(ValueError, match=r"Unknown dataset setup 'wikitext_3'.*wikitext_2, wikitext_103"):
        run_main("opt", [*argv, "--dataset_setup", "wikitext_3"])


@pytest.mark.parametrize(
    ("model_type", "flag"), [("opt", "--max_seq_length"), ("opt", "--mlm_probability"), ("bert", "--block_size")]
)
def test_a_flag_of_the_other_script_is_rejected(model_type, flag, tmp_path, data_cache, capsys):
    with pytest.raises(SystemExit):
        run_main(model_type, [*train_argv(model_type, tmp_path / "run", data_cache), flag, "16"])
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_sequence_longer_than_the_position_table(model_type, tmp_path, data_cache):
    argv = train_argv(model_type, tmp_path / "run", data_cache)
    flag = "--max_seq_length" if model_type == "bert" else "--block_size"
    argv[argv.index(flag) + 1] = "65"
    with pytest.raises(ValueError, match=f"{flag} 65 is longer than the model's position table"):
        run_main(model_type, argv)


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, data_cache, monkeypatch):
    calls = {"n": 0}
    real_forward = CausalLMLoss.forward

    def forward(self, input_ids, labels):
        calls["n"] += 1
        nll = real_forward(self, input_ids, labels)
        return nll * float("nan") if calls["n"] == 3 else nll

    monkeypatch.setattr(CausalLMLoss, "forward", forward)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"Loss is nan at step 3.*step_2"):
        run_main("opt", train_argv("opt", out, data_cache, "--checkpointing_steps", "2", steps=6))
    assert [p.name for p in out.iterdir() if p.name.startswith("step_")] == ["step_2"]
    assert not (out / "all_results.json").exists() and not (out / "model.safetensors").exists()
    state = load_file(out / "step_2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize(
    ("model_type", "flag", "replacement"),
    [
        ("opt", "--max_seq_length", "--block_size"),
        ("bert", "--pad_to_max_length", "nothing is padded"),
        ("opt", "--use_slow_tokenizer", "fast (Rust) tokenizer is always used"),
        ("bert", "--tqdm_update_interval", "TQDM_MININTERVAL"),
    ],
)
def test_a_dropped_flag_of_the_papers_scripts_names_its_replacement(model_type, flag, replacement, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_main(model_type, [*train_argv(model_type, tmp_path / "run", tmp_path), flag, "1"])
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {flag}" in err and f"{flag} of the paper's scripts" in err and replacement in err
