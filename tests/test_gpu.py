"""On a CUDA device: a few bf16 + compiled training steps of each family (every statistics hook still seen), an
interrupted bf16 run resumed on CUDA, FSDP (sharded checkpoints, exact resume, gathered weights), FP and W8A8
validation on CUDA against the same validation on the CPU, and the fused SDPA attention path against the
explicit one. Marked `gpu`: deselected by default, run with `pytest -m gpu` (skipped where torch sees no CUDA
device); `scripts/gpu_check.sh` runs them with the training benchmark on CUDA and prints one table.

Tolerances (CUDA against CPU, both fp32; torch keeps TF32 off for matmuls unless asked): FP perplexity and
outlier figures within 1e-4 relative (summation order differs); W8A8 perplexity within 1e-2 relative (a value
that lands within rounding error of a quantization step boundary may round the other way); SDPA against the
explicit path within 1e-4 in fp32 and 3e-2 in bf16 (the kernels accumulate in another order)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, PartialState
from safetensors.torch import load_file

from tests.conftest import (
    assert_resume_repeats_run,
    batch,
    read_log,
    run_main,
    text_trainer,
    tiny_config,
    train_argv,
)
from tests.test_models import STOCK, force_explicit, logits
from tests.test_validate import CALIBRATION_DATA, PAPER_W8A8, checkpoints, run_validate, validate_argv  # noqa: F401
from tests.test_vit_end_to_end import image_folders, run_vit, vit_train_argv  # noqa: F401
from transformers_language import model_class
from transformers_language.evaluation.literature_metrics import LAYER_FIGURES

# cuBLAS is deterministic only with a fixed workspace; it reads this when CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

REPO = Path(__file__).resolve().parents[1]
# accelerate's FSDP switches, as `accelerate launch --use_fsdp` sets them: FSDP2, one shard unit per layer.
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
}
COMPILED = ("--mixed_precision", "bf16", "--torch_compile")
TRACKED = ("--with_tracking", "--extra_tb_stats", "--tb_scalar_log_interval", "2")
FP_RTOL, W8A8_RTOL = 1e-4, 1e-2


@contextmanager
def on_cpu(monkeypatch):
    """Jobs started inside run on the CPU although CUDA is there. accelerate decides the device once, when its
    process-wide state is first made, reading ACCELERATE_USE_CPU: the state is made afresh on entry and exit."""
    AcceleratorState._reset_state(reset_partial_state=True)
    with monkeypatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "true")
        try:
            yield
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)


def assert_ran_on_cuda(job):
    torch.cuda.reset_peak_memory_stats()
    result = job()
    assert torch.cuda.max_memory_allocated() > 0, "the job ran without touching the GPU"
    assert PartialState().device.type == "cuda"
    return result


def assert_every_hook_seen(output_dir, layers: int):
    growth = [json.loads(line) for line in (output_dir / "growth.jsonl").read_text().splitlines()]
    assert growth, "no figures logged"
    for record in growth:
        for key in ("kurtosis", "inf_norm", *(k for k in LAYER_FIGURES if k != "max_attention_logit")):
            assert len(record[key]) == layers and all(v is not None for v in record[key]), key


@pytest.mark.parametrize("model_type", ["bert", "opt", "llama"])
def test_bf16_compiled_text_training_on_cuda(model_type, tmp_path, data_cache):
    out = tmp_path / "run"
    argv = train_argv(model_type, out, data_cache, *COMPILED, *TRACKED)
    assert_ran_on_cuda(lambda: run_main(model_type, argv))
    losses = [record["loss"] for record in read_log(out)]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert_every_hook_seen(out, layers=2)


def test_bf16_compiled_vit_training_on_cuda(tmp_path, image_folders):  # noqa: F811
    out = tmp_path / "run"
    argv = vit_train_argv(out, image_folders, *COMPILED, *TRACKED)
    assert_ran_on_cuda(lambda: run_vit(argv))
    losses = [record["loss"] for record in read_log(out)]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


def test_a_resumed_bf16_run_on_cuda_repeats_the_straight_one(tmp_path, data_cache, monkeypatch):
    assert_resume_repeats_run(
        text_trainer("opt", data_cache), tmp_path, monkeypatch, "--mixed_precision", "bf16",
        "--checkpointing_steps", "3",
    )  # fmt: skip


def test_fsdp_on_cuda_resumes_exactly_and_gathers_the_weights_of_a_plain_run(tmp_path, data_cache):
    """FSDP2 over up to two GPUs (one process on one GPU still runs every FSDP path: sharded checkpoints, gathered
    weights): a run resumed from its step-2 checkpoint repeats its last steps' losses bit for bit, and its losses
    and gathered weights match one plain process with the same total batch (no dropout)."""
    processes = min(2, torch.cuda.device_count())
    plain = ["--attn_dropout", "0", "--hidden_dropout", "0", "--checkpointing_steps", "2"]

    def launch(out, *extra):
        argv = train_argv("opt", out, data_cache, *plain, "--per_device_train_batch_size", str(8 // processes), *extra)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "run_clm.py"]
        done = subprocess.run([*command, *argv], cwd=REPO, env=os.environ | FSDP_ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return [record["loss"] for record in read_log(out)]

    sharded = launch(tmp_path / "fsdp")
    assert any("fsdp" in path.name for path in (tmp_path / "fsdp" / "step_2").iterdir())  # sharded state on disk
    assert launch(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "fsdp" / "step_2")) == sharded[2:]
    run_main("opt", train_argv("opt", tmp_path / "one", data_cache, *plain, "--per_device_train_batch_size", "8"))
    assert sharded == pytest.approx([record["loss"] for record in read_log(tmp_path / "one")], rel=1e-5)
    gathered, one = (
        load_file(tmp_path / "fsdp" / "model.safetensors"),
        load_file(tmp_path / "one" / "model.safetensors"),
    )
    assert gathered.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(gathered[key], one[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("quantize", [False, True], ids=["fp", "w8a8"])
@pytest.mark.parametrize("model_type", ["bert", "opt"])
def test_validation_on_cuda_equals_the_cpu(model_type, quantize, checkpoints, tmp_path, data_cache, monkeypatch):  # noqa: F811
    extra = [*PAPER_W8A8[model_type], *CALIBRATION_DATA] if quantize else []

    def results(name):
        out = tmp_path / name
        run_validate(model_type, validate_argv(model_type, checkpoints[model_type], out, data_cache, *extra))
        return json.loads((out / "all_results.json").read_text())

    cuda = assert_ran_on_cuda(lambda: results("cuda"))
    with on_cpu(monkeypatch):
        cpu = results("cpu")
    rtol = W8A8_RTOL if quantize else FP_RTOL
    assert cuda["perplexity"] == pytest.approx(cpu["perplexity"], rel=rtol)
    if not quantize:
        for key in ("max_abs_activation", "sink_percent", "max_top1_median"):
            assert cuda[key] == pytest.approx(cpu[key], rel=FP_RTOL, abs=1e-6), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", ["bert", "opt", "llama"])
def test_sdpa_on_cuda_equals_the_explicit_path_and_stock_hf(model_type, dtype):
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.manual_seed(0)
    stock = STOCK[model_type](tiny_config(model_type, attn_implementation="sdpa")).eval()
    ours = model_class(model_type)(tiny_config(model_type)).eval()
    ours.load_state_dict(stock.state_dict(), strict=True)
    stock, ours = stock.to("cuda", dtype), ours.to("cuda", dtype)
    variant = next(iter(ours.attention_variants().values()))
    ids, mask = (tensor.to("cuda") for tensor in batch(model_type))
    assert variant.uses_fused_path(False, torch.empty(1, dtype=dtype, device="cuda"))  # SDPA, in bf16 too
    fused = logits(ours, ids, mask).float()
    torch.testing.assert_close(fused, logits(stock, ids, mask).float(), rtol=0, atol=atol)
    force_explicit(ours)
    assert not variant.uses_fused_path()
    torch.testing.assert_close(logits(ours, ids, mask).float(), fused, rtol=0, atol=atol)
