"""What MEMIT and PMET share: one δ-optimisation per request at the last edited layer, then the targets
spread over the edited layers' MLP down-projections by one ridge solve per layer (method.md §2).

For layer lᵢ, i = 0..m−1 in order, with the layers before it already written:

    K  = each request's key at lᵢ, recomputed on the partly edited model;
    R  = (z − current output of the target site at l_m) / divisor(m − i);
    ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ (λ = mom2_update_weight), written before the next layer's keys are read.

MEMIT divides by m − i, PMET by √(m − i); either way the last layer takes the full remaining residual.
Two details of the public MEMIT code (inherited by PMET and the SADR repo) are kept:

* a key is the mean over template *groups* of the mean within each group (MEMIT's `compute_ks`): the bare
  prompt is a group of its own, so with `context_templates: [[10, 5]]` it weighs 1/2 and each of the five
  prefixed prompts 1/10 (ROME instead averages all templates alike);
* the current output is read at the subject's last token of the bare prompt only (MEMIT's
  `get_module_input_output_at_words` over the requests' own prompts), the prompt whose δ = 0 output z is
  built on, so before any write R = δ divided by MEMIT's m or PMET's √m, exactly.
"""
from __future__ import annotations

from abc import abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from sadr.data.records import EditRequest
from sadr.editors.base import EditOutcome, Editor, timed
from sadr.editors.capture import capture_outputs, stop_after
from sadr.editors.covariance import SecondMomentStatistics
from sadr.editors.delta import SITES, DeltaObjective, DeltaResult, delta_diagnostics, optimize_delta, optimize_deltas
from sadr.editors.delta_checkpoint import timed_deltas
from sadr.editors.keys import mean_keys
from sadr.editors.low_rank import PerRowUpdates
from sadr.editors.prompts import encode_subject_prompts
from sadr.editors.update import LowRankUpdate, independent_rank_one_updates, least_squares_update
from sadr.errors import InvalidSettingError
from sadr.evaluation.case_rows import CaseRows, one_model
from sadr.models.adapters import ModelAdapter


def template_groups(context_templates: list[str], length_params) -> list[list[str]]:
    """Split the flat template list into the bare prompt and one group per [max_tokens, count] entry."""
    sizes = [1] + [int(count) for _max_tokens, count in length_params]
    if sum(sizes) != len(context_templates):
        raise InvalidSettingError(f"{len(context_templates)} context templates do not match editor.context_templates="
                                  f"{[list(p) for p in length_params]} (1 bare prompt + {sum(sizes) - 1} prefixes)")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [context_templates[start : start + size] for start, size in zip(starts, sizes) if size]


def grouped_mean_keys(model, adapter: ModelAdapter, tokenizer, layer: int, requests: list[EditRequest],
                      groups: list[list[str]], case_rows: CaseRows = one_model) -> torch.Tensor:
    """(n_requests, d_in) float32: the mean over template groups of each group's mean key."""
    per_group = [mean_keys(model, adapter, tokenizer, [layer], requests, group, case_rows=case_rows)[layer]
                 for group in groups]
    return torch.stack(per_group).mean(0)


@torch.no_grad()
def bare_prompt_outputs(model, adapter: ModelAdapter, tokenizer, site: str, layer: int, requests: list[EditRequest],
                        batch_size: int = 64, case_rows: CaseRows = one_model) -> torch.Tensor:
    """(n_requests, hidden) float32: the output of `site` of block `layer` at each bare prompt's subject token
    (`case_rows` as in `mean_keys`)."""
    device = next(model.parameters()).device
    module = {layer: SITES[site](adapter, model, layer)}
    chunks = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        enc = encode_subject_prompts(tokenizer, [r.prompt for r in chunk], [r.subject for r in chunk])
        batch = enc.batch.to(device)
        with capture_outputs(module) as captured, case_rows(list(range(start, start + len(chunk)))), \
                stop_after(module[layer]):
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        rows = torch.arange(len(chunk), device=device)
        chunks.append(captured[layer][rows, enc.subject_positions.to(device)].float())
    return torch.cat(chunks)


@dataclass
class LayerSolve:
    """One layer's ridge problem as solved: ΔW (λC + KᵀK) = Rᵀ K, with K and R as rows."""

    layer: int
    keys: torch.Tensor  # (n, d_in) float32
    residuals: torch.Tensor  # (n, d_out) float32, already divided
    update: LowRankUpdate  # ΔW, (d_out, d_in), written into the down-projection


@dataclass
class SpreadOutcome(EditOutcome):
    solves: list[LayerSolve] = field(default_factory=list)


