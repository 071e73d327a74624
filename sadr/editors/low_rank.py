"""Several cases' weight updates applied per batch row, without writing a weight.

In the single protocol every layer's update is rank one: one request gives ROME's ΔW = r uᵀ / (uᵀ k₀), and MEMIT's,
PMET's and AlphaEdit's ΔW = R Kᵀ (…)⁻¹ with a single column in R. So N independently edited models differ from the
unedited one by N low-rank terms per edited layer, and all N can run in one forward: the row of case i adds
Aᵢ (Bᵢᵀ x) to the output of each edited down-projection, x being its input, which is what W + Aᵢ Bᵢᵀ computes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from sadr.editors.update import LowRankUpdate
from sadr.models.adapters import ModelAdapter


class PerRowUpdates:
    """N independently edited versions of one model in one forward; no weight is written.

    A hook on each edited layer's MLP down-projection adds, to the output of every batch row of case i, Aᵢ (Bᵢᵀ x)
    for that case's update Aᵢ Bᵢᵀ (zero where the case leaves the layer alone). Which case each row belongs to is
    declared around each forward with `rows`; a forward without it is an error, since it would silently mix the
    cases up. Use as a context manager.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, updates: list[dict[int, LowRankUpdate]]):
        device = next(model.parameters()).device
        layers = sorted({layer for case in updates for layer in case})
        self._modules = {layer: adapter.mlp_down_module(model, layer) for layer in layers}

        def stacked(layer: int, side: str, size: int) -> torch.Tensor:
            """(cases, size, rank) float32, each case's factor padded with zero columns to the layer's highest rank."""
            rank = max(case[layer].rank for case in updates if layer in case)
            factors = torch.zeros(len(updates), size, rank, dtype=torch.float32, device=device)
            for index, case in enumerate(updates):
                if layer in case:
                    factor = getattr(case[layer], side)
                    factors[index, :, : factor.shape[1]] = factor.to(device=device, dtype=torch.float32)
            return factors

        shapes = {layer: adapter.down_weight(model, layer).shape for layer in layers}
        self._left = {layer: stacked(layer, "left", shapes[layer][0]) for layer in layers}
        self._right = {layer: stacked(layer, "right", shapes[layer][1]) for layer in layers}
        self._n_cases = len(updates)
        self._cases: torch.Tensor | int | None = None
        self._handles: list = []
        self._device = device

    @contextmanager
    def rows(self, cases: int | Sequence[int]):
        """Inside: the model's rows belong to these cases (indices into the updates), or all to one case."""
        indices = torch.as_tensor(cases, dtype=torch.long).reshape(-1)
        if indices.numel() == 0 or indices.min() < 0 or indices.max() >= self._n_cases:
            raise ValueError(f"case indices {cases} outside 0..{self._n_cases - 1}")
        self._cases = cases if isinstance(cases, int) else indices.to(self._device)
        try:
            yield
        finally:
            self._cases = None

    def _hook(self, layer: int):
        def add_updates(_module, args, output):
            if self._cases is None:
                raise RuntimeError("a forward ran with per-row updates but without saying which case each row is "
                                   "(enter PerRowUpdates.rows around it)")
            x = args[0]
            if isinstance(self._cases, int):
                cases = torch.full((x.shape[0],), self._cases, dtype=torch.long, device=self._device)
            elif len(self._cases) != x.shape[0]:
                raise RuntimeError(f"{len(self._cases)} row cases for a batch of {x.shape[0]} rows")
            else:
                cases = self._cases
            coefficients = torch.einsum("btd,bdr->btr", x.float(), self._right[layer][cases])
            return output + torch.einsum("btr,bor->bto", coefficients, self._left[layer][cases]).to(output.dtype)

        return add_updates

    def __enter__(self) -> "PerRowUpdates":
        self._handles = [module.register_forward_hook(self._hook(layer)) for layer, module in self._modules.items()]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
