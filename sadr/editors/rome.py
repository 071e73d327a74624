"""ROME (Meng et al., 2022): a rank-one update of one MLP down-projection per request (method.md §2).

k̄ is the key averaged over the context templates; v* is the MLP output at the bare prompt's subject token plus
the optimised δ. By default (`rome_update: reference`, as ROME's code computes it) the update is exact at the bare
prompt's key k₀ along the direction C⁻¹ k̄; `rome_update: paper` makes the layer map k̄ itself to v* (the paper's
equation). docs/fidelity.md compares the two.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List

import torch

from sadr.conf.schema import EditorConfig
from sadr.data.records import EditRequest
from sadr.editors.base import EditOutcome, Editor, timed
from sadr.editors.covariance import SecondMomentStatistics
from sadr.editors.delta import DeltaObjective, DeltaResult, delta_diagnostics, optimize_delta, optimize_deltas
from sadr.editors.delta_checkpoint import timed_deltas
from sadr.editors.keys import mean_keys
from sadr.editors.plugin import EditorPlugin
from sadr.editors.update import rank_one_update
from sadr.errors import InvalidSettingError
from sadr.models.adapters import ModelAdapter

BARE_PROMPT = "{}"  # the context template of the prompt alone


class RomeUpdate(Enum):
    reference = "reference"  # ΔW k₀ = v* − (W k₀ + b) at the bare prompt's key k₀, direction C⁻¹ k̄ (ROME's code)
    paper = "paper"  # ΔW k̄ = v* − (W k̄ + b) at the template-mean key k̄ (the ROME paper's equation)


@dataclass
class RomeConfig(EditorConfig):
    """ROME's defaults; per-model values come from hparams/rome_<model>.yaml."""

    name: str = "rome"
    # bare prompt + 10 prefixes of <=5 tokens + 10 of <=10 tokens
    context_templates: List[List[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    mom2_adjustment: bool = True  # u = C⁻¹ k̄; false: u = k̄
    rome_update: RomeUpdate = RomeUpdate.reference  # which key the edit is exact for (docs/fidelity.md)


class RomeEditor(Editor):
    def __init__(self, model, adapter: ModelAdapter, tokenizer, hparams, *, statistics: SecondMomentStatistics,
                 context_templates: list[str], regularizers=()):
        if len(hparams.layers) != 1:
            raise InvalidSettingError(f"ROME edits exactly one layer; editor.layers={list(hparams.layers)}")
        self.model, self.adapter, self.tokenizer, self.hparams = model, adapter, tokenizer, hparams
        self.layer = int(hparams.layers[0])
        self.layers = [self.layer]
        self.statistics, self.context_templates, self.regularizers = statistics, context_templates, list(regularizers)
        self.objective = DeltaObjective.from_hparams(hparams, sites=("mlp_out",), layer=self.layer)

    def apply(self, requests: list[EditRequest]) -> EditOutcome:
        """Requests are applied one after another, each seeing the previous ones' updates (as ROME does)."""
        outcome = EditOutcome()
        deltas = []
        for request in requests:
            ((second_moment, key, exact_key),) = self._keys([request], outcome.seconds)
            with timed_deltas(outcome.seconds, "v_star"):
                deltas.append(optimize_delta(self.model, self.adapter, self.tokenizer, request, self.context_templates,
                                             self.objective, self.regularizers))
            self._write(second_moment, key, exact_key, deltas[-1], outcome)
        outcome.diagnostics.update(delta_diagnostics(deltas))
        return outcome

    def apply_each(self, requests: list[EditRequest]) -> list[EditOutcome]:
        """Every request's keys and δ computed in shared forwards on the model as it is; then each update on its own."""
        shared: dict[str, float] = {}
        keys = self._keys(requests, shared)
        with timed(shared, "v_star"):
            deltas = optimize_deltas(self.model, self.adapter, self.tokenizer, requests, self.context_templates,
                                     self.objective, self.regularizers)
        return self._each_alone(requests, lambda i, _request: self._write(
            *keys[i], deltas[i], EditOutcome(diagnostics=delta_diagnostics([deltas[i]]))), shared)

    def _second_moment(self):
        """C's factors at the edited layer, or None without the mom2 adjustment (C = I)."""
        return self.statistics.factorized([self.layer])[self.layer] if self.hparams.mom2_adjustment else None

    def prepare(self) -> None:
        self._second_moment()

    def _keys(self, requests: list[EditRequest], seconds: dict[str, float]) -> list[tuple]:
        """Per request: C (or None), the template-mean key k̄ and the key the update is exact for."""
        with timed(seconds, "covariance"):
            second_moment = self._second_moment()
        with timed(seconds, "k_star"):
            keys = self._mean_keys(requests, self.context_templates)
            reference = self.hparams.rome_update is RomeUpdate.reference
            exact_keys = self._mean_keys(requests, [BARE_PROMPT]) if reference else keys
        return [(second_moment, key, exact_key) for key, exact_key in zip(keys, exact_keys)]

    def _write(self, second_moment, key, exact_key, delta: DeltaResult, outcome: EditOutcome) -> EditOutcome:
        """Write the update that maps the exact key to v* = v₀ + δ; add it and its time to `outcome`."""
        with timed(outcome.seconds, "update"):
            # v* − (W k₀ + b): the module's own output at the key the edit is exact for, bias included
            down = self.adapter.mlp_down_module(self.model, self.layer)
            current = down(exact_key[None].to(down.weight.dtype))[0].float()
            update = rank_one_update(key, delta.target("mlp_out") - current, second_moment, exact_key)
            self.adapter.add_to_down_weight(self.model, self.layer, update)
        earlier = outcome.updates.get(self.layer)
        outcome.updates[self.layer] = update if earlier is None else earlier + update
        return outcome

    def _mean_keys(self, requests: list[EditRequest], context_templates: list[str]) -> torch.Tensor:
        return mean_keys(self.model, self.adapter, self.tokenizer, [self.layer], requests, context_templates)[self.layer]


def layers_whose_c_rome_reads(hparams) -> list[int]:
    """Its layer's, with the mom2 adjustment; none without it (C = I)."""
    return list(hparams.layers) if hparams.mom2_adjustment else []


EDITOR = EditorPlugin("rome", RomeConfig, RomeEditor, "ROME (Meng et al., 2022): a rank-one update of one MLP layer",
                      statistics_layers=layers_whose_c_rome_reads)
