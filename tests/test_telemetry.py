"""Telemetry: statistics reduced in hooks equal those of stored activations, hooks are scoped, TensorBoard gets
every tag."""

import json

import pytest
import torch
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import VOCAB, read_log, run_main, tiny_config, train_argv
from transformers_language import AttentionConfig, build_model
from transformers_language.evaluation.metrics import per_sequence_stats
from transformers_language.training.telemetry import GROWTH_FILE, Telemetry


def _hook_counts(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_streamed_statistics_equal_stored_activations(model_type, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), AttentionConfig(gate_type="conditional_per_token")).eval()
    telemetry = Telemetry(Accelerator(cpu=True), model, True, scalar_interval=2, hist_interval=100, output_dir=tmp_path)
    stored, gates = [[] for _ in model.transformer_layers()], [[] for _ in model.transformer_layers()]
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: stored[i].append(o.detach()))
        for i, layer in enumerate(model.transformer_layers())
    ]
    handles += [
        v.gate.register_forward_hook(lambda m, a, o, i=i: gates[i].append(o.detach()))
        for i, v in enumerate(model.attention_variants().values())
    ]
    baseline = _hook_counts(model)

    batches = [torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    with telemetry.measure(step=1):  # not a log step: no hooks
        assert _hook_counts(model) == baseline
    with telemetry.measure(step=2):
        assert _hook_counts(model) > baseline
        for ids in batches:
            model(input_ids=ids)
    assert _hook_counts(model) == baseline
    assert all(variant.marked_keys is None for variant in model.attention_variants().values())
    telemetry.log(2, {"step": 2, "loss": 1.0})  # writes the growth record and clears the step's sums
    assert not telemetry._sums and telemetry._attention is None
    with telemetry.measure(step=2):
        for ids in batches:
            model(input_ids=ids)
    scalars = telemetry._stats_scalars()
    attention = telemetry._attention.synced(Accelerator(cpu=True))
    for handle in handles:
        handle.remove()
    # First-token attention against the probabilities themselves (a hook on `probs` takes the explicit path).
    probs = [[] for _ in model.transformer_layers()]
    handles = [
        v.probs.register_forward_hook(lambda m, a, o, i=i: probs[i].append(o.detach()))
        for i, v in enumerate(model.attention_variants().values())
    ]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    for handle in handles:
        handle.remove()
    probs = [torch.cat(per_layer) for per_layer in probs]
    causal = model_type == "opt"
    for index, p in enumerate(probs):
        mass = p[..., 0].double().mean((0, 2))
        assert attention[f"layer_{index}"]["first_token_mass"] == pytest.approx(mass.tolist(), rel=1e-5)
        queries, keys = p.shape[-2:]
        uniform = sum(1.0 / (i + 1) for i in range(queries)) / queries if causal else 1.0 / keys
        assert attention[f"layer_{index}"]["sink_ratio"] == pytest.approx((mass / uniform).tolist(), rel=1e-5)
    record = json.loads((tmp_path / GROWTH_FILE).read_text().splitlines()[0])
    assert record["step"] == 2 and len(record["kurtosis"]) == len(record["sink_ratio"]) == len(probs)

    for index, outputs in enumerate(stored):
        everything = torch.cat(outputs)
        inf_norm, kurtosis = per_sequence_stats(everything)
        assert scalars[f"activations/layer_{index}/inf_norm"] == pytest.approx(inf_norm.mean().item(), rel=1e-5)
        assert scalars[f"activations/layer_{index}/kurtosis"] == pytest.approx(kurtosis.mean().item(), rel=1e-5)
        assert scalars[f"activations/layer_{index}/inf_norm_max"] == pytest.approx(everything.abs().max().item())
        per_head = torch.stack([g.mean(dim=(0, 2, 3)) for g in gates[index]]).mean(0)
        for head, value in enumerate(per_head.tolist()):
            assert scalars[f"gates/layer_{index}/head_{head}"] == pytest.approx(value, rel=1e-5)


def test_tensorboard_receives_step_and_extra_statistics(tmp_path, data_cache):
    out = tmp_path / "run"
    tracking = ["--with_tracking", "--report_to", "tensorboard", "--extra_tb_stats"]
    tracking += [
        "--tb_scalar_log_interval",
        "2",
        "--tb_hist_log_interval",
        "2",
        "--attn_gate_type",
        "conditional_per_token",
    ]
    run_main("opt", train_argv("opt", out, data_cache, *tracking))
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent), size_guidance={"histograms": 0})
    events.Reload()
    scalars, histograms = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "eval/perplexity"):
        assert tag in scalars
    for tag in ("activations/layer_1/kurtosis", "activations/layer_0/inf_norm", "gates/layer_1/head_3"):
        assert tag in scalars
    assert any(tag.startswith("weight_inf_norm/") and tag.endswith("fc1") for tag in scalars)
    assert "activations/layer_0" in histograms and any(tag.startswith("weights/") for tag in histograms)
    assert [event.step for event in events.Scalars("activations/layer_0/kurtosis")] == [2, 4]
    assert len(events.Scalars("train/loss")) == 4


