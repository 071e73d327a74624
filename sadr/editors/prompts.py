"""Templated rewrite prompts and essence prompts for one request, tokenised with subject positions."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sadr.data.records import EditRequest
from sadr.models.tokenization import (
    PaddedBatch,
    encode_prompt_target,
    encode_with_offsets,
    fill_subject,
    last_token_of_span,
    pad_id_of,
    pad_right,
)

ESSENCE_TEMPLATE = "{} is a"


def templated_prompts(request: EditRequest, context_templates: list[str]) -> list[str]:
    """The request's prompt template inside each context template (each still holds "{}" once)."""
    return [context.replace("{}", request.prompt, 1) for context in context_templates]


@dataclass
class SubjectPrompts:
    """A right-padded batch of prompts with the subject's last token of each row."""

    batch: PaddedBatch
    subject_positions: torch.Tensor


def encode_subject_prompts(tokenizer, templates: list[str], subjects: list[str]) -> SubjectPrompts:
    """Tokenise `template.format(subject)` for each pair and locate the subject's last token."""
    sequences, positions = [], []
    for template, subject in zip(templates, subjects, strict=True):
        text, span = fill_subject(template, subject)
        ids, offsets = encode_with_offsets(tokenizer, text)
        sequences.append(ids)
        positions.append(last_token_of_span(offsets, span))
    return SubjectPrompts(
        pad_right(sequences, pad_id_of(tokenizer)),
        torch.tensor(positions, dtype=torch.long),
    )


@dataclass
class DeltaPrompts:
    """The δ-optimisation batch: rewrite prompts with the target teacher-forced, then essence prompts.

    Rows [0, n_rewrite) are rewrite prompts (row 0 is the bare prompt); the rest are essence prompts.
    """

    batch: PaddedBatch
    n_rewrite: int
    subject_positions: torch.Tensor  # every row
    last_prompt_positions: torch.Tensor  # every row
    target_rows: torch.Tensor  # per target token of the rewrite rows
    target_positions: torch.Tensor  # the position whose logits predict it
    target_ids: torch.Tensor

    @property
    def essence_rows(self) -> torch.Tensor:
        return torch.arange(self.n_rewrite, self.batch.input_ids.shape[0])

    def to(self, device) -> "DeltaPrompts":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        moved["batch"] = self.batch.to(device)
        return DeltaPrompts(**moved)


def encode_delta_prompts(tokenizer, request: EditRequest, context_templates: list[str],
                         essence_templates: tuple[str, ...] = (ESSENCE_TEMPLATE,)) -> DeltaPrompts:
    sequences, subject_pos, last_pos = [], [], []
    t_rows, t_pos, t_ids = [], [], []
    for row, template in enumerate(templated_prompts(request, context_templates)):
        text, span = fill_subject(template, request.subject)
        pair = encode_prompt_target(tokenizer, text, request.target_new)
        n_prompt = len(pair.prompt_ids)
        sequences.append(pair.prompt_ids + pair.target_ids)
        subject_pos.append(last_token_of_span(pair.prompt_offsets, span))
        last_pos.append(n_prompt - 1)
        t_rows += [row] * len(pair.target_ids)
        t_pos += list(range(n_prompt - 1, n_prompt - 1 + len(pair.target_ids)))
        t_ids += pair.target_ids
    n_rewrite = len(sequences)
    for template in essence_templates:
        text, span = fill_subject(template, request.subject)
        ids, offsets = encode_with_offsets(tokenizer, text)
        sequences.append(ids)
        subject_pos.append(last_token_of_span(offsets, span))
        last_pos.append(len(ids) - 1)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return DeltaPrompts(
        batch=pad_right(sequences, pad_id_of(tokenizer)),
        n_rewrite=n_rewrite,
        subject_positions=as_long(subject_pos),
        last_prompt_positions=as_long(last_pos),
        target_rows=as_long(t_rows),
        target_positions=as_long(t_pos),
        target_ids=as_long(t_ids),
    )


@dataclass
class StackedDeltaPrompts:
    """Several requests' δ prompts in one right-padded batch, request after request.

    Request i owns the rows [starts[i], starts[i] + its row count); `cases[i]` keeps its own prompts with row
    indices local to that block. Right padding to a common width leaves every row's tokens and positions as
    they were, so a row's result does not depend on the other requests (up to float rounding of wider kernels).
    """

    batch: PaddedBatch
    cases: list[DeltaPrompts]
    starts: list[int]

    def to(self, device) -> "StackedDeltaPrompts":
        return StackedDeltaPrompts(self.batch.to(device), [case.to(device) for case in self.cases], self.starts)


def stack_delta_prompts(cases: list[DeltaPrompts], pad_id: int) -> StackedDeltaPrompts:
    """One batch of every request's δ prompts; a single request's batch is its own, unchanged."""
    width = max(case.batch.input_ids.shape[1] for case in cases)
    ids, masks, starts = [], [], []
    for case in cases:
        missing = width - case.batch.input_ids.shape[1]
        starts.append(sum(len(block) for block in ids))
        ids.append(torch.nn.functional.pad(case.batch.input_ids, (0, missing), value=pad_id))
        masks.append(torch.nn.functional.pad(case.batch.attention_mask, (0, missing), value=0))
    return StackedDeltaPrompts(PaddedBatch(torch.cat(ids), torch.cat(masks)), cases, starts)
