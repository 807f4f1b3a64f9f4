"""Padding never enters a range, a statistic or a loss: whatever sits in a padded batch's padded positions, every
calibration range, transform statistic, clipping loss and evaluation figure is the same. And the equivalent
transforms leave the body's output FP-equal for any head; token-wise clipping searches past its grid's edge."""

import copy
import dataclasses
import math

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset

from quantization.config import QuantConfig
from quantization.estimators import build_estimator
from quantization.quantizer import Quantizer
from quantization.token_clipping import TokenQuantileEstimator, search_quantile
from quantization.token_mask import real_extremes, real_mask, real_rows, real_tokens, real_values
from tests.conftest import VOCAB, tiny_config
from transformers_language import AttentionConfig
from transformers_language.evaluation.attention_stats import AttentionStatistics
from transformers_language.evaluation.literature_metrics import LiteratureStatistics
from transformers_language.evaluation.loop import evaluate
from transformers_language.evaluation.metrics import ActivationStatistics
from transformers_language.evaluation.probe_views import TextInputs
from transformers_language.models.model_classes import build_model
from transformers_language.objectives import GLUE
from transformers_language.ptq.equivalent_transforms import apply_transforms
from transformers_language.ptq.validation import quantize_for_validation

LENGTHS = (12, 7, 4, 9)
LOUD = 5  # the token whose embedding is made huge: padding with it would wreck any range it entered


def glue_model(variant: dict | None = None, num_labels: int = 2):
    torch.manual_seed(0)
    config = tiny_config("bert", num_labels=num_labels)
    config.glue_task = "rte"
    model = build_model(config, AttentionConfig(**(variant or {})), family="bert_glue").eval()
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[LOUD] *= 300.0
    return model


