"""The literature's metrics (literature_metrics.py) against brute-force formulas on kept activations, and the
zero-out intervention (intervention.py) setting exactly the chosen entries."""

import math

import pytest
import scipy.stats
import torch

from tests.conftest import tiny_config
from transformers_language.evaluation.intervention import choose_entries, entries_set
from transformers_language.evaluation.literature_metrics import (
    LiteratureStatistics,
    channel_kurtosis,
    count_above,
    histogram_median,
    literature_results,
    sink_percent,
    token_excess_kurtosis,
)
from transformers_language.models.attention_config import AttentionConfig
from transformers_language.models.model_classes import build_model


class _OneProcess:
    """What the probes' sync needs of an accelerator, for one process."""

    def reduce(self, tensor, reduction):
        return tensor

    def gather(self, tensor):
        return tensor


def test_channel_kurtosis_is_he_et_al_formula():
    x = torch.randn(500, 16) * torch.linspace(0.1, 5.0, 16)
    s = (x.double() ** 2).mean(dim=0)
    assert channel_kurtosis(s) == pytest.approx(((s**2).mean() / s.mean() ** 2).item(), rel=1e-12)
    assert channel_kurtosis(torch.ones(8)) == pytest.approx(1.0)


def test_token_excess_kurtosis_matches_scipy():
    x = torch.randn(3, 7, 64, dtype=torch.float64) ** 3
    expected = scipy.stats.kurtosis(x.numpy(), axis=-1, fisher=True, bias=True)
    assert torch.allclose(token_excess_kurtosis(x).double(), torch.from_numpy(expected), rtol=1e-4)


def test_histogram_median_and_massive_counts():
    from transformers_language.evaluation.literature_metrics import LOG_BINS, LOG_RANGE

    values = torch.randn(100_000).abs() * 3
    values[:5] = torch.tensor([500.0, 800.0, 1500.0, 5000.0, 9000.0])  # the median is ~2: massive means > ~2000
    counts = torch.histc(values.clamp_min(10 ** LOG_RANGE[0]).log10(), LOG_BINS, *LOG_RANGE)
    median = histogram_median(counts)
    assert median == pytest.approx(values.median().item(), rel=0.01)
    assert count_above(counts, max(100.0, 1000 * median)) == 2  # 5000 and 9000
    assert count_above(counts, 1e7) == 0


def test_sink_percent_counts_heads_above_eps():
    attention = {"layer_0": {"first_token_mass": [0.9, 0.1, 0.31, 0.29]}, "layer_1": {"first_token_mass": [0.5, 0.5]}}
    overall, per_layer = sink_percent(attention, 0.3)
    assert per_layer == [50.0, 100.0] and overall == pytest.approx(100 * 4 / 6)


@pytest.mark.parametrize("model_type", ["opt", "bert"])
def test_streamed_figures_equal_brute_force(model_type):
    torch.manual_seed(0)
    model = build_model(tiny_config(model_type), AttentionConfig()).eval()
    batches = [torch.randint(5, 90, (3, 12)) for _ in range(2)]
    kept = {"stream": {}, "ffn": {}, "scores": {}}
    layers = list(model.transformer_layers())
    variants = list(model.attention_variants().values())
    ffn_path = model.family.wiring.ffn_activation

    def keep(kind, index):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            kept[kind].setdefault(index, []).append(value.detach().clone())

        return hook

    stats = LiteratureStatistics(model, positions=12)
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(keep("stream", i)))
        handles.append(layer.get_submodule(ffn_path).register_forward_hook(keep("ffn", i)))
        handles.append(variants[i].scores.register_forward_hook(keep("scores", i)))
    with torch.no_grad(), stats.attached():
        for ids in batches:
            stats.start_batch(ids, 0)
            model(input_ids=ids)
    for handle in handles:
        handle.remove()
    figures = stats.synced(_OneProcess())

    for i in range(len(layers)):
        x = torch.cat(kept["stream"][i]).double()  # (B, T, d)
        s = x.square().flatten(0, 1).mean(dim=0)
        assert figures["channel_kurtosis"][i] == pytest.approx((s.square().mean() / s.mean() ** 2).item(), rel=1e-6)
        f = torch.cat([t.flatten(0, -2) for t in kept["ffn"][i]]).double()
        s = f.square().mean(dim=0)
        assert figures["ffn_channel_kurtosis"][i] == pytest.approx((s.square().mean() / s.mean() ** 2).item(), rel=1e-6)
        kurt = scipy.stats.kurtosis(x.numpy(), axis=-1, fisher=True, bias=True)
        assert figures["token_kurtosis_first"][i] == pytest.approx(kurt[:, 0].mean(), rel=1e-4, abs=1e-5)
        assert figures["token_kurtosis_rest"][i] == pytest.approx(kurt[:, 1:].mean(), rel=1e-4, abs=1e-5)
        magnitude = x.abs().flatten()
        assert figures["top1_median"][i] == pytest.approx((magnitude.max() / magnitude.median()).item(), rel=0.01)
        scores = torch.cat(kept["scores"][i]).abs()  # (B, H, T, S)
        if variants[i].is_causal:
            scores = scores.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), 0.0)
        assert figures["max_attention_logit"][i] == pytest.approx(scores.max().item(), rel=1e-6)
        mean, mean_abs = figures["position_means"][i]
        assert torch.allclose(mean.double(), x.mean(dim=0), atol=1e-5)
        assert torch.allclose(mean_abs.double(), x.abs().mean(dim=0), atol=1e-5)
    results = literature_results(figures, {"layer_0": {"first_token_mass": [0.5, 0.0, 0.0, 0.0]}})
    assert results["sink_percent"] == 25.0
    assert results["max_top1_median"] == max(figures["top1_median"])
    assert math.isfinite(results["max_attention_logit"])


def test_zero_out_chooses_the_massive_layer_and_sets_exactly_its_entries():
    means = [(torch.zeros(4, 3), torch.zeros(4, 3)) for _ in range(3)]
    means[1][1][0, 2], means[1][1][3, 1], means[1][1][2, 0] = 50.0, 40.0, 1.0
    means[1][0][0, 2], means[1][0][3, 1] = -50.0, 40.0
    figures = {"massive": [0, 2, 1], "top1_median": [9.0, 5.0, 30.0], "position_means": means}
    assert choose_entries(figures, 2) == (1, [(0, 2), (3, 1)], [-50.0, 40.0])
    assert choose_entries({**figures, "massive": [0, 0, 0]}, 1)[0] == 2  # none massive: the largest ratio

    torch.manual_seed(0)
    model = build_model(tiny_config("opt"), AttentionConfig()).eval()
    first, second = model.transformer_layers()[:2]
    seen = []  # what the next layer receives: the intervened residual stream
    probe = second.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    ids = torch.randint(5, 90, (2, 6))
    with torch.no_grad():
        model(input_ids=ids)
        with entries_set(first, [(0, 2), (3, 1)], torch.tensor([0.0, 7.0])):
            model(input_ids=ids)
    probe.remove()
    before, after = seen
    assert not first._forward_hooks  # removed on leaving
    assert (after[:, 0, 2] == 0).all() and (after[:, 3, 1] == 7).all()
    untouched = torch.ones_like(before, dtype=torch.bool)
    untouched[:, 0, 2] = untouched[:, 3, 1] = False
    assert torch.equal(after[untouched], before[untouched])