def test_extra_stats_need_tensorboard(tmp_path, data_cache):
    with pytest.raises(ValueError, match="--extra_tb_stats logs to TensorBoard: add --with_tracking"):
        run_main("opt", train_argv("opt", tmp_path / "run", data_cache, "--extra_tb_stats"))


def test_growth_file_has_one_record_per_logging_step(tmp_path, data_cache):
    out = tmp_path / "run"
    tracking = ["--with_tracking", "--report_to", "tensorboard", "--extra_tb_stats", "--tb_scalar_log_interval", "2"]
    run_main("opt", train_argv("opt", out, data_cache, *tracking, "--attn_gate_type", "conditional_per_token", steps=5))
    records = [json.loads(line) for line in (out / GROWTH_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    for record in records:
        for key in ("kurtosis", "inf_norm", "inf_norm_max", "first_token_mass", "sink_ratio"):
            assert len(record[key]) == 2 and all(v > 0 for v in record[key])
        assert len(record["gate_mean"]) == 2 and len(record["gate_mean"][0]) == 4  # per layer, per head
        logged = {e.step: e.value for e in events.Scalars("activations/layer_1/kurtosis")}
        assert record["kurtosis"][1] == pytest.approx(logged[record["step"]], rel=1e-6)
        logged = {e.step: e.value for e in events.Scalars("attention/layer_0/sink_ratio")}
        assert record["sink_ratio"][0] == pytest.approx(logged[record["step"]], rel=1e-6)


def test_measured_steps_train_exactly_as_unmeasured_ones(tmp_path, data_cache):
    """The first-token indicators ride along as extra value channels: the step's numbers must not move beyond
    float rounding (the wider value matrix may take another matmul kernel: equal bit for bit on an AVX-512 CPU,
    1e-7 apart on an AVX2 one)."""
    plain, measured = tmp_path / "plain", tmp_path / "measured"
    run_main("opt", train_argv("opt", plain, data_cache, "--hidden_dropout", "0.1", steps=4))
    tracking = ["--with_tracking", "--extra_tb_stats", "--tb_scalar_log_interval", "1"]
    run_main("opt", train_argv("opt", measured, data_cache, "--hidden_dropout", "0.1", *tracking, steps=4))
    assert [r["loss"] for r in read_log(measured)] == pytest.approx([r["loss"] for r in read_log(plain)], rel=1e-6)


@pytest.mark.parametrize(
    ("flags", "figures", "absent"),
    [
        (
            ["--attn_softmax", "sink", "--attn_gate_type", "elementwise"],
            ("row_sum", "sink_mass"),
            "exact_zero_fraction",
        ),
        (["--attn_softmax", "softpick"], ("row_sum", "exact_zero_fraction"), "sink_mass"),
    ],
)
def test_growth_file_carries_each_variants_own_figures(tmp_path, data_cache, flags, figures, absent):
    out = tmp_path / "run"
    tracking = ["--with_tracking", "--report_to", "tensorboard", "--extra_tb_stats", "--tb_scalar_log_interval", "2"]
    run_main("opt", train_argv("opt", out, data_cache, *tracking, *flags, steps=2))
    (record,) = [json.loads(line) for line in (out / GROWTH_FILE).read_text().splitlines()]
    for key in figures:
        assert len(record[key]) == 2 and all(0 <= v <= 1 for v in record[key]), key
    assert absent not in record
    if "sink_mass" in figures:
        assert record["sink_mass"] == pytest.approx([1 - v for v in record["row_sum"]], rel=1e-6)
        assert len(record["gate_mean"][0]) == 4  # elementwise gates: per head, averaged over channels
