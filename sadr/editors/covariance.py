"""Second-moment statistics C = E[k kᵀ] of MLP down-projection inputs, shared by every editor.

All requested layers are accumulated in one pass over the corpus, in float64, with a bounded token
budget per forward. Each layer's result is cached on disk under a hash of everything that determines it
(model weights, layer, module, corpus, sample count and length). ROME's published `.npz` files can be
loaded instead (keys `mom2.mom2`, the sum of k kᵀ, and `mom2.count`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from sadr.cache import TORCH, lock_for, read_entry, write_atomically
from sadr.data.corpus import Corpus
from sadr.editors.capture import capture_inputs
from sadr.errors import InvalidSettingError, MissingInputError
from sadr.models.adapters import ModelAdapter
from sadr.models.fingerprint import cache_key
from sadr.models.tokenization import pad_id_of, pad_right

log = logging.getLogger(__name__)


def load_rome_npz(path: str | Path) -> torch.Tensor:
    """C from a ROME statistics file: mom2.mom2 / mom2.count, as float64."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"ROME statistics file {path} does not exist; expected <module>_float32_mom2_<n>.npz in "
            "model.stats.npz_dir (or unset model.stats.npz_dir to compute the statistics)"
        )
    with np.load(path) as data:
        missing = {"mom2.mom2", "mom2.count"} - set(data.files)
        if missing:
            raise InvalidSettingError(f"{path} lacks key(s) {sorted(missing)}; found {data.files}")
        return torch.from_numpy(np.asarray(data["mom2.mom2"], dtype=np.float64)) / float(data["mom2.count"])


@torch.no_grad()
def accumulate_second_moments(model, adapter: ModelAdapter, tokenizer, layers: list[int], texts,
                              sample_length: int, batch_tokens: int) -> dict[int, tuple[torch.Tensor, int]]:
    """layer -> (Σ k kᵀ in float64, number of tokens), over every non-padding token of every text."""
    device = next(model.parameters()).device
    modules = {layer: adapter.mlp_down_module(model, layer) for layer in layers}
    sums: dict[int, torch.Tensor] = {}
    count = 0
    pad = pad_id_of(tokenizer)

    def flush(sequences: list[list[int]]) -> None:
        nonlocal count
        batch = pad_right(sequences, pad).to(device)
        with capture_inputs(modules) as captured:
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        mask = batch.attention_mask.bool()
        for layer in layers:
            keys = captured[layer][mask].double()
            moment = keys.T @ keys
            sums[layer] = moment if layer not in sums else sums[layer] + moment
        count += int(mask.sum())

    pending: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"][:sample_length]
        if not ids:
            continue
        width = max([len(ids)] + [len(s) for s in pending])
        if pending and width * (len(pending) + 1) > batch_tokens:
            flush(pending)
            pending = []
        pending.append(ids)
    if pending:
        flush(pending)
    if count == 0:
        raise InvalidSettingError("the statistics corpus produced no tokens; check model.stats (corpus, text_file, n_samples)")
    return {layer: (sums[layer].cpu(), count) for layer in layers}


class SecondMomentStatistics:
    """C per layer for one loaded model: from the disk cache, ROME .npz files, or one pass over a corpus."""

    def __init__(self, model, adapter: ModelAdapter, tokenizer, *, fingerprint: str, corpus: Corpus | None,
                 sample_length: int, batch_tokens: int, cache_dir: str | Path, npz_dir: str | None = None,
                 npz_samples: int | None = None):
        self.model, self.adapter, self.tokenizer = model, adapter, tokenizer
        self.fingerprint, self.corpus = fingerprint, corpus
        self.sample_length, self.batch_tokens = sample_length, batch_tokens
        self.cache_dir = Path(cache_dir) / "stats"
        self.npz_dir, self.npz_samples = npz_dir, npz_samples
        self._memory: dict[int, torch.Tensor] = {}

    def description(self) -> dict:
        if self.npz_dir:
            return {"kind": "rome_npz", "dir": str(self.npz_dir), "n": self.npz_samples}
        return {**self.corpus.description, "sample_length": self.sample_length}

    def _cache_file(self, layer: int) -> Path:
        module = self.adapter.mlp_down.format(layer)
        key = cache_key(kind="mom2", model=self.fingerprint, layer=layer, module=module, corpus=self.description())
        return self.cache_dir / f"{module}.{key}.pt"

    def _pass_lock(self) -> Path:
        """One lock per (model, corpus): a corpus pass computes every missing layer at once."""
        return self.cache_dir / f"pass.{cache_key(kind='mom2-pass', model=self.fingerprint, corpus=self.description())}"

    def _cached(self, layer: int) -> torch.Tensor | None:
        entry = read_entry(self._cache_file(layer), TORCH)
        return None if entry is None else entry["mom2"]

    def get(self, layers: list[int]) -> dict[int, torch.Tensor]:
        """layer -> C (float64, on the model's device, where the solves run), computing every missing layer in a
        single corpus pass. Disk entries hold CPU tensors."""
        missing = [layer for layer in layers if layer not in self._memory]
        to_compute = []
        for layer in missing:
            if self.npz_dir:
                module = self.adapter.mlp_down.format(layer)
                self._memory[layer] = load_rome_npz(Path(self.npz_dir) / f"{module}_float32_mom2_{self.npz_samples}.npz")
            elif (moment := self._cached(layer)) is not None:
                self._memory[layer] = moment
            else:
                to_compute.append(layer)
        if to_compute:
            with lock_for(self._pass_lock()):  # concurrent jobs: the first computes, the others wait and read
                for layer in list(to_compute):
                    if (moment := self._cached(layer)) is not None:
                        self._memory[layer] = moment
                        to_compute.remove(layer)
                if to_compute:
                    self._compute(to_compute)
        device = next(self.model.parameters()).device
        for layer in layers:
            self._memory[layer] = self._memory[layer].to(device)
        return {layer: self._memory[layer] for layer in layers}

    def _compute(self, layers: list[int]) -> None:
        log.info("computing key statistics for layers %s over %s", layers, self.description())
        results = accumulate_second_moments(self.model, self.adapter, self.tokenizer, layers,
                                            self.corpus.texts(), self.sample_length, self.batch_tokens)
        for layer, (total, count) in results.items():
            moment = total / count
            write_atomically({"mom2": moment, "count": count, "corpus": self.description()}, self._cache_file(layer), TORCH)
            self._memory[layer] = moment
