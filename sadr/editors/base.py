"""What every editor provides: `apply`, and its state, which restores edited weights bit for bit."""
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
    """Computes and writes weight updates for a batch of requests.

    Its state is everything an edit changes: the MLP down-projection weights of `layers`, and whatever else a
    subclass carries from one edit to the next (it extends `state_dict` / `load_state_dict`). Loading a state
    taken earlier restores the model and the editor bit for bit.
    """

    model: torch.nn.Module
    adapter: ModelAdapter
    #: Layers whose MLP down-projection weights this editor may change.
    layers: list[int]

    @abstractmethod
    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        """Edit the model in place and report what was written."""

    def state_dict(self) -> dict:
        """Copies of everything an edit changes."""
        return {"weights": {layer: self.adapter.down_weight(self.model, layer).detach().clone() for layer in self.layers}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for layer, weight in state["weights"].items():
            self.adapter.down_weight(self.model, layer).copy_(weight)
