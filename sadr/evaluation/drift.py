"""Attention drift (metrics.md "Attention drift"): how much more each head attends to the edited subject.

On every Distract Neighborhood prompt of a case ("{edit prompt with subject} {new object}. {neighborhood
prompt}", the same text DNS scores), every query head of every layer is read at the last prompt position
(the one predicting the answer); its post-softmax attention on the last token of the edited subject in the
prepended edit sentence is what SADR's analysis tracks. The rows come from `AttentionRows`, so the
model keeps an sdpa kernel (no eager switch, no T×T maps), and they are read in the forwards that score the DNS
pairs (`SubjectAttentionReader`, a scorer observer), so the prompts are not run a second time.

Entries per case (one observation per DNS prompt, the same unit as DNS itself, so the prompt protocol's
95 % CI is over prompts and the case protocol averages within a case first):

- `subject_attention` (both states, not aggregated: its `value` list is empty): the (layers × heads)
  attention of each prompt, as base64 float16 (little-endian, row-major), `shape` = [layers, heads].
  float16 keeps an attention weight (≤ 1) to within 2⁻¹² ≈ 2.4e-4.
- from `compare_attention(edited, unedited)`, with d = after − before per (layer, head):
  - `drift_max`: per prompt, max over every layer and head of d (the largest increase; 0 when no head
    gained attention, since layers up to the edited one cannot change);
  - `drift_mean`: per prompt, the mean of d over every layer and head;
  - `drift_argmax` (not aggregated): per prompt, the layer and head of that max and the head's
    attention before and after.
Tables show `drift_max` / `drift_mean` ×100, i.e. in percentage points of attention mass.
"""
from __future__ import annotations

import base64
from contextlib import contextmanager

import numpy as np
import torch

from sadr.data.records import EditCase
from sadr.evaluation.probes import Probe
from sadr.models.tokenization import PaddedBatch, encode_prompt_target, fill_subject, last_token_of_span
from sadr.regularizers.attention_rows import AttentionRows

ATTENTION = "subject_attention"
ENCODING = "float16-base64"


def drift_read_positions(tokenizer, case: EditCase, probe: Probe) -> tuple[int, int]:
    """(last prompt position, position of the edited subject's last token) of a DNS probe, tokenised as DNS scores it."""
    edit_text, span = fill_subject(case.request.prompt, case.request.subject)
    if not probe.prompt.startswith(edit_text):
        raise ValueError(f"DNS prompt {probe.prompt!r} does not start with the edit sentence {edit_text!r}")
    pair = encode_prompt_target(tokenizer, probe.prompt, probe.good)
    return len(pair.prompt_ids) - 1, last_token_of_span(pair.prompt_offsets, span)


class SubjectAttentionReader:
    """A scorer observer (`ForwardObserver`): the attention from the last prompt position of each DNS pair to its
    subject token, every head of every layer, read in the forwards that score the pairs.

    `reads` maps a scored pair's index to (last prompt position, subject position). Positions up to the last prompt
    token see only the prompt, so a row that also holds the target gives the rows the prompt alone would.
    """

    def __init__(self, model, adapter, reads: dict[int, tuple[int, int]]):
        self.model, self.adapter, self.reads = model, adapter, reads
        self.layers = list(range(adapter.num_layers(model)))
        self.values: dict[int, torch.Tensor] = {}  # pair index -> (layers, heads) float32 on the CPU

    @contextmanager
    def __call__(self, batch: PaddedBatch, row_pairs: list[list[int]]):
        wanted = [(row, pair) for row, pairs in enumerate(row_pairs) for pair in pairs if pair in self.reads]
        if not wanted:
            yield
            return
        rows = torch.tensor([row for row, _ in wanted])
        queries = torch.tensor([self.reads[pair][0] for _, pair in wanted])
        with AttentionRows(self.model, self.adapter, self.layers, queries, batch.attention_mask, batch_rows=rows) as hooks:
            yield
            recorded = hooks.collect()
        device = recorded[self.layers[0]].device
        subjects = torch.tensor([self.reads[pair][1] for _, pair in wanted], device=device)
        picked = torch.arange(len(wanted), device=device)
        # recorded[layer]: (wanted, heads, keys) -> (wanted, layers, heads) at each row's subject key
        values = torch.stack([recorded[layer][picked, :, subjects] for layer in self.layers], dim=1).float().cpu()
        self.values.update({pair: matrix for (_, pair), matrix in zip(wanted, values)})

    def entry(self, pairs: list[int]) -> dict:
        """The `subject_attention` entry of one case from its DNS pairs, in probe order."""
        matrices = [self.values[pair] for pair in pairs]
        return {"value": [], "encoding": ENCODING, "shape": [len(self.layers), int(matrices[0].shape[-1])],
                "attention": [encode_matrix(matrix) for matrix in matrices]}


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


def compare_attention(edited: dict, unedited: dict) -> dict:
    """The drift entries of one case from its edited and unedited `subject_attention` (none if either lacks it)."""
    if ATTENTION not in edited or ATTENTION not in unedited:
        return {}
    return drift_entries(decode_entry(unedited[ATTENTION]), decode_entry(edited[ATTENTION]))
