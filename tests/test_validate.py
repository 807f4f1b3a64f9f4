"""validate_mlm.py / validate_clm.py end to end on tiny trained checkpoints: results, log lines, plots,
reproducibility, several processes, and bad input."""

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TRAIN_TEXT, VALID_TEXT, run_main, train_argv

REPO = Path(__file__).resolve().parents[1]
METHOD = {
    "bert": ["--attn_softmax", "clipped(-0.025:1)"],
    "opt": ["--attn_gate_type", "conditional_per_token", "--attn_gate_init", "0.25"],
}
HEADLINES = {
    "bert": {
        "max_ffn_output_inf_norm": "max FFN output inf norm",
        "max_ffn_residual_sum_inf_norm": "max FFN input + output inf norm",
        "max_ffn_layernorm_inf_norm": "max LN(FFN i + o) inf norm",
        "avg_kurtosis": "Avg Kurtosis",
        "max_kurtosis": "Max Kurtosis",
    },
    "opt": {
        "max_inf_norm": "Max inf norm",
        "max_ffn_inf_norm": "Max FFN inf norm",
        "max_layer_inf_norm": "Max layer inf norm",
        "avg_kurtosis": "Avg Kurtosis",
        "max_kurtosis": "Max Kurtosis",
        "max_kurtosis_layers": "Max Kurtosis layers",
    },
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data_cache) -> dict[str, Path]:
    """A tiny BERT (clipped softmax) and OPT (gated) checkpoint, trained for a few steps."""
    root = tmp_path_factory.mktemp("checkpoints")
    for model_type in ("bert", "opt"):
        run_main(model_type, train_argv(model_type, root / model_type, data_cache, *METHOD[model_type]))
    return {model_type: root / model_type for model_type in ("bert", "opt")}


