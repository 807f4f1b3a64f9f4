"""The optimizers (AdamW with the paper's weight-decay groups; Muon for the hidden matrices beside it) and
the learning-rate schedule with a final-LR floor.

Muon (Jordan et al. 2024, `torch.optim.Muon`) orthogonalises the momentum of each 2-D weight matrix inside the
transformer layers (attention and FFN projections); embeddings, the LM head, norms, biases and the attention
variants' own parameters (gates, sinks, learned keys) stay on AdamW. Muon's update RMS is matched to AdamW's
(`adjust_lr_fn='match_rms_adamw'`, Moonshot AI's recipe), so one learning rate suits both; `--muon_learning_rate`
sets Muon's apart. Both run as one optimizer object, so checkpoints, resume and the schedule see one thing.

Weight decay skips biases, LayerNorm parameters and the per-head gate logits; `--wd_LN_gamma` puts the
LayerNorm weights (gamma) back into the decayed group, which on its own reduces OPT's outliers (paper,
section 5). The schedule is `transformers.get_scheduler`; after warmup its factor f is mapped to
`final + (1 - final) * f`, so linear decay ends at `final_lr_fraction` of the peak at `max_train_steps`.
The scheduler is stepped once per optimizer step by the training loop itself (never per process or per
micro-batch), which keeps it right under gradient accumulation and any number of processes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from ..errors import UsageError
from ..models.norms import is_norm

_FUSED_DEVICES = ("cpu", "cuda")

# Schedules built on LambdaLR, which the final-LR floor can wrap.
SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


def weight_decay_groups(model: nn.Module, weight_decay: float, decay_layernorm_weight: bool) -> list[dict]:
    """Two parameter groups: decayed (matrices, embeddings; LayerNorm / RMSNorm gamma with
    `decay_layernorm_weight`) and not decayed (biases, norm parameters, gate logits)."""
    layernorm_weights = {
        id(module.weight) for module in model.modules() if is_norm(module) and module.weight is not None
    }
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        if id(param) in layernorm_weights:
            (decay if decay_layernorm_weight else no_decay).append(param)
        elif param.ndim < 2 or name.endswith("bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def muon_parameter_names(model: nn.Module) -> list[str]:
    """The hidden weight matrices Muon trains: 2-D weights of the Linear layers inside the transformer layers,
    except the attention variants' own (gate networks)."""
    layers = model.family.layers_path + "."
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(layers) and ".attention_variant." not in name
    ]


class MuonWithAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` on some parameters and fused `torch.optim.AdamW` on the rest, as one optimizer: its
    `param_groups` and `state` are the two optimizers' own (Muon's groups first), so the schedule, gradient
    clipping and checkpoints treat it like any optimizer."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})
        self._link()

    def _link(self) -> None:
        """Point both optimizers at this object's groups and state (a loaded state dict replaces them)."""
        count = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:count], self.param_groups[count:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def _adamw(groups: list[dict], learning_rate: float, betas, eps) -> torch.optim.AdamW:
    # The fused kernel (one pass over all tensors) is 4x faster than the default loop on CPU.
    fused = all(p.device.type in _FUSED_DEVICES and p.dtype.is_floating_point for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)


OPTIMIZERS = ("adamw", "muon")


def build_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    decay_layernorm_weight: bool,
    betas: tuple[float, float],
    eps: float,
    optimizer: str = "adamw",
    muon_learning_rate: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW over the weight-decay groups, or (`optimizer='muon'`) Muon for the hidden matrices with AdamW for
    the rest; Muon's rate defaults to `learning_rate` and its decoupled weight decay is `weight_decay`."""
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"Unknown --optimizer {optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}.")
    groups = weight_decay_groups(model, weight_decay, decay_layernorm_weight)
    if optimizer == "adamw":
        return _adamw(groups, learning_rate, betas, eps)
    parameters = dict(model.named_parameters())
    hidden = [parameters[name] for name in muon_parameter_names(model) if parameters[name].requires_grad]
    if not hidden:
        raise UsageError("--optimizer muon found no hidden weight matrices to train (all frozen?); use adamw.")
    chosen = {id(p) for p in hidden}
    for group in groups:
        group["params"] = [p for p in group["params"] if id(p) not in chosen]
    muon = torch.optim.Muon(
        hidden,
        lr=learning_rate if muon_learning_rate is None else muon_learning_rate,
        weight_decay=weight_decay,
        adjust_lr_fn="match_rms_adamw",
    )
    return MuonWithAdamW(muon, _adamw([g for g in groups if g["params"]], learning_rate, betas, eps))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    warmup_steps: int,
    training_steps: int,
    final_lr_fraction: float,
    start_step: int = 0,
) -> LambdaLR:
    """The learning-rate schedule, positioned at `start_step`. The rate is a pure function of the flags and the
    step, so a resumed run rebuilds it at its step (and a changed --learning_rate takes effect there)."""
    if name not in SCHEDULES:
        raise UsageError(f"Unknown --lr_scheduler_type {name!r}; valid schedules: {', '.join(SCHEDULES)}.")
    base = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=training_steps)
    base_factor = base.lr_lambdas[0]

    def factor(step: int) -> float:
        value = base_factor(step)
        return value if step < warmup_steps else final_lr_fraction + (1.0 - final_lr_fraction) * value

    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    return LambdaLR(optimizer, factor, last_epoch=start_step - 1)  # its first step() moves it to start_step
