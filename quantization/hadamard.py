"""Hadamard matrices and the fast Walsh-Hadamard transform, for the rotations of QuaRot-style recipes.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal. Orders that
are powers of two come from Sylvester's doubling; an order n = 2^k * m with m > 1 uses H_{2^k} (x) H_m with a
Paley-constructed H_m (m = q + 1 for a prime q = 3 mod 4: 12, 20, 24, 44, 48, ...; m = 2(q + 1) for a prime
q = 1 mod 4: 12, 28, 36, 60, ...), so hidden sizes such as 768 = 2^6 * 12, 1536 = 2^7 * 12 or
5120 = 2^8 * 20 are covered. `hadamard_transform(x)` computes x @ H_n^T / sqrt(n) over the last dimension
with the butterfly (n log n) on the power-of-two factor and a dense product on the factor m;
`random_hadamard(n, generator)` is QuaRot's randomized rotation H diag(signs) / sqrt(n).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = Legendre symbol of (j - i) mod q (0 on the diagonal) for a prime q."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return chi[(index[None, :] - index[:, None]) % q]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m by Paley's constructions, or None when they give none."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:  # Paley I
        q = m - 1
        core = torch.zeros(m, m, dtype=torch.float64)
        core[0, 1:], core[1:, 0] = 1.0, -1.0
        core[1:, 1:] = _jacobsthal(q)
        return core + torch.eye(m, dtype=torch.float64)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:  # Paley II
        q = m // 2 - 1
        symmetric = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        symmetric[0, 1:], symmetric[1:, 0] = 1.0, 1.0
        symmetric[1:, 1:] = _jacobsthal(q)
        plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        minus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        eye = torch.eye(q + 1, dtype=torch.float64)
        return torch.kron(symmetric, plus) + torch.kron(eye, minus)
    return None


def split_order(n: int) -> tuple[int, int]:
    """n = 2^k * m with the Hadamard factor m (1, or a Paley order); ValueError when no split exists."""
    if n < 1:
        raise ValueError(f"A Hadamard order is positive, got {n}.")
    power = n & -n
    while power >= 1:
        m = n // power
        if m == 1 or (m % 4 == 0 and _paley(m) is not None):
            return power, m
        power //= 2
    raise ValueError(
        f"No Hadamard matrix of order {n} here: orders are 2^k times 1 or a Paley order (12, 20, 24, 28, ...)."
    )


@lru_cache(maxsize=32)
def _hadamard(n: int) -> torch.Tensor:
    power, m = split_order(n)
    matrix = torch.ones(1, 1, dtype=torch.float64)
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(power.bit_length() - 1):
        matrix = torch.kron(matrix, sylvester)
    return matrix if m == 1 else torch.kron(matrix, _paley(m))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The (unnormalised, +-1) Hadamard matrix of order n."""
    return _hadamard(n).to(dtype=dtype, device=device)


def _butterfly(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n^T (Sylvester, unnormalised) over the last dimension, n a power of two."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        x = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, n)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n^T / sqrt(n) over the last dimension (orthonormal), computed in fp32 and cast back."""
    n = x.shape[-1]
    power, m = split_order(n)
    values = x.float()
    if m == 1:
        out = _butterfly(values)
    else:  # H_power (x) H_m: the butterfly over the outer index, a dense product over the inner one
        inner = values.reshape(*x.shape[:-1], power, m) @ hadamard_matrix(m, device=x.device).T
        out = _butterfly(inner.transpose(-1, -2)).transpose(-1, -2).reshape(x.shape)
    return (out / math.sqrt(n)).to(x.dtype)


def random_hadamard(n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
    """QuaRot's rotation: diag(random signs) H_n / sqrt(n), orthogonal, as an (n, n) matrix."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return (signs[:, None] * hadamard_matrix(n, torch.float64) / math.sqrt(n)).to(dtype)