def padded_batch(fill: int, seed: int = 0) -> dict:
    """Four examples of LENGTHS tokens, right-padded with `fill` (token ids) and 1 (token types)."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(LENGTHS)
    ids = torch.full((len(LENGTHS), longest), fill)
    types = torch.ones(len(LENGTHS), longest, dtype=torch.long)
    mask = torch.zeros(len(LENGTHS), longest, dtype=torch.long)
    for row, length in enumerate(LENGTHS):
        ids[row, :length] = torch.randint(6, VOCAB, (length,), generator=generator)
        types[row, :length] = 0
        mask[row, :length] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def test_observed_values_are_the_real_tokens_of_every_layout():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    hidden = torch.arange(24.0).reshape(2, 3, 4)
    with real_tokens(mask):
        assert torch.equal(real_values(hidden), hidden[mask.bool()])
        assert torch.equal(real_values(hidden.reshape(6, 4)), hidden[mask.bool()])  # OPT's flattened FFN input
        scores = torch.randn(2, 2, 3, 4)  # one prepended (learned) key: keys 0..3, the sequence's are 1..3
        values = real_values(scores)
        expected = [scores[b, h, q, k] for b in range(2) for h in range(2) for q in range(3) for k in range(4)
                    if mask[b, q] and (k == 0 or mask[b, k - 1])]  # fmt: skip
        assert sorted(values.tolist()) == sorted(torch.stack(expected).tolist())
        rows = real_rows(scores)  # real queries; padded keys take the row's largest real value
        assert rows.shape == (3, 2, 4)
        assert torch.equal(rows.amin(-1), torch.stack([scores[0, :, 0, :3].amin(-1), scores[0, :, 1, :3].amin(-1),
                                                       scores[1, :, 0, :2].amin(-1)]))  # fmt: skip
        # Each real row's extremes, for the min / max estimators: those of the rows it stands for.
        for tensor, kept in ((hidden, real_values(hidden)), (hidden.reshape(6, 4), real_values(hidden)),
                             (scores, rows.reshape(-1, 4))):  # fmt: skip
            extremes = real_extremes(tensor)
            assert torch.equal(extremes, torch.stack((kept.amin(-1), kept.amax(-1)), dim=-1))
        # The in-place mask of the same values: the padding zeroed, every real value kept.
        for tensor in (hidden, hidden.reshape(6, 4), scores):
            kept = real_values(tensor)
            zeroed = tensor.masked_fill(~real_mask(tensor), 0.0)
            assert zeroed.shape == tensor.shape and torch.count_nonzero(zeroed) == torch.count_nonzero(kept)
            assert torch.allclose(zeroed.sum(), kept.sum()) and torch.equal(zeroed.abs().amax(), kept.abs().amax())
    assert real_values(hidden) is hidden and real_extremes(hidden) is hidden  # outside a scope: all, uncopied
    assert real_mask(hidden) is None


@pytest.mark.parametrize("prepended", [0, 1])
@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_row_extremes_read_real_keys_of_real_queries_only(side, prepended):
    """real_extremes masks an attention map's padded keys by value: the extremes of real_rows' copied rows, with
    padding on either side, a masked score of -inf at a padded key, and keys prepended by the model."""
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 2, 4]
    mask = torch.zeros(3, 5, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    if side == "left":
        mask = mask.flip(1)
    scores = torch.randn(3, 2, 5, 5 + prepended, generator=generator)
    scores[:, :, :, prepended:] = scores[:, :, :, prepended:].masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    with real_tokens(mask):
        rows = real_rows(scores)
        assert torch.equal(real_extremes(scores), torch.stack((rows.amin(-1), rows.amax(-1)), dim=-1).reshape(-1, 2))
        assert torch.isfinite(real_extremes(scores)).all()
    assert real_extremes(scores).shape == scores.shape  # outside a scope: the map itself


@pytest.mark.parametrize("estimator", ["current_minmax", "MSE", "token_quantile"])
def test_a_quantizer_calibrated_on_a_padded_batch_ignores_the_padding(estimator):
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    x[~mask.bool()] = 1000.0
    ranges = []
    for values, scope in ((x, mask), (x[mask.bool()], None)):
        chosen = TokenQuantileEstimator(8, False, None, quantile=0.9) if estimator == "token_quantile" else estimator
        quantizer = Quantizer(8, estimator=chosen)
        quantizer.set_mode("observe")
        with real_tokens(scope):
            quantizer(values)
        ranges.append(quantizer.calibrated_range())
    assert torch.equal(ranges[0][0], ranges[1][0]) and torch.equal(ranges[0][1], ranges[1][1])
    assert float(ranges[0][1]) < 100


def _post_training(fill: int) -> tuple[dict, dict]:
    model = glue_model({"gate_type": "conditional_per_token"})
    quant = QuantConfig(transforms=("smoothquant",), token_clipping_points=("**",), token_clipping_fine_steps=2)
    batches = [(padded_batch(fill, seed), torch.tensor([0, 1, 0, 1])) for seed in range(2)]
    record = quantize_for_validation(Accelerator(cpu=True), model, None, quant, batches)
    record.pop("calibration_seconds")
    ranges = {name: (q.scale.clone(), q.zero_point.clone()) for name, q in model.quantization_points.items()}
    return record, ranges


def test_calibration_transforms_and_clipping_never_see_the_padding():
    quiet, loud = _post_training(fill=0), _post_training(fill=LOUD)
    assert _numbers(quiet[0]) == pytest.approx(_numbers(loud[0]), rel=1e-5)  # SmoothQuant, clipping's losses
    for name, (scale, zero) in quiet[1].items():
        assert torch.allclose(scale, loud[1][name][0], rtol=1e-5), name
        assert torch.equal(zero, loud[1][name][1]), name


def _figures(fill: int, llm_int8: bool = False) -> dict:
    model = glue_model({"gate_type": "conditional_per_token", "softmax": "clipped(-0.1:1.05)"})
    if llm_int8:  # its outlier channels are chosen per batch: by real tokens only
        quant = QuantConfig(llm_int8_threshold=2.0, weight_granularity="per_channel")
        quantize_for_validation(Accelerator(cpu=True), model, None, quant, [])
    batch = padded_batch(fill)
    rows = [{key: value[row, : LENGTHS[row] if key != "labels" else None].tolist() for key, value in batch.items()}
            for row in range(len(LENGTHS))]  # fmt: skip
    examples = Dataset.from_list([row | {"labels": row_index % 2} for row_index, row in enumerate(rows)])
    objective = GLUE.bound(model.config)
    pad_with = objective.collate

    def collate(items):  # pads with `fill` instead of zeros
        padded = pad_with(items)
        padded["input_ids"][padded["attention_mask"] == 0] = fill
        return padded

    objective = dataclasses.replace(objective, collate=collate)
    inputs = TextInputs(None, model.config)
    activations = ActivationStatistics(model, model.outlier_sites(), 32, VOCAB, token_ids=inputs.token_ids)
    attention, literature = AttentionStatistics(model, inputs), LiteratureStatistics(model, positions=12)
    loss = objective.loss_class(model)
    accelerator = Accelerator(cpu=True)
    results = evaluate(accelerator, loss, examples, objective, 4, probes=(activations, attention, literature))
    sites = activations.synced(accelerator)
    shares = {name: m.decomposition.counts.tolist() for name, m in model.named_modules() if hasattr(m, "decomposition")}
    return {
        "llm_int8_counts": shares,
        "results": results,
        "sites": {name: (f.inf_norm, f.kurtosis, f.outliers, f.values) for name, f in sites.items()},
        "attention": attention.synced(accelerator),
        "literature": {k: v for k, v in literature.synced(accelerator).items() if k != "position_means"},
    }


def _numbers(value) -> list[float]:
    """Every number of a nested figure structure, in order (None: NaN)."""
    if isinstance(value, dict):
        return [number for key in sorted(value) for number in _numbers(value[key])]
    if isinstance(value, list | tuple):
        return [number for item in value for number in _numbers(item)]
    return [math.nan if value is None else float(value)]


@pytest.mark.parametrize("llm_int8", [False, True], ids=["fp", "llm_int8"])
def test_evaluation_figures_never_see_the_padding(llm_int8):
    quiet, loud = _figures(fill=0, llm_int8=llm_int8), _figures(fill=LOUD, llm_int8=llm_int8)
    assert bool(quiet["llm_int8_counts"]) == llm_int8
    assert quiet["sites"]["bert.encoder.layer.0.output.dense"][3] == sum(LENGTHS) * 32  # real values only
    assert quiet.keys() == loud.keys() and quiet["attention"].keys() == loud["attention"].keys()
    assert _numbers(quiet) == pytest.approx(_numbers(loud), rel=1e-5, nan_ok=True)


@pytest.mark.parametrize("transforms", [("gamma_migration",), ("smoothquant",), ("os_plus",)])
def test_after_a_transform_every_head_reads_fp_equal_values(transforms):
    model = glue_model()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(torch.randn_like(module.weight) * 2)
                module.bias.copy_(torch.randn_like(module.bias))
    reference = copy.deepcopy(model)
    batch = padded_batch(0)
    batches = [padded_batch(0, seed) for seed in range(2)]
    with torch.no_grad():
        apply_transforms(model, QuantConfig(transforms=transforms), lambda: iter(batches))
        hidden, expected = model.body_output(batch), reference.body_output(batch)
        logits, expected_logits = model(**batch).logits, reference(**batch).logits
    assert float((hidden - expected).abs().max() / expected.abs().max()) < 1e-5
    assert torch.allclose(logits, expected_logits, atol=1e-5)


def _clipping_search(best: float) -> tuple[float, dict]:
    quantizer = Quantizer(8, estimator=TokenQuantileEstimator(8, False, None))
    quantizer.set_mode("observe")
    quantizer(torch.randn(64, 16))
    estimator = quantizer.estimator
    return search_quantile([quantizer], (1.0, 0.999, 0.99), lambda: (estimator.quantile - best) ** 2)


def test_token_clipping_searches_below_its_grid_until_the_loss_rises():
    quantile, losses = _clipping_search(best=0.9)
    assert quantile == pytest.approx(0.92)  # 0.99 -> 0.98 -> 0.96 -> 0.92 -> 0.84 (the loss rose)
    assert sorted(losses, reverse=True) == pytest.approx([1.0, 0.999, 0.99, 0.98, 0.96, 0.92, 0.84])
    inside, tried = _clipping_search(best=0.999)
    assert inside == 0.999 and len(tried) == 3  # an inner best: the grid is enough


def test_estimators_for_padded_calibration_keep_their_registry():
    assert build_estimator("MSE", 8, False, None).reads_rows is False