class SpreadEditor(Editor):
    """A MEMIT-style editor; subclasses name the δ sites, the site whose target is written, and the divisor."""

    #: δ-optimisation sites at the last edited layer.
    delta_sites: tuple[str, ...]
    #: The site whose target z the MLP down-projections must produce, and whose current output R is read from.
    target_site: str

    def __init__(self, model, adapter: ModelAdapter, tokenizer, hparams, *, statistics: SecondMomentStatistics,
                 context_templates: list[str], regularizers=()):
        layers = [int(layer) for layer in hparams.layers]
        if layers != sorted(set(layers)):
            raise InvalidSettingError(f"editor.layers={layers}: give distinct layers in increasing order")
        self.model, self.adapter, self.tokenizer, self.hparams = model, adapter, tokenizer, hparams
        self.layers = layers
        self.statistics, self.context_templates, self.regularizers = statistics, context_templates, list(regularizers)
        self.groups = template_groups(context_templates, hparams.context_templates)
        self.objective = DeltaObjective.from_hparams(hparams, sites=self.delta_sites, layer=layers[-1],
                                                     **self.delta_rules(hparams))

    @staticmethod
    @abstractmethod
    def divisor(remaining_layers: int) -> float:
        """What the residual is divided by when `remaining_layers` layers (this one included) are left."""

    def delta_rules(self, hparams) -> dict:
        """`nll_weight` / `should_stop` overrides of the δ-objective (none: DeltaObjective's defaults)."""
        return {}

    def second_moments(self) -> dict:
        """What `solve` is given per layer: C's factors (MEMIT, PMET)."""
        return self.statistics.factorized(self.layers)

    def prepare(self) -> None:
        self.second_moments()

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor, second_moment) -> LowRankUpdate:
        """ΔW of one layer ((d_out, d_in)) from this batch's keys and residuals as rows: MEMIT's ridge solve."""
        return least_squares_update(keys, residuals, second_moment, self.hparams.mom2_update_weight)

    def apply(self, requests: list[EditRequest]) -> SpreadOutcome:
        """Edit the whole batch: independent δs (on the unedited model), then one joint solve per layer."""
        outcome = SpreadOutcome()
        with timed(outcome.seconds, "covariance"):
            second_moments = self.second_moments()
        with timed_deltas(outcome.seconds, "delta"):
            results = [optimize_delta(self.model, self.adapter, self.tokenizer, request, self.context_templates,
                                      self.objective, self.regularizers) for request in requests]
        return self._spread(requests, results, second_moments, outcome)

    def solve_each(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor, second_moment) -> list[LowRankUpdate]:
        """What `solve` gives for each row's request alone (n = 1): MEMIT's ridge solve for all rows at once. An
        editor that overrides `solve` overrides this too."""
        return independent_rank_one_updates(keys, residuals, second_moment, self.hparams.mom2_update_weight)

    def apply_each(self, requests: list[EditRequest]) -> list[EditOutcome]:
        """Each request edited alone, as `apply([request])` would, side by side and without writing a weight.

        The δs are optimised in shared forwards. Then, layer by layer, every request's keys and current outputs are
        read in shared forwards in which each row sees its own request's updates of the layers below
        (`PerRowUpdates`), and each request is solved alone (`solve_each`). All seconds are shared and split evenly.
        """
        shared: dict[str, float] = {}
        with timed(shared, "covariance"):
            second_moments = self.second_moments()
        with timed(shared, "delta"):
            results = optimize_deltas(self.model, self.adapter, self.tokenizer, requests, self.context_templates,
                                      self.objective, self.regularizers)
        per_case: list[dict[int, LowRankUpdate]] = [{} for _ in requests]
        diagnostics = [delta_diagnostics([result]) for result in results]
        for layer, keys, residuals, norms in self._layer_residuals(requests, results, shared, per_case):
            with timed(shared, "update"):
                for case, update in zip(per_case, self.solve_each(layer, keys, residuals, second_moments[layer])):
                    case[layer] = update
            for case, norm in zip(diagnostics, norms.tolist()):
                case[f"residual_norm_layer{layer}"] = norm
        seconds = {name: value / len(requests) for name, value in shared.items()}
        return [EditOutcome(updates=case_updates, seconds=dict(seconds), diagnostics=case_diagnostics)
                for case_diagnostics, case_updates in zip(diagnostics, per_case)]

    def _spread(self, requests: list[EditRequest], results: list[DeltaResult], second_moments: dict,
                outcome: SpreadOutcome) -> SpreadOutcome:
        """Write the targets z = z₀ + δ into the edited layers, one ridge solve per layer in order."""
        for layer, keys, residuals, norms in self._layer_residuals(requests, results, outcome.seconds):
            with timed(outcome.seconds, "update"):
                update = self.solve(layer, keys, residuals, second_moments[layer])
                self.adapter.add_to_down_weight(self.model, layer, update)
            outcome.solves.append(LayerSolve(layer, keys, residuals, update))
            outcome.updates[layer] = update
            outcome.diagnostics[f"residual_norm_layer{layer}"] = norms.mean().item()
        outcome.diagnostics.update(delta_diagnostics(results))
        return outcome

    def _layer_residuals(self, requests: list[EditRequest], results: list[DeltaResult], seconds: dict[str, float],
                         per_case: list[dict[int, LowRankUpdate]] | None = None):
        """Per edited layer, in order: (layer, keys, residuals divided for this layer, each residual's norm before
        dividing), read once the caller has solved the layers below. Their updates are in the model's weights, or,
        with `per_case`, each row sees its own request's (`PerRowUpdates`) while no weight is written."""
        targets = torch.stack([r.target(self.target_site) for r in results])
        for i, layer in enumerate(self.layers):
            with PerRowUpdates(self.model, self.adapter, per_case) if per_case is not None else nullcontext() as written:
                rows = written.rows if per_case is not None else one_model
                with timed(seconds, "keys"):
                    keys = grouped_mean_keys(self.model, self.adapter, self.tokenizer, layer, requests, self.groups,
                                             case_rows=rows)
                with timed(seconds, "update"):
                    current = bare_prompt_outputs(self.model, self.adapter, self.tokenizer, self.target_site,
                                                  self.layers[-1], requests, case_rows=rows)
            with timed(seconds, "update"):
                residuals = (targets - current) / self.divisor(len(self.layers) - i)
            yield layer, keys, residuals, (targets - current).norm(dim=-1)