def validate_argv(model_type: str, checkpoint: Path, output_dir: Path, data_cache: Path, *extra: str) -> list[str]:
    seq_flag = "--max_seq_length" if model_type == "bert" else "--block_size"
    return [
        "--model_name_or_path", str(checkpoint),
        "--validation_file", str(VALID_TEXT),
        "--validation_percentage", "5",
        seq_flag, "32",
        "--per_device_eval_batch_size", "16",
        "--data_cache_dir", str(data_cache),
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def run_validate(model_type: str, argv: list[str]) -> dict:
    import validate_clm
    import validate_mlm

    return (validate_mlm if model_type == "bert" else validate_clm).main(argv)


def _numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


def test_validation_writes_every_figure(model_type, checkpoints, tmp_path, data_cache, caplog):
    out = tmp_path / "val"
    argv = validate_argv(model_type, checkpoints[model_type], out, data_cache, *METHOD[model_type], "--plot")
    with caplog.at_level(logging.INFO):
        returned = run_validate(model_type, argv)
    results = json.loads((out / "all_results.json").read_text())
    settings = results.pop("settings")
    assert results == json.loads(json.dumps(returned))
    assert all(math.isfinite(v) for v in _numbers(results))

    # The perplexity of the training run's own evaluation (same blocks, same masks of seed 42).
    trained = json.loads((checkpoints[model_type] / "all_results.json").read_text())
    assert results["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-4)
    assert results["perplexity_mean_of_batch_losses"] > 1 and results["eval_tokens"] > 0

    messages = [record.getMessage() for record in caplog.records]
    for key, label in HEADLINES[model_type].items():
        assert any(m.startswith(f"{label}: ") for m in messages), label
        assert results[key] >= 0
    assert any(m.startswith("perplexity: ") for m in messages)
    assert results["max_abs_activation"] >= max(r["inf_norm"] for r in results["activations"].values())

    layers = 2
    assert len(results["activations"]) == (3 * layers if model_type == "bert" else 5 * layers + 1)
    for record in results["activations"].values():
        assert record["kurtosis"] > 1 and record["sequences"] == settings["validation_blocks"]
        assert len(record["top_dims"]) == 5 and record["top_tokens"]
        assert all(isinstance(t["token"], str) and t["token"] for t in record["top_tokens"])
    attention = results["attention"]
    assert sorted(attention) == ["layer_0", "layer_1"]
    # BERT: clipped softmax (exact zeros, rows that need not sum to 1); OPT: gated.
    expected = {"first_token_mass", "sink_ratio", "delimiter_mass"} | (
        {"gate_mean"} if model_type == "opt" else {"exact_zero_fraction", "row_sum"}
    )
    assert all(set(figures) == expected and len(figures["first_token_mass"]) == 4 for figures in attention.values())

    assert settings["attention"]["gate_type" if model_type == "opt" else "softmax"] != "none"
    assert settings["kurtosis"].startswith("Pearson") and settings["validation_blocks"] > 0
    for name in ("inf_norm_per_layer.png", "kurtosis_per_layer.png", "outlier_dims.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))


def test_same_seed_same_results_and_kurtosis_batches(checkpoints, tmp_path, data_cache):
    ckpt = checkpoints["bert"]
    first = run_validate("bert", validate_argv("bert", ckpt, tmp_path / "a", data_cache, "--seed", "7"))
    again = run_validate("bert", validate_argv("bert", ckpt, tmp_path / "b", data_cache, "--seed", "7"))
    assert first == again  # masks included: identical perplexity and statistics
    other = run_validate("bert", validate_argv("bert", ckpt, tmp_path / "c", data_cache, "--seed", "8"))
    assert other["perplexity"] != first["perplexity"]  # other masks

    limited = run_validate(
        "bert",
        validate_argv("bert", ckpt, tmp_path / "d", data_cache, "--seed", "7", "--kurtosis_max_batches", "1"),
    )
    for name, record in limited["activations"].items():
        assert record["kurtosis_sequences"] == 16 < first["activations"][name]["kurtosis_sequences"]
        assert record["inf_norm"] == first["activations"][name]["inf_norm"]  # inf-norms still see every batch


@pytest.mark.slow
def test_two_processes_match_one(checkpoints, tmp_path, data_cache):
    """Each process evaluates its own shard; the one sync gives the single-process figures."""
    single = run_validate("opt", validate_argv("opt", checkpoints["opt"], tmp_path / "one", data_cache))
    out = tmp_path / "two"
    argv = validate_argv("opt", checkpoints["opt"], out, data_cache)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "validate_clm.py", *argv]
    env = os.environ | {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    double = json.loads((out / "all_results.json").read_text())
    assert double["settings"]["num_processes"] == 2
    assert double["perplexity"] == pytest.approx(single["perplexity"], rel=1e-6)
    assert double["eval_tokens"] == single["eval_tokens"]
    for key in HEADLINES["opt"]:
        assert double[key] == pytest.approx(single[key], rel=1e-5)
    for name, record in single["activations"].items():
        assert double["activations"][name]["outliers"] == record["outliers"]
        assert double["activations"][name]["sequences"] == record["sequences"]
        assert double["activations"][name]["inf_norm_max"] == pytest.approx(record["inf_norm_max"])
    for layer, figures in single["attention"].items():
        assert double["attention"][layer]["gate_mean"] == pytest.approx(figures["gate_mean"], rel=1e-5)


# --- bad input -------------------------------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path, data_cache):
    out = tmp_path / "val"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_validate("opt", validate_argv("opt", tmp_path / "nowhere", out, data_cache))
    assert not out.exists()


def test_checkpoint_of_the_other_model_type(checkpoints, tmp_path, data_cache):
    with pytest.raises(ValueError, match=r"'opt' model.*validate_mlm\.py evaluates 'bert'.*use validate_clm\.py"):
        run_validate("bert", validate_argv("bert", checkpoints["opt"], tmp_path / "val", data_cache))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--attn_softmax", "clipped(-0.025:1)"], r"--attn_softmax 'clipped\(-0.025:1\)' but .* has softmax 'vanilla'"),
        (
            ["--attn_gate_type", "conditional_per_token", "--attn_gate_init", "0.5"],
            r"--attn_gate_init gives init_prob=0.5 but .* has init_prob=0.25",
        ),
        (
            ["--attn_gate_type", "conditional_per_head"],
            r"gate_type='conditional_per_head' but .*'conditional_per_token'",
        ),
        (["--alpha", "4"], r"--alpha 4 but .* has softmax 'vanilla'"),
    ],
)
def test_a_method_flag_that_contradicts_the_checkpoint(checkpoints, tmp_path, data_cache, flags, message):
    out = tmp_path / "val"
    with pytest.raises(ValueError, match=message):
        run_validate("opt", validate_argv("opt", checkpoints["opt"], out, data_cache, *flags))
    assert not (out / "all_results.json").exists()


def copy_files(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    """A copy of a checkpoint's files (not its subfolders), without those named in `skip`."""
    target.mkdir()
    for item in source.iterdir():
        if item.is_file() and item.name not in skip:
            (target / item.name).write_bytes(item.read_bytes())
    return target


def test_checkpoint_whose_weights_do_not_match_its_config(checkpoints, tmp_path, data_cache):
    """A config.json that names a gate over weights without one must not evaluate a freshly initialised gate."""
    broken = copy_files(checkpoints["bert"], tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["attention_variant"] |= {"gate_type": "conditional_per_token"}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match its config\.json \(missing weights"):
        run_validate("bert", validate_argv("bert", broken, tmp_path / "val", data_cache))


def test_sequence_longer_than_the_position_table(checkpoints, tmp_path, data_cache):
    argv = validate_argv("opt", checkpoints["opt"], tmp_path / "val", data_cache)
    argv[argv.index("--block_size") + 1] = "128"
    with pytest.raises(ValueError, match=r"--block_size 128 is longer than the model's position table"):
        run_validate("opt", argv)


# --- W8A8 ------------------------------------------------------------------------------------------------------

PAPER_W8A8 = {
    "bert": ["--quantize", "--est_num_batches", "2", "--n_bits", "8", "--n_bits_act", "8"],
    "opt": ["--quantize", "--est_num_batches", "2", "--n_bits", "8", "--n_bits_act", "8", "--ranges_weights", "MSE"],
}
CALIBRATION_DATA = ["--train_file", str(TRAIN_TEXT), "--train_percentage", "10"]


def test_w8a8_validation_reports_every_figure(model_type, checkpoints, tmp_path, data_cache):
    extra = [*PAPER_W8A8[model_type], *CALIBRATION_DATA, "--qmethod_acts", "asymmetric_uniform"]
    extra += ["--ranges_acts", "running_minmax", "--percentile", "99.999", "--quant_setup", "fp32_head"]
    fp = run_validate(model_type, validate_argv(model_type, checkpoints[model_type], tmp_path / "fp", data_cache))
    out = tmp_path / "w8a8"
    w8a8 = run_validate(model_type, validate_argv(model_type, checkpoints[model_type], out, data_cache, *extra))
    results = json.loads((out / "all_results.json").read_text())
    setup = results["settings"]["quantization"]
    assert setup["n_bits"] == setup["n_bits_act"] == 8 and setup["quant_setup"] == "fp32_head"
    assert setup["percentile"] == 99.999 and setup["preset"]["quantize_head"] is False
    assert w8a8["eval_tokens"] == fp["eval_tokens"]  # the same masked set
    assert math.isfinite(w8a8["perplexity"]) and w8a8["perplexity"] != fp["perplexity"]
    assert set(w8a8["activations"]) == set(fp["activations"])  # outlier statistics of the quantized model
    for key in HEADLINES[model_type]:
        assert math.isfinite(w8a8[key])


def test_w16a16_perplexity_is_within_a_tenth_of_a_percent_of_fp(model_type, checkpoints, tmp_path, data_cache):
    """Also shows that FP and quantized evaluation score the identical masks."""
    ckpt = checkpoints[model_type]
    fp = run_validate(model_type, validate_argv(model_type, ckpt, tmp_path / "fp", data_cache))
    extra = ["--quantize", "--n_bits", "16", "--n_bits_act", "16", "--quant_setup", "all", *CALIBRATION_DATA]
    w16 = run_validate(model_type, validate_argv(model_type, ckpt, tmp_path / "w16", data_cache, *extra))
    assert w16["perplexity"] == pytest.approx(fp["perplexity"], rel=1e-3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n_bits", "4"], r"--n_bits configure the W8A8 simulation: add --quantize"),
        (CALIBRATION_DATA, r"--train_file, --train_percentage only choose calibration data"),
        (["--quantize", "--quant_setup", "fp16_head", *CALIBRATION_DATA], r"valid presets: all, fp32_head"),
        (["--quantize", "--ranges_acts", "L_inf", *CALIBRATION_DATA], r"valid estimators"),
        (["--quantize", "--n_bits_act", "32", *CALIBRATION_DATA], r"valid bit widths: 2\.\.16"),
    ],
)
def test_bad_quantization_flags(checkpoints, tmp_path, data_cache, flags, message):
    with pytest.raises(ValueError, match=message):
        run_validate("opt", validate_argv("opt", checkpoints["opt"], tmp_path / "val", data_cache, *flags))


# The four validation commands of the paper's README, flag for flag (paths are placeholders).
PAPER_COMMANDS = {
    ("bert", "fp"): "--seed 1000 --dataset_setup bookcorpus_and_wiki --preprocessing_num_workers 8 --model_type bert "
    "--max_seq_length 128 --mlm_probability 0.15 --per_device_eval_batch_size 32 --data_cache_dir D "
    "--model_cache_dir M --model_name_or_path C --output_dir O --attn_softmax clipped(-.025:1)",
    ("bert", "w8a8"): "--quantize --est_num_batches 16 --seed 2000 --dataset_setup bookcorpus_and_wiki "
    "--preprocessing_num_workers 8 --model_type bert --max_seq_length 128 --mlm_probability 0.15 "
    "--per_device_eval_batch_size 32 --data_cache_dir D --model_cache_dir M --model_name_or_path C --output_dir O",
    ("opt", "fp"): "--seed 1000 --dataset_setup bookcorpus_and_wiki --preprocessing_num_workers 4 --model_type opt "
    "--block_size 512 --per_device_eval_batch_size 4 --data_cache_dir D --model_cache_dir M --model_name_or_path C "
    "--output_dir O",
    (
        "opt",
        "w8a8",
    ): "--quantize --quant_setup fp32_head --ranges_acts running_minmax --qmethod_acts asymmetric_uniform "
    "--percentile 99.999 --est_num_batches 4 --seed 2000 --dataset_setup bookcorpus_and_wiki "
    "--preprocessing_num_workers 4 --model_type opt --block_size 512 --per_device_eval_batch_size 1 "
    "--data_cache_dir D --model_cache_dir M --model_name_or_path C --output_dir O",
}


@pytest.mark.parametrize("model_type, kind", sorted(PAPER_COMMANDS))
def test_the_paper_readme_commands_parse(model_type, kind):
    from transformers_language.families import get_family
    from transformers_language.jobs.validate import build_parser
    from transformers_language.objectives import get_objective
    from transformers_language.ptq.quant_args import quant_config_from_args

    objective = get_objective("mlm" if model_type == "bert" else "clm")
    flags = build_parser(objective).parse(PAPER_COMMANDS[model_type, kind].split())
    config = quant_config_from_args(flags.quantization, get_family(model_type))
    assert (config is not None) == (kind == "w8a8")
    if config is not None and model_type == "opt":
        assert config.percentile == 99.999 and config.quant_setup == "fp32_head"


# What the paper's code ran for each W8A8 command (quantization.md; calibration on the training split, where
# the paper's BERT used the validation loader: quantization.md asks not to copy that).
PAPER_PROTOCOL = {
    "bert": {"ranges_weights": "minmax", "ranges_acts": "running_minmax", "percentile": None,
             "quant_setup": "fp32_head", "calibration_inputs": "quantized", "calibration_split": "train",
             "calibration_batch_size": 8, "calibration_sequences": 16 * 8},
    # 4 shuffled training batches of the training batch size (8), percentiles as numpy.percentile computes them.
    "opt": {"ranges_weights": "MSE", "ranges_acts": "running_minmax", "percentile": 99.999,
            "percentile_interpolation": "linear", "qmethod_acts": "asymmetric_uniform", "quant_setup": "fp32_head",
            "calibration_inputs": "quantized", "calibration_split": "train", "calibration_batch_size": 8,
            "calibration_sequences": 4 * 8},
}  # fmt: skip


@pytest.mark.parametrize("model_type, kind", sorted(PAPER_COMMANDS))
def test_the_paper_readme_commands_resolve_to_the_papers_protocol(model_type, kind, checkpoints, tmp_path, capsys):
    """Verbatim (the checkpoint and folders filled in), each command's --dry_run shows the paper's protocol."""
    argv = PAPER_COMMANDS[model_type, kind].split()
    for flag, value in (("--model_name_or_path", checkpoints[model_type]), ("--output_dir", tmp_path / "out")):
        argv[argv.index(flag) + 1] = str(value)
    seq_flag = "--max_seq_length" if model_type == "bert" else "--block_size"
    argv[argv.index(seq_flag) + 1] = "32"  # the tiny checkpoint's positions
    capsys.readouterr()
    summary = run_validate(model_type, [*argv, "--dry_run"])
    assert json.loads(capsys.readouterr().out)["quantization"] == summary["quantization"]
    if kind == "fp":
        assert summary["quantization"] is None
        return
    for key, value in PAPER_PROTOCOL[model_type].items():
        assert summary["quantization"][key] == value, key


def _settings(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())["settings"]


@pytest.mark.parametrize("model_type", ["bert", "opt"])
def test_validation_uses_the_layout_the_checkpoint_was_trained_with(model_type, tmp_path, data_cache):
    run = tmp_path / "run"
    run_main(model_type, train_argv(model_type, run, data_cache, "--block_layout", "bos_first", steps=2))
    assert json.loads((run / "block_layout.json").read_text()) == {"block_layout": "bos_first"}
    assert json.loads((run / "run_settings.json").read_text())["block_layout"] == "bos_first"
    recorded = run_validate(model_type, validate_argv(model_type, run, tmp_path / "a", data_cache))
    settings = _settings(tmp_path / "a")
    assert settings["block_layout"] == "bos_first" and "block_layout.json" in settings["block_layout_source"]
    flag = ["--block_layout", "stream"]
    overridden = run_validate(model_type, validate_argv(model_type, run, tmp_path / "b", data_cache, *flag))
    assert _settings(tmp_path / "b")["block_layout"] == "stream"
    assert _settings(tmp_path / "b")["block_layout_source"] == "--block_layout"
    assert overridden["perplexity"] != recorded["perplexity"]  # other blocks


def test_a_model_without_a_layout_record_is_validated_on_stream_blocks(checkpoints, tmp_path, data_cache):
    checkpoint = copy_files(checkpoints["opt"], tmp_path / "copy", skip=("block_layout.json",))
    run_validate("opt", validate_argv("opt", checkpoint, tmp_path / "eval", data_cache))
    assert _settings(tmp_path / "eval")["block_layout"] == "stream"


def test_corrupt_layout_record_is_a_clear_error(checkpoints, tmp_path, data_cache):
    checkpoint = copy_files(checkpoints["opt"], tmp_path / "copy")
    (checkpoint / "block_layout.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"block_layout\.json is corrupt .*; pass --block_layout"):
        run_validate("opt", validate_argv("opt", checkpoint, tmp_path / "eval", data_cache))


@pytest.mark.parametrize("model_type", ["bert", "opt"])
def test_a_mid_run_checkpoint_validates_like_the_final_model(model_type, tmp_path, data_cache):
    run = tmp_path / "run"
    extra = ["--checkpointing_steps", "2", "--block_layout", "bos_first"]
    run_main(model_type, train_argv(model_type, run, data_cache, *extra, *METHOD[model_type], steps=4))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "block_layout.json"):
        assert (run / "step_2" / name).is_file() and (run / "step_4" / name).is_file()
    mid = run_validate(model_type, validate_argv(model_type, run / "step_2", tmp_path / "mid", data_cache))
    last = run_validate(model_type, validate_argv(model_type, run / "step_4", tmp_path / "last", data_cache))
    final = run_validate(model_type, validate_argv(model_type, run, tmp_path / "final", data_cache))
    assert last["perplexity"] == final["perplexity"]  # the same weights, saved as step_4 and as the final model
    assert mid["perplexity"] != last["perplexity"] and math.isfinite(mid["perplexity"])
    assert _settings(tmp_path / "mid")["block_layout"] == "bos_first"


@pytest.mark.parametrize("quantized", [False, True])
def test_the_dry_run_prints_the_plan_a_validation_executes(model_type, quantized, checkpoints, tmp_path, data_cache):
    extra = [*METHOD[model_type], *(["--quantize", "--est_num_batches", "1", *CALIBRATION_DATA] if quantized else [])]
    argv = validate_argv(model_type, checkpoints[model_type], tmp_path / "val", data_cache, *extra)
    dry = run_validate(model_type, [*argv, "--dry_run"])
    run_validate(model_type, argv)
    executed = json.loads((tmp_path / "val" / "all_results.json").read_text())["settings"]
    assert executed["plan"] == json.loads(json.dumps(dry, default=str))
    assert (dry["quantization"] is not None) == quantized and dry["splits"] == (
        ["train", "validation"] if quantized else ["validation"]
    )
