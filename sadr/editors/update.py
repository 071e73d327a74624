"""Closed-form weight updates, solved in float64 (no explicit inverses)."""
from __future__ import annotations

import torch


def rank_one_update(key: torch.Tensor, residual: torch.Tensor, second_moment: torch.Tensor | None,
                    exact_key: torch.Tensor | None = None) -> torch.Tensor:
    """ROME: ΔW = r uᵀ / (uᵀ k₀), u = C⁻¹ k (C = I without mom2 adjustment), so that ΔW k₀ = r exactly.

    k₀ = `exact_key`, or `key` itself when None: then ΔW is the change of least C-weighted norm tr(ΔW C ΔWᵀ) with
    ΔW k = r. ROME's code takes the direction from the template-mean key k and the constraint at the bare prompt's
    key k₀ (docs/fidelity.md). Returns float64, (out, in).
    """
    k, r = key.double(), residual.double()
    k0 = k if exact_key is None else exact_key.double()
    u = k if second_moment is None else torch.linalg.solve(second_moment.to(k), k)
    return torch.outer(r, u) / (u @ k0)


def least_squares_update(keys: torch.Tensor, residuals: torch.Tensor, second_moment: torch.Tensor,
                         mom2_weight: float) -> torch.Tensor:
    """MEMIT: ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ with K = keys as columns, R = residuals as columns.

    `keys` is (n, d_in), `residuals` is (n, d_out); returns float64 (d_out, d_in). This ΔW minimises
    Σᵢ ‖ΔW kᵢ − rᵢ‖² + λ · tr(ΔW C ΔWᵀ).
    """
    k, r = keys.double(), residuals.double()
    system = mom2_weight * second_moment.to(k) + k.T @ k
    return torch.linalg.solve(system, k.T @ r).T
