"""Weight-decay groups, the final-LR floor of the schedule, and the activation statistics of telemetry."""

import math

import pytest
import scipy.stats
import torch

from tests.conftest import tiny_config
from transformers_language import AttentionConfig, build_model
from transformers_language.arguments import typed_group
from transformers_language.evaluation.metrics import per_sequence_stats
from transformers_language.jobs.job_args import TrainingArgs
from transformers_language.training.optim import build_optimizer, build_scheduler, weight_decay_groups


def _names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("decay_layernorm_weight", [False, True])
def test_weight_decay_groups(model_type, decay_layernorm_weight):
    attention = AttentionConfig(gate_type="conditional_per_token")
    model = build_model(tiny_config(model_type), attention)
    decay, no_decay = weight_decay_groups(model, 0.1, decay_layernorm_weight)
    decayed, not_decayed = _names(model, decay["params"]), _names(model, no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert not decayed & not_decayed
    assert decayed | not_decayed == {name for name, _ in model.named_parameters()}
    layernorm_weights = {
        n for n in decayed | not_decayed if ("LayerNorm" in n or "layer_norm" in n) and n.endswith("weight")
    }
    assert layernorm_weights
    assert (layernorm_weights <= decayed) == decay_layernorm_weight
    assert (layernorm_weights <= not_decayed) == (not decay_layernorm_weight)
    assert all(not n.endswith("bias") for n in decayed)
    assert any(".gate." in n and n.endswith("weight") for n in decayed)  # gate matrices decay
    assert any(n.endswith("q_proj.weight") or n.endswith("query.weight") for n in decayed)


def test_unconditional_gate_logits_do_not_decay():
    model = build_model(tiny_config("opt"), AttentionConfig(gate_type="unconditional_per_head"))
    _, no_decay = weight_decay_groups(model, 0.1, True)
    assert any(name.endswith("gate.logits") for name in _names(model, no_decay["params"]))


def _lrs(name, warmup, total, final, peak=1e-3):
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer(torch.nn.Linear(2, 2), peak, 0.0, False, (0.9, 0.95), 1e-8)
    optimizer.add_param_group({"params": [parameter]})
    scheduler = build_scheduler(optimizer, name, warmup, total, final)
    values = []
    for _ in range(total + 1):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_linear_decay_ends_at_the_final_fraction():
    lrs = _lrs("linear", warmup=10, total=110, final=0.1)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lrs[110] == pytest.approx(1e-4)
    assert lrs == sorted(lrs[:11]) + sorted(lrs[11:], reverse=True)


def test_final_fraction_zero_is_the_stock_schedule():
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    stock = get_scheduler("cosine", optimizer, num_warmup_steps=5, num_training_steps=50)
    expected = [stock.lr_lambdas[0](step) * 1e-3 for step in range(51)]
    assert _lrs("cosine", warmup=5, total=50, final=0.0) == pytest.approx(expected)


def test_schedule_errors():
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="Unknown --lr_scheduler_type 'triangle'; valid schedules: linear"):
        build_scheduler(optimizer, "triangle", 0, 10, 0.0)
    with pytest.raises(ValueError, match=r"--final_lr_fraction must lie in \[0, 1\], got 1.5"):
        typed_group(TrainingArgs, {"output_dir": "out", "final_lr_fraction": 1.5})  # checked with the flag


def test_per_sequence_stats_match_scipy():
    activations = torch.randn(3, 7, 16) * torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1)
    activations[1, 2, 5] = 40.0  # an outlier raises kurtosis
    inf_norm, kurtosis = per_sequence_stats(activations)
    for row in range(3):
        values = activations[row].flatten().double().numpy()
        assert inf_norm[row].item() == pytest.approx(abs(values).max())
        assert kurtosis[row].item() == pytest.approx(scipy.stats.kurtosis(values, fisher=False), rel=1e-4)
    assert kurtosis[1] > 20 and math.isfinite(kurtosis[0].item())
