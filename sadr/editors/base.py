"""What every editor provides: `apply`, and its state, which restores edited weights bit for bit."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from sadr.data.records import EditRequest
from sadr.editors.update import LowRankUpdate
from sadr.models.adapters import ModelAdapter


@dataclass
class EditOutcome:
    """Weight changes (layer -> ΔW as low-rank factors, float64, (out, in)), timings and diagnostics.

    From `Editor.apply`, the updates have been written into the model; from `Editor.apply_each`, nothing is written.
    """

    updates: dict[int, LowRankUpdate] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, float] = field(default_factory=dict)

    def without_updates(self) -> "EditOutcome":
        """What a case's row reads of this outcome, its timings and diagnostics. Updates already written are not needed
        to evaluate the edited model, and a large batch's fill its device: MEMIT's for 10,000 requests on GPT-J
        take 1.6 GB per layer in float64 (and a `SpreadOutcome`'s keys 0.66 GB more)."""
        return EditOutcome(seconds=self.seconds, diagnostics=self.diagnostics)


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

    def prepare(self) -> None:
        """Make what every edit needs and is made once (C's factors, AlphaEdit's projections) before the first edit.
        The runner calls it before its progress over the cases starts, so that their rate and ETA are the cases' own;
        an edit without it makes the same on first use."""

    @abstractmethod
    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        """Edit the model in place and report what was written."""

    def apply_each(self, requests: list[EditRequest]) -> list[EditOutcome]:
        """Edit each request alone into the model as it is, as `apply([request])` would, and leave the model as it was.

        For the single protocol's parallel cases: each outcome holds its updates, unwritten. This default
        runs `apply` request by request; editors whose δ-optimisations can share forwards override it.
        """
        return self._each_alone(requests, lambda _index, request: self.apply([request]), {})

    def _each_alone(self, requests: list[EditRequest], edit_one: Callable[[int, EditRequest], EditOutcome],
                    shared_seconds: dict[str, float]) -> list[EditOutcome]:
        """`edit_one(index, request)` writes one request's update; it runs from the current state for every request,
        which is restored after each. `shared_seconds` (work done for all requests at once) is split evenly among them.
        """
        state = self.state_dict()
        outcomes = []
        for index, request in enumerate(requests):
            try:
                written = edit_one(index, request)
                self._check_reported(written, state)
            finally:
                self.load_state_dict(state)
            seconds = dict(written.seconds)
            for name, value in shared_seconds.items():
                seconds[name] = seconds.get(name, 0.0) + value / len(requests)
            outcomes.append(EditOutcome(updates=written.updates, seconds=seconds, diagnostics=written.diagnostics))
        return outcomes

    def _check_reported(self, outcome: EditOutcome, before: dict) -> None:
        """Every layer whose weight the edit changed has its update in `outcome`: parallel cases are evaluated from the
        updates alone, so one left out would be scored as unedited, silently."""
        unreported = [layer for layer, weight in before.get("weights", {}).items() if layer not in outcome.updates
                      and not torch.equal(self.adapter.down_weight(self.model, layer), weight)]
        if unreported:
            raise RuntimeError(f"{type(self).__name__} wrote layer(s) {unreported} without reporting them in "
                               "EditOutcome.updates; editor.parallel_cases evaluates edits from those updates alone, "
                               "so apply must report every ΔW it writes (as a LowRankUpdate)")

    def state_dict(self) -> dict:
        """Copies of everything an edit changes."""
        return {"weights": {layer: self.adapter.down_weight(self.model, layer).detach().clone() for layer in self.layers}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for layer, weight in state["weights"].items():
            self.adapter.down_weight(self.model, layer).copy_(weight)
