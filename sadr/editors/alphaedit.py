"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's edit projected onto the null space of the preserved keys.

Targets, keys and the spreading of residuals over the edited layers are MEMIT's (`spread`). Only the solve
differs. For layer l, with K and R the keys and residuals of this batch as columns:

    P  = U Uᵀ, U the eigenvectors of C (the key second moment, as MEMIT's) whose eigenvalue < nullspace_threshold;
    Cₚ = Σ K Kᵀ over the batches already edited into the model (the editor's state, across a sequential run);
    X  solves (P (K Kᵀ + Cₚ) + L2 · I) X = P K Rᵀ,   ΔW = Xᵀ.

X = P (P K Rᵀ − P (K Kᵀ + Cₚ) X) / L2 lies in the range of P, so ΔW P = ΔW: the edit leaves every key in C's
dominant directions (what the model already knows) unchanged. The reference code (jianghoucheng/AlphaEdit)
computes P from the same statistics file as MEMIT's C; docs/fidelity.md lists where we differ.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import List

import torch

from sadr.cache import TORCH, cached
from sadr.conf.schema import EditorConfig
from sadr.editors.memit import MemitEditor
from sadr.editors.update import LowRankUpdate
from sadr.editors.plugin import EditorPlugin
from sadr.models.fingerprint import cache_key

log = logging.getLogger(__name__)


@dataclass
class AlphaEditConfig(EditorConfig):
    """Defaults of the authors' hparams/AlphaEdit/*.json: MEMIT's settings plus the null-space threshold and L2."""

    name: str = "alphaedit"
    context_templates: List[List[int]] = field(default_factory=lambda: [[10, 5]])  # as MEMIT
    clamp_norm_factor: float = 0.75
    nullspace_threshold: float = 2e-2  # eigenvalues of C below this span the null space the update lives in
    L2: float = 10.0  # the reference's name: the ridge weight on the projected update


def nullspace_projection(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U Uᵀ (float64), U the eigenvectors of C with eigenvalue strictly below `threshold`."""
    values, vectors = torch.linalg.eigh(second_moment.double())
    kept = vectors[:, values < threshold]
    return kept @ kept.T


def nullspace_update(keys: torch.Tensor, residuals: torch.Tensor, projection: torch.Tensor,
                     earlier_keys: torch.Tensor | None, l2: float) -> LowRankUpdate:
    """ΔW ((d_out, d_in)) = Xᵀ, X solving (P (KᵀK + Cₚ) + L2 I) X = P Kᵀ R with K, R as rows (Cₚ: the earlier keys'
    KᵀK, none before the first edit).

    X = Y R with Y solving the same system for P Kᵀ (n columns instead of d_out), so ΔW = Rᵀ Yᵀ. The system is
    assembled in place, so besides P and the solve's own copy it takes two d × d matrices (GPT-J: 2.1 GB each in
    float64), not five.
    """
    k, r = keys.double(), residuals.double()
    p = projection.to(k)
    covered = k.T @ k if earlier_keys is None else earlier_keys.to(k, copy=True).addmm_(k.T, k)  # Cₚ + KᵀK
    system = p @ covered
    del covered
    system.diagonal().add_(l2)
    return LowRankUpdate(r.T, torch.linalg.solve(system, p @ k.T))


def first_update(key: torch.Tensor, residual: torch.Tensor, projection: torch.Tensor, l2: float) -> LowRankUpdate:
    """`nullspace_update` of one request (rows of one) with no earlier keys, in closed form: the system is
    L2 I + (P k) kᵀ, so Y = P k / (L2 + kᵀ P k) (Sherman–Morrison), O(d²) instead of a d × d product and solve
    (GPT-J: about 12 TFLOP in float64 per request and layer)."""
    k, r = key.double()[0], residual.double()
    pk = projection.to(k) @ k
    return LowRankUpdate(r.T, (pk / (l2 + k @ pk))[:, None])


class AlphaEditEditor(MemitEditor):
    def __init__(self, model, adapter, tokenizer, hparams, *, statistics, context_templates, regularizers=()):
        super().__init__(model, adapter, tokenizer, hparams, statistics=statistics,
                         context_templates=context_templates, regularizers=regularizers)
        self._projections: dict[int, torch.Tensor] = {}
        self.earlier_keys: dict[int, torch.Tensor] = {}

    def second_moments(self) -> dict:
        """What `solve` is given per layer: P, the projection onto C's null space, on the model's device. AlphaEdit
        solves with P, never with C, so each C is taken from the statistics and released once its P is made: the
        device holds the Ps and at most one C (GPT-J: 12.9 GB less than keeping the six Cs next to their Ps)."""
        missing = [layer for layer in self.layers if layer not in self._projections]
        for layer, moment in self.statistics.take(missing).items():
            self._projections[layer] = self._nullspace(layer, moment)
        return {layer: self._projections[layer] for layer in self.layers}

    def _nullspace(self, layer: int, second_moment: torch.Tensor) -> torch.Tensor:
        """P from the disk cache (keyed by C's content), else computed on the model's device."""
        device = next(self.model.parameters()).device
        digest = hashlib.sha256(second_moment.double().contiguous().cpu().numpy().tobytes()).hexdigest()
        key = cache_key(kind="nullspace", second_moment=digest, threshold=self.hparams.nullspace_threshold)
        path = self.statistics.cache_dir / "nullspace" / f"{key}.pt"
        projection = cached(path, lambda: nullspace_projection(second_moment.to(device),
                                                               self.hparams.nullspace_threshold).cpu(), TORCH).to(device)
        log.info("layer %d: null space of dimension %d of %d (nullspace_threshold=%g)", layer,
                 round(torch.trace(projection).item()), projection.shape[0], self.hparams.nullspace_threshold)
        return projection

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor, projection: torch.Tensor) -> LowRankUpdate:
        earlier = self.earlier_keys.get(layer)
        update = nullspace_update(keys, residuals, projection, earlier, self.hparams.L2)
        # a layer's keys depend only on the layers below it, so these are the keys of the edited model
        k = keys.double().cpu()
        self.earlier_keys[layer] = k.T @ k if earlier is None else earlier + k.T @ k
        return update

    def solve_each(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor, projection: torch.Tensor) -> list[LowRankUpdate]:
        """Each row's request solved alone: every solve sees the keys preserved so far, not the other rows'. Before any
        edit (the single protocol's case), in closed form."""
        earlier = self.earlier_keys.get(layer)
        if earlier is None:
            return [first_update(keys[row : row + 1], residuals[row : row + 1], projection, self.hparams.L2)
                    for row in range(len(keys))]
        return [nullspace_update(keys[row : row + 1], residuals[row : row + 1], projection, earlier, self.hparams.L2)
                for row in range(len(keys))]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "earlier_keys": {layer: m.clone() for layer, m in self.earlier_keys.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        # in host memory as float64, where `solve` adds to them, whatever device the state was loaded onto
        self.earlier_keys = {layer: m.detach().to("cpu", torch.float64, copy=True) for layer, m in state["earlier_keys"].items()}


EDITOR = EditorPlugin("alphaedit", AlphaEditConfig, AlphaEditEditor,
                      "AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the preserved keys' null space")
