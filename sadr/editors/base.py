"""What every editor provides, and the snapshot that restores edited weights bit for bit."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from sadr.data.records import EditRequest
from sadr.models.adapters import ModelAdapter


@dataclass
class EditOutcome:
    """Weight changes written into the model (layer -> ΔW, float64, (out, in)), timings and diagnostics."""

    updates: dict[int, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, float] = field(default_factory=dict)


@contextmanager
def timed(seconds: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


class Editor(ABC):
    """Computes and writes weight updates for a batch of requests."""

    #: Layers whose MLP down-projection weights this editor may change.
    layers: list[int]

    @abstractmethod
    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        """Edit the model in place and report what was written."""


class WeightSnapshot:
    """Copies of the down-projection weights an editor may touch, to restore them exactly."""

    def __init__(self, model, adapter: ModelAdapter, layers: list[int]):
        self._saved = {layer: adapter.down_weight(model, layer).detach().clone() for layer in layers}
        self._model, self._adapter = model, adapter

    @torch.no_grad()
    def restore(self) -> None:
        for layer, saved in self._saved.items():
            self._adapter.down_weight(self._model, layer).copy_(saved)
