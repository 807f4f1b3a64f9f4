"""GPTQ (Frantar et al., ICLR 2023): round a Linear's weight column by column onto its grid, moving each
column's rounding error onto the columns not yet rounded so that the layer's output on the calibration inputs
changes least.

For inputs X (rows: real tokens), the layer-wise error ||X W^T - X W_q^T||^2 has Hessian H = 2 X^T X / N over
the input channels. Columns are rounded in order (or by descending diag H: `act_order`); after column j, the
remaining columns move by -(w_j - q_j) / U_jj * U_j,(j+1):, with U the upper Cholesky factor of
(H + lambda I)^-1 and lambda = `damping` * mean(diag H). Columns are processed in blocks of `block_size` whose
updates reach the later columns in one product (lazy batch updates). The grid is given per weight entry
(a scale and zero point broadcast against the weight: per tensor, per output channel, or per group of input
channels, the groups fixed from the weights before rounding), so the result lies exactly on the grid the
weight quantizer holds; with an identity Hessian nothing moves and GPTQ is round-to-nearest.
"""

from __future__ import annotations

import torch

from .token_mask import real_rows


class HessianAccumulator:
    """H = 2 X^T X / N over the real-token rows X of every input it sees (fp32, on the input's device)."""

    def __init__(self, features: int):
        self.features = features
        self.sum: torch.Tensor | None = None
        self.rows = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        rows = real_rows(x.detach()).reshape(-1, self.features).float()
        if self.sum is None:
            self.sum = torch.zeros(self.features, self.features, device=rows.device)
        self.sum.addmm_(rows.T, rows)
        self.rows += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.sum is None or self.rows == 0:
            raise RuntimeError("GPTQ saw no calibration inputs for this layer.")
        return 2.0 * self.sum / self.rows


def round_to_grid(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int
) -> torch.Tensor:
    """Round-to-nearest on the grid, in the arithmetic of the quantizers (round(w * (1 / s)), clamp, times s)."""
    zero = zero_point.float()
    return (w * (1.0 / scale)).round().clamp(q_min - zero, q_max - zero) * scale


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    q_min: int,
    q_max: int,
    block_size: int = 128,
    damping: float = 0.01,
    act_order: bool = False,
) -> torch.Tensor:
    """The GPTQ-rounded (out, in) `weight` (fp32, on the grid of `scale` / `zero_point`, each broadcast to the
    weight's shape) for the input Hessian `hessian` (in, in)."""
    rows, columns = weight.shape
    w = weight.detach().float().clone()
    scale = scale.float().expand(rows, columns).clone()
    zero_point = zero_point.expand(rows, columns).clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # inputs that never move: their columns cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(columns, device=w.device)
    w, scale, zero_point = w[:, order], scale[:, order], zero_point[:, order]
    h = h[order][:, order]
    h.diagonal().add_(damping * h.diagonal().mean())
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    quantized = torch.empty_like(w)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        block_inverse = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            q = round_to_grid(block[:, i], scale[:, column], zero_point[:, column], q_min, q_max)
            quantized[:, column] = q
            error = (block[:, i] - q) / block_inverse[i, i]
            block[:, i:] -= error[:, None] * block_inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    restore = torch.empty_like(order)
    restore[order] = torch.arange(columns, device=order.device)
    return quantized[:, restore].to(weight.dtype)
