"""Attention drift (metrics.md "Attention drift"): how much more each head attends to the edited subject.

On every Distract Neighborhood prompt of a case ("{edit prompt with subject} {new object}. {neighborhood
prompt}", the same text DNS scores), every query head of every layer is read at the last prompt position
(the one predicting the answer); its post-softmax attention on the last token of the edited subject in the
prepended edit sentence is what SADR's analysis tracks. The rows come from `AttentionRows`, so the
model keeps an sdpa kernel (no eager switch, no T×T maps).

Entries per case (one observation per DNS prompt, the same unit as DNS itself, so the prompt protocol's
95 % CI is over prompts and the case protocol averages within a case first):

- `subject_attention` (both states, not aggregated: its `value` list is empty): the (layers × heads)
  attention of each prompt, as base64 float16 (little-endian, row-major), `shape` = [layers, heads].
  float16 keeps an attention weight (≤ 1) to within 2⁻¹² ≈ 2.4e-4.
- from `compare(edited, unedited)`, with d = after − before per (layer, head):
  - `drift_max`: per prompt, max over every layer and head of d (the largest increase; 0 when no head
    gained attention, since layers up to the edited one cannot change);
  - `drift_mean`: per prompt, the mean of d over every layer and head;
  - `drift_argmax` (not aggregated): per prompt, the layer and head of that max and the head's
    attention before and after.
Tables show `drift_max` / `drift_mean` ×100, i.e. in percentage points of attention mass.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch

from sadr.data.records import EditCase
from sadr.evaluation.case_rows import CaseRows, one_model
from sadr.evaluation.probes import METRICS
from sadr.evaluation.suite import Evaluator
from sadr.models.tokenization import encode_prompt_target, fill_subject, last_token_of_span, pad_id_of, pad_right
from sadr.regularizers.attention_rows import AttentionRows

ATTENTION = "subject_attention"
ENCODING = "float16-base64"


@dataclass(frozen=True)
class DriftPrompt:
    case_index: int
    ids: list[int]
    subject_position: int  # last token of the edited subject in the prepended edit sentence

    @property
    def last_position(self) -> int:
        return len(self.ids) - 1


def drift_prompts(tokenizer, cases: list[EditCase]) -> list[DriftPrompt]:
    """The DNS prompts of every case, tokenised exactly as DNS scores them (the prompt part of "prompt target")."""
    out = []
    for index, case in enumerate(cases):
        request = case.request
        edit_text, span = fill_subject(request.prompt, request.subject)
        for probe in METRICS["distract_neighborhood"].probes(case):
            if not probe.prompt.startswith(edit_text):
                raise ValueError(f"DNS prompt {probe.prompt!r} does not start with the edit sentence {edit_text!r}")
            pair = encode_prompt_target(tokenizer, probe.prompt, probe.good)
            out.append(DriftPrompt(index, pair.prompt_ids, last_token_of_span(pair.prompt_offsets, span)))
    return out


@torch.no_grad()
def subject_attention(model, adapter, prompts: list[DriftPrompt], pad_id: int, batch_size: int = 64,
                      case_rows: CaseRows = one_model) -> torch.Tensor:
    """(n_prompts, layers, heads) float32: attention from each prompt's last position to its subject token."""
    device = next(model.parameters()).device
    layers = list(range(adapter.num_layers(model)))
    parts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = pad_right([p.ids for p in chunk], pad_id).to(device)
        last = torch.tensor([p.last_position for p in chunk])
        subject = torch.tensor([p.subject_position for p in chunk], device=device)
        with AttentionRows(model, adapter, layers, last, batch.attention_mask) as hooks:
            with case_rows([p.case_index for p in chunk]):
                model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            recorded = hooks.collect()
            rows = torch.arange(len(chunk), device=device)
            # recorded[layer]: (B, H, T) -> (B, H) at the subject's key position
            parts.append(torch.stack([recorded[layer][rows, :, subject] for layer in layers], dim=1).float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, len(layers), 0)


def encode_matrix(values: torch.Tensor) -> str:
    return base64.b64encode(values.numpy().astype("<f2").tobytes()).decode("ascii")


def decode_entry(entry: dict) -> np.ndarray:
    """A `subject_attention` entry -> (n_prompts, layers, heads) float32 array."""
    if entry.get("encoding") != ENCODING:
        raise ValueError(f"unknown subject_attention encoding {entry.get('encoding')!r}; expected {ENCODING!r}")
    layers, heads = entry["shape"]
    blobs = [np.frombuffer(base64.b64decode(b), dtype="<f2") for b in entry["attention"]]
    return np.stack([b.reshape(layers, heads) for b in blobs]).astype(np.float32) if blobs else np.zeros((0, layers, heads), np.float32)


def drift_entries(before: np.ndarray, after: np.ndarray) -> dict:
    """drift_max / drift_mean per prompt and where the max is, from two (prompts, layers, heads) arrays."""
    if before.shape != after.shape:
        raise ValueError(f"attention of shape {after.shape} after the edit, {before.shape} before: different prompts?")
    if before.shape[0] == 0:
        return {}
    diff = after - before
    n_prompts, _, heads = diff.shape
    flat = diff.reshape(n_prompts, -1).argmax(axis=1)
    layer, head = flat // heads, flat % heads
    prompts = np.arange(n_prompts)
    return {
        "drift_max": {"value": diff[prompts, layer, head].astype(float).tolist()},
        "drift_mean": {"value": diff.reshape(n_prompts, -1).mean(axis=1).astype(float).tolist()},
        "drift_argmax": {
            "value": [],  # locations, not a rate: nothing to aggregate
            "layer": layer.tolist(), "head": head.tolist(),
            "before": before[prompts, layer, head].astype(float).tolist(),
            "after": after[prompts, layer, head].astype(float).tolist(),
        },
    }


@dataclass
class AttentionDrift(Evaluator):
    """Per-head attention to the edited subject on the DNS prompts, and its drift (see module docstring)."""

    batch_size: int = 64
    name: str = "attention_drift"

    def evaluate(self, model, tokenizer, adapter, cases, case_rows=one_model):
        prompts = drift_prompts(tokenizer, cases)
        values = subject_attention(model, adapter, prompts, pad_id_of(tokenizer), self.batch_size, case_rows)
        results: list[dict] = [{} for _ in cases]
        shape = [adapter.num_layers(model), int(values.shape[-1])]
        for prompt, matrix in zip(prompts, values):
            entry = results[prompt.case_index].setdefault(
                ATTENTION, {"value": [], "encoding": ENCODING, "shape": shape, "attention": []})
            entry["attention"].append(encode_matrix(matrix))
        return results

    def compare(self, edited, unedited):
        if ATTENTION not in edited or ATTENTION not in unedited:
            return {}
        return drift_entries(decode_entry(unedited[ATTENTION]), decode_entry(edited[ATTENTION]))

    def identity(self):
        return {"name": self.name, "prompts": "distract_neighborhood", "encoding": ENCODING}
