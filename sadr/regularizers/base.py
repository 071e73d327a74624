"""The one plug-in point for extra terms in the δ-optimisation loss.

The δ-optimiser runs one padded batch (each request's rewrite prompts, then its essence prompts) through the model
once per step. A regularizer hooks into that forward (`attach`), returns its loss term per request after each
forward (`case_losses`; `loss` for a batch of one), follows the batch when stopped requests leave it (`keep_cases`)
and removes its hooks (`detach`). Step 0 runs with δ = 0, so anything a regularizer needs from the unedited model
(SADR's reference attention rows) is recorded in that first forward at no extra cost.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sadr.models.adapters import ModelAdapter


@dataclass(frozen=True)
class DeltaBatch:
    """What a regularizer may know about the forward the δ-optimiser runs at every step.

    Row r's tokens before its δ position never change, so by default (`editor.prefix_cache`) they run once and
    each step's forward is fed only the rest (`input_ids`), after `cached_keys` key positions taken from a cache:
    key index k < cached_keys is a cached token, key index cached_keys + j is input token j. `attention_mask`
    (B, cached_keys + input length) marks the real tokens among the keys. `subject_keys[r]` is the key index of
    row r's subject's last token (where δ is added) and `last_prompt_positions[r]` the input position of its last
    prompt token (the one predicting the target's first token). Without a cache, cached_keys is 0 and every index
    is a plain position in the prompt. `rewrite_rows` are the batch rows of the templated rewrite prompts (never
    the essence prompts). Layers `> injection_layer` are the ones whose computation δ can change. When several
    requests are optimised together (each with its own δ), `rewrite_rows_per_case` counts each one's rewrite rows,
    which follow each other in `rewrite_rows`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rewrite_rows: torch.Tensor
    subject_keys: torch.Tensor
    last_prompt_positions: torch.Tensor
    injection_layer: int
    rewrite_rows_per_case: tuple[int, ...] | None = None  # None: one request
    cached_keys: int = 0

    def case_slices(self) -> list[slice]:
        """Each request's part of `rewrite_rows`."""
        counts = self.rewrite_rows_per_case or (len(self.rewrite_rows),)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [slice(start, start + count) for start, count in zip(starts, counts)]


class DeltaRegularizer(ABC):
    """An extra loss term γ·L(δ) for the δ-optimisation of any editor."""

    weight: float
    #: Whether the editor's stop rule sees this term (StepState.loss includes it). When False the term
    #: shapes the gradient but cannot delay a loss-based early stop.
    in_stop_rule: bool = True
    #: Set by the δ-optimiser (`sadr.editors.delta`) once it has attached this term to an optimisation. The runner
    #: refuses γ > 0 with an editor whose edit never did, where the term would change nothing.
    attached: bool = False

    def reads_cached_prefix(self) -> bool:
        """Whether this term can be computed from a forward fed only the tokens from each row's δ position on, the
        earlier ones' keys and values coming from a cache (`DeltaBatch.cached_keys`). A regularizer that hooks the
        forward's inputs or projections would see only part of each row, so the default is no: the δ-optimiser then
        feeds whole prompts at every step."""
        return False

    @abstractmethod
    def attach(self, model: nn.Module, adapter: ModelAdapter, batch: DeltaBatch) -> None:
        """Register whatever hooks the loss needs, before the first forward."""

    @abstractmethod
    def loss(self, step: int) -> torch.Tensor:
        """The unweighted term for the forward just run (step 0 is the δ = 0 forward), for a batch of one request."""

    def case_losses(self, step: int) -> list[torch.Tensor]:
        """One unweighted term per request of the batch (`DeltaBatch.case_slices`), each what `loss` gives for that
        request alone. This default serves a batch of one request; a regularizer that can share a δ-optimisation
        between requests overrides it."""
        return [self.loss(step)]

    def keep_cases(self, kept: Sequence[int], batch: DeltaBatch) -> None:
        """Go on with only the requests `kept` (ascending positions among the current batch's requests), the others
        having stopped: from the next forward on, the batch is `batch`, which holds the kept requests' rows in their
        order with the same key indices, less the key positions at the end that are padding in every kept row. Only
        a regularizer that shares a δ-optimisation between requests (`case_losses`) is asked this."""
        raise NotImplementedError(f"{type(self).__name__} gives case_losses for several requests, so it must say "
                                  "how to keep some of them (keep_cases)")

    @abstractmethod
    def detach(self) -> None:
        """Remove every hook; called even when the optimisation fails."""

    def diagnostics(self) -> dict:
        """Numbers (or small nested lists of them) worth logging about the last step, e.g. which heads were selected.

        JSON-able, since they go into every case's row; an editor averages them over a batch (elementwise for lists).
        """
        return {}

    def case_diagnostics(self) -> list[dict]:
        """`diagnostics` per request of the batch (default: a batch of one request)."""
        return [self.diagnostics()]
