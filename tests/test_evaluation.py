"""Evaluation: perplexity against a hand computation, streamed statistics against stored activations, the
attention diagnostics against stored probabilities, and a planted outlier found by the analysis."""

import contextlib
import logging
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from scipy import stats as scipy_stats

from tests.conftest import VOCAB, tiny_config
from transformers_language import AttentionConfig, build_model
from transformers_language.evaluation.attention_stats import AttentionStatistics, uniform_first_key_mass
from transformers_language.evaluation.loop import evaluate
from transformers_language.evaluation.metrics import ActivationStatistics
from transformers_language.evaluation.outlier_report import headline_figures, log_results, outlier_results, top_dims
from transformers_language.evaluation.probe_views import TextInputs
from transformers_language.objectives import get_objective
from transformers_language.objectives.linear_cross_entropy import IGNORE_INDEX

OBJECTIVE = {"bert": "mlm", "opt": "clm"}
SEQ, EXAMPLES, BATCH = 16, 11, 4  # the last batch is partial


def _dataset(model_type: str) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (EXAMPLES, SEQ), generator=generator)
    ids[:, 0] = 2  # a delimiter-like first token (OPT's </s>), and token 2 recurs below
    ids[:, SEQ // 2] = 2
    columns = {"input_ids": ids}
    if model_type == "bert":
        labels = torch.full_like(ids, IGNORE_INDEX)
        chosen = torch.rand(ids.shape, generator=generator) < 0.3
        labels[chosen] = ids[chosen]
        columns["labels"] = labels
    return Dataset.from_dict({k: v.tolist() for k, v in columns.items()}).with_format("torch")


def _model(model_type: str, **attention):
    torch.manual_seed(0)
    return build_model(tiny_config(model_type), AttentionConfig(**attention)).eval()


def _evaluate(model, dataset, model_type, probes=(), batch_size=BATCH):
    objective = get_objective(OBJECTIVE[model_type])
    loss_module = objective.loss_class(model).eval()
    return evaluate(Accelerator(cpu=True), loss_module, dataset, objective, batch_size, probes)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_perplexity_equals_a_hand_computation(model_type):
    model, dataset = _model(model_type), _dataset(model_type)
    results = _evaluate(model, dataset, model_type)
    nll, tokens, batch_means = 0.0, 0, []
    with torch.no_grad():
        for start in range(0, EXAMPLES, BATCH):
            ids = dataset[start : start + BATCH]["input_ids"]
            logits = model(input_ids=ids).logits.double()
            if model_type == "bert":
                targets = dataset[start : start + BATCH]["labels"]
            else:  # predict the next token; the last position has none
                logits, targets = logits[:, :-1], ids[:, 1:]
            chosen = targets != IGNORE_INDEX
            losses = -torch.log_softmax(logits, -1)[chosen].gather(1, targets[chosen].unsqueeze(1))
            nll, tokens = nll + losses.sum().item(), tokens + int(chosen.sum())
            batch_means.append(losses.mean().item())
    assert results["eval_tokens"] == tokens
    assert results["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert results["perplexity_mean_of_batch_losses"] == pytest.approx(math.exp(np.mean(batch_means)), rel=1e-5)
    assert results["perplexity"] != pytest.approx(results["perplexity_mean_of_batch_losses"], rel=1e-9)


def _stored_activations(model, sites):
    stored = {site.name: [] for site in sites}
    handles = []
    for site in sites:
        module = model.get_submodule(site.module_path)
        if site.tap == "input":
            hook = lambda m, a, s=site: stored[s.name].append(a[0].detach().clone())  # noqa: E731
            handles.append(module.register_forward_pre_hook(hook))
        else:
            hook = lambda m, a, o, s=site: stored[s.name].append((o[0] if isinstance(o, tuple) else o).detach().clone())  # noqa: E731
            handles.append(module.register_forward_hook(hook))
    return stored, handles


def _plant_outlier(model, model_type, layer: int, dim: int, factor: float = 100.0):
    """Scale one hidden dimension of one layer's FFN output (the weights of that output row)."""
    ffn = model.transformer_layers()[layer]
    linear = ffn.output.dense if model_type == "bert" else ffn.fc2
    with torch.no_grad():
        linear.weight[dim] *= factor
        linear.bias[dim] *= factor


def test_streamed_statistics_equal_stored_activations(model_type):
    model, dataset = _model(model_type), _dataset(model_type)
    _plant_outlier(model, model_type, layer=1, dim=5, factor=30.0)  # so that >6 sigma counts are not all zero
    sites = model.outlier_sites()
    config = model.config
    streamed = ActivationStatistics(model, sites, config.hidden_size, config.vocab_size, kurtosis_max_batches=2)
    stored, handles = _stored_activations(model, sites)
    before = _hook_count(model)
    _evaluate(model, dataset, model_type, probes=(streamed,))
    assert _hook_count(model) == before  # every statistics hook is gone
    for handle in handles:
        handle.remove()
    figures = streamed.synced(Accelerator(cpu=True))
    ids = dataset[:]["input_ids"].numpy()

    total_outliers = 0
    for site in sites:
        batches = [a.reshape(-1, SEQ, config.hidden_size).double().numpy() for a in stored[site.name]]
        values = np.concatenate(batches)  # (N, T, d)
        flat = values.reshape(EXAMPLES, -1)
        centered = flat - flat.mean(1, keepdims=True)
        outlier = (np.abs(centered) > 6 * flat.std(1, keepdims=True)).reshape(values.shape)
        kurtosis_rows = 2 * BATCH  # the first two batches only
        got = figures[site.name]
        assert got.sequences == EXAMPLES and got.kurtosis_sequences == kurtosis_rows
        assert got.inf_norm == pytest.approx(np.abs(flat).max(1).mean(), rel=1e-5)
        assert got.inf_norm_max == pytest.approx(np.abs(flat).max(), rel=1e-6)
        reference_kurtosis = scipy_stats.kurtosis(flat[:kurtosis_rows], axis=1, fisher=True) + 3
        assert got.kurtosis == pytest.approx(reference_kurtosis.mean(), rel=1e-4)
        assert got.outliers == outlier.sum() and got.values == flat.size
        np.testing.assert_array_equal(got.dim_outliers.numpy(), outlier.sum((0, 1)))
        np.testing.assert_allclose(got.dim_peak.numpy(), np.abs(values).max((0, 1)), rtol=1e-6)
        token_outliers = np.bincount(ids.ravel(), weights=outlier.sum(2).ravel(), minlength=config.vocab_size)
        np.testing.assert_array_equal(got.token_outliers.numpy(), token_outliers)
        peak_positions = np.abs(values).max(2).argmax(1)
        token_maxima = np.bincount(ids[np.arange(EXAMPLES), peak_positions], minlength=config.vocab_size)
        np.testing.assert_array_equal(got.token_maxima.numpy(), token_maxima)
        counts = outlier.sum((0, 1))
        expected_dims = sorted(range(config.hidden_size), key=lambda d: (-counts[d], -np.abs(values[..., d]).max()))
        assert [d["dim"] for d in top_dims(got, 3)] == expected_dims[:3]
        total_outliers += int(outlier.sum())
    assert total_outliers > 0


def test_a_planted_outlier_is_found(model_type):
    dataset, layer, dim = _dataset(model_type), 1, 7

    def measure(plant: bool) -> dict:
        model = _model(model_type)
        if plant:
            _plant_outlier(model, model_type, layer, dim)
        probe = ActivationStatistics(model, model.outlier_sites(), model.config.hidden_size, model.config.vocab_size)
        _evaluate(model, dataset, model_type, probes=(probe,))
        return outlier_results(probe.synced(Accelerator(cpu=True)), {}, model.headlines, lambda i: f"t{i}")

    clean, planted = measure(False), measure(True)
    # OPT's residual stream carries the FFN output as it is; BERT's is dominated by the attention block's
    # LayerNorm output in a random tiny model, so there the FFN output is where the jump shows.
    ffn = "bert.encoder.layer.1.output.dense" if model_type == "bert" else "model.decoder.layers.1.fc2"
    for name in [ffn] + (["model.decoder.layers.1"] if model_type == "opt" else []):
        before, after = clean["activations"][name], planted["activations"][name]
        assert after["inf_norm"] > 10 * before["inf_norm"]
        assert after["kurtosis"] > 5 * before["kurtosis"]
        assert after["top_dims"][0]["dim"] == dim and after["top_dims"][0]["outlier_share"] > 0.9
    untouched = "bert.encoder.layer.0.output.dense" if model_type == "bert" else "model.decoder.layers.0.fc2"
    assert planted["activations"][untouched] == clean["activations"][untouched]
    headline = "max_ffn_output_inf_norm" if model_type == "bert" else "max_ffn_inf_norm"
    assert planted[headline] > 10 * clean[headline]
    assert planted["outliers_6sigma"] > clean["outliers_6sigma"]


def test_headlines_follow_the_metrics_definitions():
    model = _model("opt")
    probe = ActivationStatistics(model, model.outlier_sites(), model.config.hidden_size, model.config.vocab_size)
    _evaluate(model, _dataset("opt"), "opt", probes=(probe,))
    figures = probe.synced(Accelerator(cpu=True))
    values = headline_figures(figures, model.headlines)
    layers = [figures[f"model.decoder.layers.{i}"] for i in range(2)]
    assert len(figures) == 2 * 5 + 1  # five tensors per layer and the final LayerNorm
    assert values["max_inf_norm"] == max(f.inf_norm for f in figures.values())
    assert values["max_ffn_inf_norm"] == max(figures[f"model.decoder.layers.{i}.fc2"].inf_norm for i in range(2))
    assert values["max_layer_inf_norm"] == max(f.inf_norm for f in layers)
    assert values["avg_kurtosis"] == pytest.approx(np.mean([f.kurtosis for f in figures.values()]))
    assert values["max_kurtosis_layers"] == max(f.kurtosis for f in layers)


@pytest.mark.parametrize(
    "model_type, attention",
    [
        ("opt", {"softmax": "clipped(-0.1:1)", "gate_type": "conditional_per_token", "init_prob": 0.25}),
        ("bert", {"softmax": "clipped(-0.065:1)"}),
        ("opt", {"gate_type": "conditional_per_head"}),
        ("bert", {}),
        ("opt", {"softmax": "softpick"}),
        ("bert", {"softmax": "sink"}),
        ("opt", {"softmax": "sigmoid", "train_seq_length": 16, "gate_type": "headwise"}),
        ("opt", {"bias_kv": True, "gate_type": "elementwise"}),
        ("bert", {"softmax": "clipped_softmax1(-0.06:1)", "bias_kv": True}),
    ],
)
def test_attention_diagnostics_equal_stored_probabilities(model_type, attention):
    """The probe alone (fused attention where the variant allows it), then a reference pass that stores the
    probabilities (explicit path): the per-head figures agree."""
    model, dataset = _model(model_type, **attention), _dataset(model_type)
    delimiters = [2, 5]
    inputs = TextInputs(None, model.config)
    inputs.delimiter_ids = delimiters
    probe = AttentionStatistics(model, inputs)
    variants = list(model.attention_variants().values())
    before = _hook_count(model)
    plain = _evaluate(model, dataset, model_type)
    with_probe = _evaluate(model, dataset, model_type, probes=(probe,))
    assert _hook_count(model) == before and all(v.marked_keys is None for v in variants)
    assert with_probe["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)  # the context is untouched
    result = probe.synced(Accelerator(cpu=True))

    probs, gates = [[] for _ in range(2)], [[] for _ in range(2)]
    handles = [
        v.probs.register_forward_hook(lambda m, a, o, i=i: probs[i].append(o.detach())) for i, v in enumerate(variants)
    ]
    handles += [
        v.gate.register_forward_hook(lambda m, a, o, i=i: gates[i].append(o.detach()))
        for i, v in enumerate(variants)
        if v.gate
    ]
    _evaluate(model, dataset, model_type)
    for handle in handles:
        handle.remove()
    is_delimiter = torch.isin(dataset[:]["input_ids"], torch.tensor(delimiters)).double()  # (N, S)
    allowed = torch.ones(SEQ, SEQ).tril().bool() if model_type == "opt" else torch.ones(SEQ, SEQ).bool()
    config = variants[0].settings
    with_zeros = config.clipped or config.normaliser == "softpick"
    for layer in range(2):
        weights = torch.cat(probs[layer]).double()  # (N, H, T, S), or S + 1 with the learned key first
        p = weights[..., 1:] if config.bias_kv else weights
        figures = result[f"layer_{layer}"]
        if not config.plain_softmax or config.bias_kv:  # what the sequence's keys get, and the rest
            np.testing.assert_allclose(figures["row_sum"], p.sum(-1).mean((0, 2)), rtol=1e-5)
            if not config.clipped and (config.bias_kv or config.normaliser in ("softmax1", "sink")):
                np.testing.assert_allclose(figures["sink_mass"], 1 - p.sum(-1).mean((0, 2)), rtol=1e-5)
                assert min(figures["sink_mass"]) > 0
            else:
                assert "sink_mass" not in figures
        else:
            assert "row_sum" not in figures and "sink_mass" not in figures
        np.testing.assert_allclose(figures["first_token_mass"], p[..., 0].mean((0, 2)), rtol=1e-5)
        # Uniform attention over the keys each query may see: 1 / (i + 1) causal, 1 / S bidirectional.
        uniform = (allowed.double() / allowed.sum(-1, keepdim=True))[:, 0].mean()
        np.testing.assert_allclose(figures["sink_ratio"], p[..., 0].mean((0, 2)) / uniform, rtol=1e-5)
        delimiter_mass = (p * is_delimiter[:, None, None, :]).sum(-1).mean((0, 2))
        np.testing.assert_allclose(figures["delimiter_mass"], delimiter_mass, rtol=1e-5)
        if with_zeros:  # clipped softmax and softpick give some exact zeros; masked pairs do not count
            # Every query may attend to the learned key.
            pairs = torch.nn.functional.pad(allowed, (1, 0), value=True) if config.bias_kv else allowed
            zeros = ((weights == 0) & pairs).sum((0, 2, 3)).double() / (p.shape[0] * pairs.sum().item())
            np.testing.assert_allclose(figures["exact_zero_fraction"], zeros, rtol=1e-9)
            assert 0 < float(zeros.mean()) < 1
        else:
            assert "exact_zero_fraction" not in figures
        if gates[layer]:
            sizes = [len(b) for b in torch.arange(EXAMPLES).split(BATCH)]  # sequences per call
            mean_gate = sum(g.mean((0, 2, 3)) * n for g, n in zip(gates[layer], sizes, strict=True)) / EXAMPLES
            np.testing.assert_allclose(figures["gate_mean"], mean_gate, rtol=1e-6)
        else:
            assert "gate_mean" not in figures


def test_an_overflowing_perplexity_is_infinity(caplog):
    """exp of a huge mean loss is reported as inf (never an OverflowError), and the report logs it."""

    class HugeLoss(torch.nn.Module):
        def forward(self, input_ids, labels):
            return torch.tensor(1e4) * labels[:, 1:].numel()  # summed NLL of 1e4 per predicted token

    results = evaluate(Accelerator(cpu=True), HugeLoss(), _dataset("opt"), get_objective("clm"), BATCH)
    assert results["eval_loss"] == pytest.approx(1e4)
    assert results["perplexity"] == math.inf and results["perplexity_mean_of_batch_losses"] == math.inf
    with caplog.at_level(logging.INFO):
        log_results(
            results | {"activations": {}, "attention": {}, "max_abs_activation": 0.0, "outliers_6sigma": 0},
            (),
            get_objective("clm").reported,
        )
    assert "perplexity: inf" in caplog.text


def test_fsdp_lockstep_runs_uncounted_filler_batches():
    """Under FSDP every forward is a collective: a process whose shard has fewer batches than the longest one
    runs filler forwards after the probes detach, and neither the figures nor the probes count them."""
    from accelerate.utils import DistributedType

    class LongestShardHasTwoMore:  # this process's view: another shard has 2 more batches
        distributed_type, num_processes, process_index, device = DistributedType.FSDP, 1, 0, torch.device("cpu")
        is_local_main_process = True

        def gather(self, tensor):
            return tensor + 2

        def reduce(self, tensor, reduction):
            return tensor

        def autocast(self):
            return contextlib.nullcontext()

    class CountingLoss(torch.nn.Module):
        calls = probed_calls = 0

        def forward(self, input_ids, labels):
            self.calls += 1
            self.probed_calls += probe.active  # what a probe's hooks would see
            return torch.tensor(1.0) * labels[:, 1:].numel()

    class Probe:
        batches = 0
        active = False

        @contextlib.contextmanager
        def attached(self):
            self.active = True
            yield
            self.active = False

        def start_batch(self, input_ids, index):
            assert self.active
            self.batches += 1

    loss, probe = CountingLoss(), Probe()
    dataset = _dataset("opt")
    results = evaluate(LongestShardHasTwoMore(), loss, dataset, get_objective("clm"), BATCH, (probe,))
    batches = math.ceil(EXAMPLES / BATCH)
    assert loss.calls == batches + 2 and loss.probed_calls == probe.batches == batches
    assert results["eval_tokens"] == EXAMPLES * (SEQ - 1) and results["eval_loss"] == pytest.approx(1.0)


@pytest.mark.parametrize("queries, keys", [(128, 128), (5, 9), (1, 7)])
def test_uniform_first_key_mass_is_what_uniform_attention_puts_on_the_first_key(queries, keys):
    allowed = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)  # bottom-right aligned
    uniform = allowed.double() / allowed.sum(-1, keepdim=True)
    assert uniform_first_key_mass(queries, keys, is_causal=True) == pytest.approx(uniform[:, 0].sum().item())
    assert uniform_first_key_mass(queries, keys, is_causal=False) == pytest.approx(queries / keys)
    if queries == keys == 128:  # the figure the README quotes: ~4.2% on the first token by chance alone
        assert uniform[:, 0].mean().item() == pytest.approx(0.0424, abs=1e-4)


def test_the_comparison_plot_takes_equal_draws_whose_mean_is_an_ulp_outside_them(tmp_path):
    """Three equal draws of 0.7 average to 0.7 - 1e-16: the whisker is zero, not a negative error bar."""
    from transformers_language.evaluation.plots import write_quantization_comparison

    draws = [0.7, 0.7, 0.7]
    assert sum(draws) / 3 < min(draws)
    gaps = {"W8A8": {"per-token": {"a": (sum(draws) / 3, draws)}, "per-tensor": {"a": (-1.5, [-2.0, -1.0, -1.5])}}}
    write_quantization_comparison(gaps, tmp_path / "comparison.png", "score gap to FP (points)")
    assert (tmp_path / "comparison.png").stat().st_size > 5_000
