"""Summed cross-entropy of a linear output layer, computed in row chunks without keeping the logits.

`sum_i [logsumexp(h_i W^T + b) - (h_i W^T + b)_{y_i}]` over rows with a target (`IGNORE_INDEX` rows count
nothing). The vocabulary projection is the largest activation of a small language model (OPT-small:
2048 tokens x 8192 logits, 64 MiB in fp32, held several times over by log-softmax and its backward). Here
each chunk's logits live only while that chunk is processed: the forward pass also forms the gradients
(softmax minus one-hot, times W and times h), and the backward pass only scales them by the incoming
gradient. Same matmuls as the plain path, a fraction of its memory traffic and peak memory.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in fp32)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, needs_grad: bool):
        compute_dtype = hidden.dtype
        if torch.is_autocast_enabled(hidden.device.type):
            compute_dtype = torch.get_autocast_dtype(hidden.device.type)
        w = weight.to(compute_dtype)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads = None
        if needs_grad:
            grads = (
                torch.empty_like(hidden),
                torch.zeros_like(weight, dtype=torch.float32),
                None if bias is None else torch.zeros_like(bias, dtype=torch.float32),
            )
        # Rows without a target are few (CLM: the last position; MLM: bucket padding): zero just those rows.
        ignored_rows = (targets == IGNORE_INDEX).nonzero().squeeze(1)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows].to(compute_dtype)
            target = targets[start : start + rows]
            logits = (h @ w.t()).float()
            if bias is not None:
                logits += bias.float()
            valid = target != IGNORE_INDEX
            safe_target = target.clamp_min(0).unsqueeze(1)
            target_logit = logits.gather(1, safe_target).squeeze(1)
            # One pass of exp, in place: logits become exp(logits - max), then probabilities.
            row_max = logits.amax(dim=-1, keepdim=True)
            exp_sum = logits.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
            lse = (row_max + exp_sum.log()).squeeze(1)
            total += ((lse - target_logit) * valid).sum()
            if grads is None:
                continue
            # d(sum NLL)/d logits = softmax - one_hot(target), zero on ignored rows.
            logits.div_(exp_sum)
            logits.scatter_add_(1, safe_target, torch.full_like(safe_target, -1, dtype=logits.dtype))
            ignored = ignored_rows[(ignored_rows >= start) & (ignored_rows < start + rows)] - start
            logits.index_fill_(0, ignored, 0.0)
            grad_logits = logits.to(compute_dtype)
            grads[0][start : start + rows] = grad_logits @ w
            if compute_dtype == torch.float32:
                grads[1].addmm_(grad_logits.t(), h)
            else:  # the matmul in bf16 / fp16 (3x faster on a CPU), summed over chunks in fp32
                grads[1].add_(grad_logits.t() @ h)
            if bias is not None:
                grads[2].add_(logits.sum(0))
        if grads is not None:
            ctx.save_for_backward(*(g for g in grads if g is not None))
            ctx.has_bias = bias is not None
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = ctx.saved_tensors
        grad_hidden = saved[0] * grad_total.to(saved[0].dtype)
        grad_weight = (saved[1] * grad_total).to(ctx.dtypes[0])
        grad_bias = (saved[2] * grad_total).to(ctx.dtypes[1]) if ctx.has_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Summed NLL of `targets` (N,) under logits `hidden (N, d) @ weight (V, d)^T + bias (V,)`, as fp32."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, needs_grad)
