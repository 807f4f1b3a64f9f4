"""Hadamard matrices and the fast Walsh-Hadamard transform, for the rotations of QuaRot-style recipes.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal. Orders that
are powers of two come from Sylvester's doubling; an order n = 2^k * m with m > 1 uses H_{2^k} (x) H_m with a
Paley-constructed H_m (m = q + 1 for a prime q = 3 mod 4: 12, 20, 24, 44, 48, ...; m = 2(q + 1) for a prime
q = 1 mod 4: 12, 28, 36, 60, ...), so hidden sizes such as 768 = 2^6 * 12, 1536 = 2^7 * 12 or
5120 = 2^8 * 20 are covered. `hadamard_transform(x)` computes x @ H_n^T / sqrt(n) over the last dimension
as a chain of small products, one per Kronecker factor (Sylvester blocks of up to 64, and m);
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


FACTOR_LIMIT = 64  # the largest Sylvester factor applied as one small product


@lru_cache(maxsize=32)
def _factors(n: int) -> tuple[torch.Tensor, ...]:
    """Small Hadamard matrices whose Kronecker product is H_n (fp32): Sylvester blocks of FACTOR_LIMIT
    (H_{2^(a+b)} is H_{2^a} (x) H_{2^b}), the rest of the power of two, then the Paley factor m, merged with that
    rest into one block while it stays small."""
    power, m = split_order(n)
    blocks = []
    while power >= FACTOR_LIMIT:
        blocks.append(_hadamard(FACTOR_LIMIT))
        power //= FACTOR_LIMIT
    rest = _hadamard(power)
    if m > 1 and power * m <= 4 * FACTOR_LIMIT:
        blocks.append(torch.kron(rest, _paley(m)))
    else:
        blocks += [rest] * (power > 1) + [_paley(m)] * (m > 1)
    return tuple(block.float() for block in blocks)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n^T / sqrt(n) over the last dimension (orthonormal), computed in fp32 and cast back. H_n is a
    Kronecker product of small Hadamard matrices, so each factor is one small product along its own axis of the
    reshaped x: n (a + b + ...) multiply-adds per row instead of n^2, in a few passes over memory."""
    n = x.shape[-1]
    factors = _factors(n)
    lead = x.shape[:-1]
    values = x.float().reshape(-1, *(factor.shape[0] for factor in factors))
    for axis, factor in enumerate(factors, start=1):
        values = (values.movedim(axis, -1) @ factor.to(x.device).T).movedim(-1, axis)
    return (values.reshape(*lead, n) / math.sqrt(n)).to(x.dtype)


def random_hadamard(n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
    """QuaRot's rotation: diag(random signs) H_n / sqrt(n), orthogonal, as an (n, n) matrix."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return (signs[:, None] * hadamard_matrix(n, torch.float64) / math.sqrt(n)).to(dtype)
