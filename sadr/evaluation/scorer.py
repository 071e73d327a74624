"""Batched teacher-forced scoring of (prompt, target) pairs.

One padded forward per chunk of pairs; the LM head is applied only at the positions that predict
target tokens, and one `log_softmax(...).gather(...)` scores every target token of the chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sadr.evaluation.case_rows import CaseRows, one_model
from sadr.models.tokenization import encode_prompt_target_batch


@dataclass
class PairScores:
    """Per pair: mean NLL of the target tokens, and the fraction of them that are the top-1 prediction."""

    nll: torch.Tensor
    token_accuracy: torch.Tensor

    @property
    def prob(self) -> torch.Tensor:
        return torch.exp(-self.nll)


def target_token_logits(model, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities over the vocabulary at the given (row, position) pairs only."""
    picked = hidden[rows.to(hidden.device), positions.to(hidden.device)]
    return model.get_output_embeddings()(picked).float().log_softmax(-1)


@torch.no_grad()
def score_pairs_detailed(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 64,
                         pair_cases: list[int] | None = None, case_rows: CaseRows = one_model) -> PairScores:
    """`pair_cases[i]`: the case of pair i, declared to `case_rows` around each forward (all 0 when None)."""
    nll, acc = [], []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        enc = encode_prompt_target_batch(tokenizer, prompts[start : start + batch_size], targets[start : start + batch_size])
        batch = enc.batch.to(device)
        with case_rows(0 if pair_cases is None else pair_cases[start : start + batch_size]):
            hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        logprobs = target_token_logits(model, hidden, enc.rows, enc.positions)
        target_ids = enc.target_ids.to(device)
        token_lp = logprobs.gather(1, target_ids[:, None])[:, 0]
        correct = (logprobs.argmax(-1) == target_ids).float()
        rows = enc.rows.to(device)
        n_pairs = len(enc.prompt_lengths)
        counts = torch.zeros(n_pairs, device=device).index_add_(0, rows, torch.ones_like(token_lp))
        nll.append((-torch.zeros(n_pairs, device=device).index_add_(0, rows, token_lp) / counts).cpu())
        acc.append((torch.zeros(n_pairs, device=device).index_add_(0, rows, correct) / counts).cpu())
    if not nll:
        return PairScores(torch.zeros(0), torch.zeros(0))
    return PairScores(torch.cat(nll), torch.cat(acc))


def score_pairs(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 64) -> torch.Tensor:
    """Length-normalised NLL of each target after its prompt (float32, on CPU)."""
    return score_pairs_detailed(model, tokenizer, prompts, targets, batch_size).nll
