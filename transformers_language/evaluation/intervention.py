"""The zero-out intervention of Sun et al. ("Massive activations", COLM 2024): does the model rely on its
largest activations?

The layer is the first whose output holds a massive activation (literature_metrics.py: above 100 and 1000x
the median), else the one with the largest top-1 / median ratio. Its entries are the `top_k` (position,
channel) pairs with the largest mean |x| over the validation sequences. Two more evaluations then set those
entries of that layer's output, in every sequence, to zero and to their mean over the validation set; a large
rise of perplexity under zero but not under the mean says the massive activations act as fixed biases.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .loop import evaluate


def choose_entries(figures: dict, top_k: int) -> tuple[int, list[tuple[int, int]], list[float]]:
    """(layer, its top_k (position, channel) entries by mean |x|, their mean values) from the synced
    LiteratureStatistics figures (with positions)."""
    massive = [layer for layer, count in enumerate(figures["massive"]) if count > 0]
    ratios = figures["top1_median"]
    layer = massive[0] if massive else max(range(len(ratios)), key=ratios.__getitem__)
    mean, mean_abs = figures["position_means"][layer]
    order = mean_abs.flatten().argsort(descending=True)[:top_k]
    width = mean_abs.shape[1]
    entries = [(int(i) // width, int(i) % width) for i in order]
    return layer, entries, [float(mean[p, c]) for p, c in entries]


@contextmanager
def entries_set(layer: nn.Module, entries: list[tuple[int, int]], values: torch.Tensor):
    """While inside, the layer's output has `values` (read at each call, so the caller may change them in place
    between passes: one hook, one compiled graph) at (position, channel) `entries` of every sequence."""
    positions = torch.tensor([p for p, _ in entries])
    channels = torch.tensor([c for _, c in entries])

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        replaced = hidden.clone()
        device = hidden.device
        reached = positions < hidden.shape[1]  # a padded batch shorter than a position leaves it alone
        entry_values = values.to(device=device, dtype=hidden.dtype)[reached.to(device)]
        replaced[:, positions[reached].to(device), channels[reached].to(device)] = entry_values
        return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def zero_out(accelerator, loss_module, model, dataset, objective, batch_size: int, figures: dict, top_k: int) -> dict:
    """The intervention's figures for all_results.json (`zero_out`): the layer, its entries and their mean
    values, and the objective's figures with the entries set to zero and to their mean."""
    layer, entries, means = choose_entries(figures, top_k)
    module = model.transformer_layers()[layer]
    result = {"layer": layer, "entries": [{"position": p, "channel": c} for p, c in entries], "means": means}
    values = torch.zeros(len(entries))
    with entries_set(module, entries, values):
        result["zero"] = evaluate(accelerator, loss_module, dataset, objective, batch_size)
        values.copy_(torch.tensor(means))
        result["mean"] = evaluate(accelerator, loss_module, dataset, objective, batch_size)
    return result
