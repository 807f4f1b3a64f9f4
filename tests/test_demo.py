"""The demo end to end in a reduced mode: two methods trained for a few steps on bos_first blocks, validated
FP and W8A8, and the side-by-side table printed and written with the comparison and growth plots; then
`--resume` with more methods reads finished ones back and continues an interrupted training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_prints_the_comparison_table(tmp_path):
    output_dir = tmp_path / "demo"
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--output_dir", str(output_dir)]
    command += ["--max_train_steps", "2", "--validation_percentage", "1", "--est_num_batches", "1"]
    command += ["--checkpointing_steps", "2", "--train_percentage", "1", "--zero_out_top_k", "2"]
    command += ["--adam_beta2", "0.98"]  # (the --full size's default is 0.999, the knob study's finding)
    # fp32: a CPU without bf16 instructions (AVX2 only) emulates bf16 autocast 5-50x slower; bf16 being the demo's
    # default is checked apart, and the training script's bf16 path by test_mixed_precision.
    command += ["--mixed_precision", "no"]
    methods = ["vanilla", "gated_attention"]  # two of the three defaults (the defaults: the last test)
    env = os.environ | {"OFT_SHARED": str(SHARED), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    result = subprocess.run(
        [*command, "--methods", *methods], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert sorted(summary["methods"]) == sorted(methods) and summary["settings"]["max_train_steps"] == 2
    table = (output_dir / "summary.md").read_text()
    assert table in result.stdout
    header = (
        "| method | FP ppl | W8A8 ppl | W8A8 gap | WikiText-2 ppl | max inf-norm | top-1 / median | Sink^0.3 "
        "| max attn logit | zero-out ppl (zero / mean) | avg kurtosis | residual kurtosis per layer "
    )
    assert table.startswith(header + "| sink ratio per layer |")
    assert summary["settings"]["mixed_precision"] == "no" and summary["settings"]["torch_compile"] is False
    for method in methods:
        row = summary["methods"][method]
        assert len(row["per_layer"]["kurtosis"]) == len(row["per_layer"]["sink_ratio"]) == 4  # OPT-small's layers
        line = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        assert f"| {row['fp_perplexity']:.2f} | {row['w8a8_perplexity']:.2f} |" in line
        second = json.loads((output_dir / method / "eval-second" / "all_results.json").read_text())
        assert f"| {second['perplexity']:.2f} |" in line and "wikitext-2" in second["settings"]["validation_file"]
        assert f"| {row['zero_out']['zero']:.2f} / {row['zero_out']['mean']:.2f} |" in line
        assert line.endswith(f"| {' / '.join(f'{v:.1f}' for v in row['per_layer']['sink_ratio'])} |")
        assert [record["step"] for record in row["growth"]] == [2]  # logged at the run's last step
        assert len(row["growth"][0]["kurtosis"]) == len(row["growth"][0]["sink_ratio"]) == 4
        fp = json.loads((output_dir / method / "eval-fp" / "all_results.json").read_text())
        w8a8 = json.loads((output_dir / method / "eval-w8a8" / "all_results.json").read_text())
        assert fp["perplexity"] == row["fp_perplexity"] and w8a8["perplexity"] == row["w8a8_perplexity"]
        assert "enwiki-slice" in fp["settings"]["validation_file"] and fp["sink_percent"] == row["sink_percent"]
        assert len(row["growth"][0]["top1_median"]) == len(fp["literature"]["channel_kurtosis"]) == 4
        assert w8a8["settings"]["quantization"]["ranges_weights"] == "MSE"
        assert json.loads((output_dir / method / "run_settings.json").read_text())["adam_beta2"] == 0.98
        assert fp["settings"]["block_layout"] == w8a8["settings"]["block_layout"] == "bos_first"  # the checkpoint's
        assert (output_dir / method / "eval-fp" / "kurtosis_per_layer.png").stat().st_size > 0
    assert (output_dir / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert (output_dir / "growth.png").read_bytes()[:4] == b"\x89PNG"
    assert "=== [8/8]" in result.stdout

    # Resume with another method: vanilla is read back; gated attention, marked as interrupted after its last
    # checkpoint, continues from it; softpick is trained.
    record = output_dir / "gated_attention" / "demo_stages.json"
    record.write_text(json.dumps(json.loads(record.read_text()) | {"finished": False}))
    # A run recorded without the checkpointing flags (they change no result) still counts as finished.
    record = output_dir / "vanilla" / "demo_stages.json"
    stages = json.loads(record.read_text())["stages"]
    at = stages[0].index("--checkpointing_steps")
    del stages[0][at : at + 2]
    record.write_text(json.dumps({"stages": stages, "finished": True}))
    extra = [*methods, "softpick"]
    resumed = subprocess.run([*command, "--resume", "--methods", *extra], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "=== vanilla: finished earlier with these flags" in resumed.stdout
    assert "=== gated_attention: continuing the interrupted training" in resumed.stdout
    assert "Resumed at step 2 of 2" in resumed.stderr
    assert "pre-train OPT-small, softpick" in resumed.stdout
    combined = json.loads((output_dir / "summary.json").read_text())["methods"]
    assert sorted(combined) == sorted(extra)
    assert combined["vanilla"]["fp_perplexity"] == summary["methods"]["vanilla"]["fp_perplexity"]
    figures = json.loads((output_dir / "softpick" / "eval-fp" / "all_results.json").read_text())["attention"]
    assert "exact_zero_fraction" in figures["layer_0"] and "row_sum" in figures["layer_0"]

    # Run again into the same folder as another table (a knob of the study beside vanilla): the demo replaces its
    # own earlier runs (training alone would refuse them), the knob's flag wins over the demo's setting, and the
    # table goes to its own files, leaving the demo's summary as it was.
    summary_before = (output_dir / "summary.md").read_text()
    again = [*command, "--table", "knobs", "--methods", "vanilla", "weight_decay_0.5"]
    again = subprocess.run(again, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Replacing the earlier demo run in {output_dir / 'vanilla'}" in again.stdout
    knobs = json.loads((output_dir / "knobs.json").read_text())["methods"]
    assert list(knobs) == ["vanilla", "weight_decay_0.5"] and (output_dir / "knobs.md").read_text() in again.stdout
    assert (output_dir / "knobs-growth.png").read_bytes()[:4] == b"\x89PNG"
    for method, decay in (("vanilla", 0.1), ("weight_decay_0.5", 0.5)):
        assert json.loads((output_dir / method / "all_results.json").read_text())["settings"]["weight_decay"] == decay
    assert (output_dir / "summary.md").read_text() == summary_before


@pytest.mark.slow
def test_the_demo_trains_llama_small_with_its_figures(tmp_path):
    """`--family llama`: Llama-small through run_llama / validate_llama, the same table, and Llama's own figures
    (the SwiGLU product's max, the first token's and the later tokens') in summary.json."""
    output_dir = tmp_path / "demo-llama"
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--family", "llama", "--output_dir", str(output_dir)]
    command += ["--max_train_steps", "2", "--validation_percentage", "1", "--est_num_batches", "1"]
    command += ["--checkpointing_steps", "2", "--train_percentage", "1", "--zero_out_top_k", "2"]
    command += ["--methods", "headwise_gate", "--mixed_precision", "no"]
    env = os.environ | {"OFT_SHARED": str(SHARED), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pre-train Llama-small, headwise_gate" in result.stdout and "family_name='llama'" in result.stdout
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["settings"]["family"] == "llama" and list(summary["methods"]) == ["headwise_gate"]
    for method, row in summary["methods"].items():
        config = json.loads((output_dir / method / "config.json").read_text())
        assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
        fp = json.loads((output_dir / method / "eval-fp" / "all_results.json").read_text())
        assert row["max_ffn_product_inf_norm"] == fp["max_ffn_product_inf_norm"] > 0
        assert row["max_first_token_inf_norm"] > 0 and row["max_later_tokens_inf_norm"] > 0
        assert f"| {method} | {row['fp_perplexity']:.2f} |" in (output_dir / "summary.md").read_text()
    assert len(summary["methods"]["headwise_gate"]["per_layer"]["kurtosis"]) == 4  # Llama-small's layers


def test_the_demo_trains_in_bf16_where_native_and_eagerly_by_default(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    args = demo.parse_args([])
    assert args.mixed_precision == "auto" and args.torch_compile is False and args.family == "opt"
    from transformers_language import runtime

    for native, precision in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(runtime, "native_bf16", lambda native=native: native)
        assert runtime.training_precision("auto") == precision
        assert runtime.training_precision("bf16") == "bf16" and runtime.training_precision("no") == "no"
    assert demo.DEMO_FAMILIES["opt"].methods == ("vanilla", "clipped_softmax", "gated_attention")
    assert demo.RUNS["muon"] == ["--optimizer", "muon"]  # (Muon's training: test_variants_end_to_end)
    assert demo.parse_args(["--mixed_precision", "no"]).mixed_precision == "no"
