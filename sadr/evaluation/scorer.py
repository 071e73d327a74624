"""Batched teacher-forced scoring of (prompt, target) pairs.

Pairs are scored from as few rows as possible: one row, a prompt and a target, serves every pair of the same case
whose prompt and target less its last token begin that row (the new and the true object after one prompt, when one
of them is a single token, need one row, not two). Rows are batched by length, so little is padded. A causal
model's logits at a position depend only on the tokens up to it, so this changes nothing but float rounding. The LM
head is applied only at the positions that predict target tokens.

A caller that needs more from the same forwards passes an observer (`ForwardObserver`): the attention drift
diagnostics read their attention rows from the rows of the DNS pairs this way, instead of running them again.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from sadr.evaluation.case_rows import CaseRows, one_model
from sadr.models.tokenization import EncodedPair, PaddedBatch, encode_prompt_target, pad_id_of, pad_right


# observer(batch, pairs read from each batch row) -> a context the batch's forward runs in
ForwardObserver = Callable[[PaddedBatch, list[list[int]]], AbstractContextManager]


@dataclass
class PairScores:
    """Per pair: mean NLL of the target tokens, and the fraction of them that are the top-1 prediction."""

    nll: torch.Tensor
    token_accuracy: torch.Tensor

    @property
    def prob(self) -> torch.Tensor:
        return torch.exp(-self.nll)


def target_token_log_probs(model, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities over the vocabulary at the given (row, position) pairs only."""
    picked = hidden[rows.to(hidden.device), positions.to(hidden.device)]
    return model.get_output_embeddings()(picked).float().log_softmax(-1)


def shared_rows(pairs: list[EncodedPair], cases: list[int]) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """The rows to run, as (case, token ids), and the row each pair is read from.

    A pair is read from the longest row of its case and prompt that begins with its prompt and its target less the
    last token; its own prompt + target always qualifies.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, (pair, case) in enumerate(zip(pairs, cases)):
        groups[case, tuple(pair.prompt_ids)].append(index)
    rows: list[tuple[int, list[int]]] = []
    row_of = [0] * len(pairs)
    for (case, _prompt), members in groups.items():
        candidates = sorted({tuple(pairs[i].prompt_ids + pairs[i].target_ids) for i in members}, key=len, reverse=True)
        chosen: dict[tuple, int] = {}
        for i in members:
            context = tuple(pairs[i].prompt_ids + pairs[i].target_ids[:-1])
            sequence = next(c for c in candidates if c[: len(context)] == context)
            if sequence not in chosen:
                chosen[sequence] = len(rows)
                rows.append((case, list(sequence)))
            row_of[i] = chosen[sequence]
    return rows, row_of


@torch.no_grad()
def score_pairs_detailed(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 64,
                         pair_cases: list[int] | None = None, case_rows: CaseRows = one_model,
                         observer: ForwardObserver | None = None) -> PairScores:
    """`pair_cases[i]`: the case of pair i, declared to `case_rows` around each forward (all 0 when None). Only pairs
    of the same case share a row. `observer`, if given, is entered around each forward with the batch and, per batch
    row, the indices of the pairs read from it."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    pairs = [encode_prompt_target(tokenizer, prompt, target) for prompt, target in zip(prompts, targets)]
    cases = list(pair_cases) if pair_cases is not None else [0] * len(pairs)
    rows, row_of = shared_rows(pairs, cases)
    readers: dict[int, list[int]] = defaultdict(list)
    for index, row in enumerate(row_of):
        readers[row].append(index)
    device = next(model.parameters()).device
    log_prob_sums = torch.zeros(len(pairs), dtype=torch.float64)
    correct = torch.zeros(len(pairs), dtype=torch.float64)
    counts = torch.tensor([len(pair.target_ids) for pair in pairs], dtype=torch.float64)
    order = sorted(range(len(rows)), key=lambda row: len(rows[row][1]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = pad_right([rows[row][1] for row in chunk], pad_id_of(tokenizer)).to(device)
        observed = observer(batch, [readers[row] for row in chunk]) if observer else nullcontext()
        with case_rows([rows[row][0] for row in chunk]), observed:
            hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        batch_rows, positions, target_ids, owners = [], [], [], []
        for batch_row, row in enumerate(chunk):
            for index in readers[row]:
                prompt_length, target = len(pairs[index].prompt_ids), pairs[index].target_ids
                batch_rows += [batch_row] * len(target)
                positions += range(prompt_length - 1, prompt_length + len(target) - 1)
                target_ids += target
                owners += [index] * len(target)
        logprobs = target_token_log_probs(model, hidden, torch.tensor(batch_rows), torch.tensor(positions))
        ids = torch.tensor(target_ids, device=logprobs.device)
        owners_t = torch.tensor(owners)
        log_prob_sums.index_add_(0, owners_t, logprobs.gather(1, ids[:, None])[:, 0].double().cpu())
        correct.index_add_(0, owners_t, (logprobs.argmax(-1) == ids).double().cpu())
    return PairScores((-log_prob_sums / counts).float(), (correct / counts).float())


def score_pairs(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 64) -> torch.Tensor:
    """Length-normalised NLL of each target after its prompt (float32, on CPU)."""
    return score_pairs_detailed(model, tokenizer, prompts, targets, batch_size).nll
