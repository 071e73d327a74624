"""Closed-form weight updates, solved in float64 (no explicit inverses)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FactorizedMoment:
    """The LU factors of a key second moment C (float64, on C's device), computed once and reused by every edit:
    a solve with C then costs O(d²) per right-hand side instead of a new O(d³) factorisation."""

    lu: torch.Tensor
    pivots: torch.Tensor

    @classmethod
    def of(cls, moment: torch.Tensor) -> "FactorizedMoment":
        lu, pivots = torch.linalg.lu_factor(moment.double())
        return cls(lu, pivots)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """C⁻¹ rhs, for a vector or a matrix of columns."""
        columns = rhs.to(self.lu)
        solved = torch.linalg.lu_solve(self.lu, self.pivots, columns[:, None] if columns.ndim == 1 else columns)
        return solved[:, 0] if columns.ndim == 1 else solved


def rank_one_update(key: torch.Tensor, residual: torch.Tensor, second_moment: FactorizedMoment | None,
                    exact_key: torch.Tensor | None = None) -> torch.Tensor:
    """ROME: ΔW = r uᵀ / (uᵀ k₀), u = C⁻¹ k (C = I without mom2 adjustment), so that ΔW k₀ = r exactly.

    k₀ = `exact_key`, or `key` itself when None: then ΔW is the change of least C-weighted norm tr(ΔW C ΔWᵀ) with
    ΔW k = r. ROME's code takes the direction from the template-mean key k and the constraint at the bare prompt's
    key k₀ (docs/fidelity.md). Returns float64, (out, in).
    """
    k, r = key.double(), residual.double()
    k0 = k if exact_key is None else exact_key.double()
    u = k if second_moment is None else second_moment.solve(k)
    return torch.outer(r, u) / (u @ k0)


def least_squares_update(keys: torch.Tensor, residuals: torch.Tensor, second_moment: FactorizedMoment,
                         mom2_weight: float) -> torch.Tensor:
    """MEMIT: ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ with K = keys as columns, R = residuals as columns.

    `keys` is (n, d_in), `residuals` is (n, d_out); returns float64 (d_out, d_in). This ΔW minimises
    Σᵢ ‖ΔW kᵢ − rᵢ‖² + λ · tr(ΔW C ΔWᵀ). With keys as rows, (λC + KᵀK)⁻¹Kᵀ = (λC)⁻¹Kᵀ (I + K (λC)⁻¹ Kᵀ)⁻¹
    (Woodbury), so C's factors are reused and only an n × n system is new to each edit.
    """
    k = keys.to(second_moment.lu)
    r = residuals.to(second_moment.lu)
    scaled = second_moment.solve(k.T) / mom2_weight  # (λC)⁻¹ Kᵀ: (d_in, n)
    small = torch.eye(k.shape[0], dtype=k.dtype, device=k.device) + k @ scaled
    return (scaled @ torch.linalg.solve(small, r)).T


def independent_rank_one_updates(keys: torch.Tensor, residuals: torch.Tensor, second_moment: FactorizedMoment,
                                 mom2_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's request solved on its own: `least_squares_update(keys[i:i+1], residuals[i:i+1], ...)` for every i.

    With one key, the ridge solution is rank one, ΔWᵢ = rᵢ uᵢᵀ with uᵢ = (λC)⁻¹kᵢ / (1 + kᵢᵀ(λC)⁻¹kᵢ); every uᵢ comes
    from one solve with C's factors. Returns (lefts (n, d_out), rights (n, d_in)), float64: ΔWᵢ = outer(lefts[i], rights[i]).
    """
    k = keys.to(second_moment.lu)
    scaled = second_moment.solve(k.T).T / mom2_weight  # rows (λC)⁻¹kᵢ
    return residuals.to(k), scaled / (1.0 + (k * scaled).sum(dim=-1, keepdim=True))
