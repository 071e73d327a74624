"""Second-moment statistics C = E[k kᵀ] of MLP down-projection inputs, shared by every editor.

All requested layers are accumulated in one pass over the corpus, in float64, with a bounded token
budget per forward; only the upper triangle of each Σ k kᵀ is computed (C is symmetric). Each layer's result
is cached on disk under a hash of everything that determines it (model weights, layer, module, corpus,
sample count and length). ROME's published `.npz` files can be loaded instead (keys `mom2.mom2`, the sum of
k kᵀ, and `mom2.count`).
"""
from __future__ import annotations

import itertools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sadr.cache import TORCH, lock_for, read_entry, write_atomically
from sadr.data.corpus import Corpus
from sadr.editors.capture import stop_after
from sadr.editors.update import FactorizedMoment, mirror_upper_triangle_
from sadr.errors import DeviceMemoryError, InvalidSettingError, MissingInputError
from sadr.interrupts import further_interrupts_ignored, interrupts_deferred
from sadr.models.adapters import ModelAdapter
from sadr.models.devices import clock, take_peak_memory, tf32_in_use
from sadr.models.fingerprint import cache_key
from sadr.models.tokenization import pad_id_of, pad_right
from sadr.progress import Progress

log = logging.getLogger(__name__)


def check_rome_npz_file(path: Path) -> None:
    """A one-line error where one module's ROME statistics file is missing, naming that module's other files."""
    if not path.is_file():
        module = path.name.rsplit("_float32_mom2_", 1)[0]
        others = sorted(p.name for p in path.parent.glob(f"{module}_float32_mom2_*.npz"))
        found = f"; the folder holds {', '.join(others)}: set model.stats.n_samples to its <n>" if others else ""
        raise MissingInputError(
            f"ROME statistics file {path} does not exist; expected <module>_float32_mom2_<n>.npz in "
            f"model.stats.npz_dir, <n> being model.stats.n_samples{found} (or unset model.stats.npz_dir to compute the "
            "statistics)"
        )


def load_rome_npz(path: str | Path) -> torch.Tensor:
    """C from a ROME statistics file: mom2.mom2 / mom2.count, as float64."""
    path = Path(path)
    check_rome_npz_file(path)
    with np.load(path) as data:
        missing = {"mom2.mom2", "mom2.count"} - set(data.files)
        if missing:
            raise InvalidSettingError(f"{path} lacks key(s) {sorted(missing)}; found {data.files}")
        return torch.from_numpy(np.asarray(data["mom2.mom2"], dtype=np.float64)) / float(data["mom2.count"])


def check_rome_npz_dir(folder: str | Path, n_samples: int | None) -> None:
    """A one-line error where `folder` (model.stats.npz_dir) is no folder, or holds no ROME statistics file of
    `n_samples` texts: checked when the run starts, not when the editor first reads C, after the unedited model is
    scored (minutes on a paper-scale dataset). Each edited layer's own file is checked once the model has loaded
    (`SecondMomentStatistics.check_files`)."""
    folder = Path(folder).expanduser()
    unset = "or unset model.stats.npz_dir to compute the statistics"
    if not folder.is_dir():
        raise MissingInputError(f"model.stats.npz_dir={folder} is not a folder: give the folder of ROME's statistics "
                                f"files (<module>_float32_mom2_<n>.npz), {unset}")
    if not any(folder.glob(f"*_float32_mom2_{n_samples}.npz")):
        counts = sorted({int(match.group(1)) for path in folder.glob("*_float32_mom2_*.npz")
                         if (match := re.search(r"_float32_mom2_(\d+)\.npz$", path.name))})
        held = (f"its files are of <n> = {', '.join(map(str, counts))}: set model.stats.n_samples to one" if counts
                else "it holds no such file")
        raise MissingInputError(f"model.stats.npz_dir={folder} holds no ROME statistics file of model.stats.n_samples="
                                f"{n_samples} texts (<module>_float32_mom2_{n_samples}.npz); {held}, {unset}")


# Keys are converted to float64 at most this many bytes at a time.
CHUNK_BYTES = 2**28
# at most one progress line this often during a statistics pass
PROGRESS_SECONDS = 60.0
# Row blocks of an upper-triangular sum: it computes and stores (1 + 1/ROW_BLOCKS)/2 of the full product.
ROW_BLOCKS = 8
# a statistics pass saves its sums this often, so a killed pass resumes from there (a published one takes hours)
CHECKPOINT_SECONDS = 600.0


class UpperTriangularSum:
    """Σ k kᵀ of `width`-wide keys in float64, of which only the blocks on and above the diagonal are computed.

    Row block i (rows sᵢ to sᵢ₊₁) holds the columns from sᵢ on, so with B blocks the sum takes (1 + 1/B)/2 of the
    flops and of the memory of the full product: 56 % with 8 blocks. A GPU or CPU GEMM computes the full product
    at the same speed per flop, so the accumulation runs close to twice as fast.
    """

    def __init__(self, width: int, device: torch.device, blocks: int = ROW_BLOCKS):
        step = -(-width // blocks)
        self.width, self.device = width, device
        self.starts = list(range(0, width, step))
        self.rows = [torch.zeros(min(step, width - start), width - start, dtype=torch.float64, device=device)
                     for start in self.starts]

    def add(self, keys: torch.Tensor) -> None:
        """Add Σ k kᵀ over the rows of `keys` (tokens, width), computed in the keys' dtype (float64 or float32)."""
        for start, rows in zip(self.starts, self.rows):
            block = keys[:, start : start + rows.shape[0]].T
            if keys.dtype == torch.float64:
                rows.addmm_(block, keys[:, start:])
            else:
                rows.add_(block @ keys[:, start:])

    def state(self) -> list[torch.Tensor]:
        """The row blocks, for a checkpoint (`UpperTriangularSum.of`)."""
        return self.rows

    @classmethod
    def of(cls, rows: list[torch.Tensor], device: torch.device) -> "UpperTriangularSum":
        """The sum whose row blocks `state` gave, on `device` (without first allocating a zero sum there)."""
        total = cls.__new__(cls)
        total.width, total.device = rows[0].shape[1], device
        heights = [block.shape[0] for block in rows]
        total.starts = [sum(heights[:i]) for i in range(len(rows))]
        total.rows = [block.to(device) for block in rows]
        return total

    def take_full(self) -> torch.Tensor:
        """The whole sum, (width, width), exactly symmetric: its lower triangle is copied from the upper. Each block is
        released as soon as it is copied, so this can be called once."""
        full = torch.empty(self.width, self.width, dtype=torch.float64, device=self.device)
        for start in self.starts:
            rows = self.rows.pop(0)
            full[start : start + rows.shape[0], start:] = rows
        return mirror_upper_triangle_(full, len(self.starts))


@dataclass
class SecondMomentSums:
    """Σ k kᵀ per layer (float64, on the model's device) over `count` tokens, and where the pass spent its time."""

    sums: dict[int, UpperTriangularSum]
    count: int
    seconds: dict[str, float]  # forward, accumulate, corpus (reading or sampling texts, tokenising)

    def take_moment(self, layer: int) -> torch.Tensor:
        """C = Σ k kᵀ / count of one layer, (d, d); its sum is released."""
        return self.sums.pop(layer).take_full().div_(self.count)

    def timing(self) -> dict:
        total = sum(self.seconds.values())
        return {"tokens": self.count, "tokens_per_second": self.count / total if total else None,
                **{f"{name}_seconds": round(value, 3) for name, value in self.seconds.items()}}


@dataclass
class PassCheckpoint:
    """Where a statistics pass saves its sums every `every_seconds` and when Ctrl-C or SIGTERM stops it, always
    between two batches, and from which a rerun of the same pass (`identity`: its layers and device) resumes: with
    the same batching, to the same sums, bit for bit, as if never stopped. A rerun with other batching (`batch_tokens`
    lowered after running out of memory) resumes too, as C's cache entries do not depend on it either. One file per
    (model, corpus): a pass with another identity starts afresh and overwrites it."""

    path: Path
    identity: dict
    every_seconds: float

    def load(self) -> dict | None:
        state = read_entry(self.path, TORCH)
        if state is not None and state.get("identity") != self.identity:
            log.info("%s is another pass's checkpoint (%s); starting afresh", self.path, state.get("identity"))
            return None
        return state

    def save(self, texts: int, count: int, seconds: dict, sums: dict) -> None:
        state = {"identity": self.identity, "texts": texts, "count": count, "seconds": dict(seconds),
                 "rows": {layer: total.state() for layer, total in sums.items() if total is not None}}
        write_atomically(state, self.path, TORCH)
        log.info("key statistics: checkpoint after %d texts (%d tokens) in %s", texts, count, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@torch.no_grad()
def accumulate_second_moments(model, adapter: ModelAdapter, tokenizer, layers: list[int], texts,
                              sample_length: int, batch_tokens: int, product_dtype: torch.dtype = torch.float64,
                              expected_texts: int | None = None,
                              checkpoint: PassCheckpoint | None = None) -> SecondMomentSums:
    """Σ k kᵀ over every non-padding token of every text, streamed.

    Texts are packed into padded batches of at most `batch_tokens` tokens (one text longer than that is a batch on
    its own). Each layer's keys are added to its sum inside the forward, as soon as the layer has produced them,
    `CHUNK_BYTES` of float64 at a time, and the forward stops after the highest requested layer. So besides the
    model, memory holds the float64 upper-triangular sums (layers × d_ff² × 8 bytes × (1 + 1/ROW_BLOCKS)/2), one
    batch's activations, and one chunk. With `product_dtype=torch.float32`, each chunk's products are computed in
    float32 (at most CHUNK_BYTES / (8 d_ff) tokens summed in float32) and added to the float64 sums. With
    `expected_texts` (the corpus's size, when known), a log line every PROGRESS_SECONDS gives the texts read, the rate
    and the ETA: a published statistics pass reads 100,000 texts. With a `checkpoint`, the sums so far are saved
    there every `checkpoint.every_seconds` and when Ctrl-C or SIGTERM stops the pass (which waits for the batch in
    progress), and a pass that finds one resumes after the texts it holds (reading them from the corpus again, without
    their forwards).
    """
    device = next(model.parameters()).device
    sums = {layer: None for layer in layers}
    seconds = {"forward": 0.0, "accumulate": 0.0, "corpus": 0.0}
    count = skip = 0
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        # popped, so the host copy of the sums goes as soon as they are on the device
        sums.update({layer: UpperTriangularSum.of(rows, device) for layer, rows in resumed.pop("rows").items()})
        count, skip, seconds = resumed["count"], resumed["texts"], dict(resumed["seconds"])
        log.info("key statistics: resuming after %d texts (%d tokens) from %s", skip, count, checkpoint.path)
    pad = pad_id_of(tokenizer)
    highest = max(layers)
    token_mask: torch.Tensor | None = None

    def accumulate(layer: int):
        def hook(_module, args):
            started = clock(device)
            keys = args[0][token_mask]
            if sums[layer] is None:
                sums[layer] = UpperTriangularSum(keys.shape[-1], device)
            for chunk in keys.split(max(1, CHUNK_BYTES // (8 * keys.shape[-1]))):
                sums[layer].add(chunk.to(product_dtype))
            seconds["accumulate"] += clock(device) - started
        return hook

    def flush(sequences: list[list[int]]) -> None:
        nonlocal count, token_mask
        started = clock(device)
        batch = pad_right(sequences, pad).to(device)
        token_mask = batch.attention_mask.bool()
        accumulated = seconds["accumulate"]
        # hooked only around this forward: a generated corpus samples its texts with the same model in between
        handles = [adapter.mlp_down_module(model, layer).register_forward_pre_hook(accumulate(layer)) for layer in layers]
        try:
            with stop_after(adapter.mlp_down_module(model, highest), before=True):  # the blocks above are not needed
                model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        count += int(token_mask.sum())
        seconds["forward"] += clock(device) - started - (seconds["accumulate"] - accumulated)

    pending: list[list[int]] = []
    boundary = skip  # the first text not in the sums: the texts before it are, and a batch begins there
    started = saved = time.perf_counter()
    before = dict(seconds)  # a resumed pass's seconds so far

    def flush_before(index: int) -> None:
        """Adds the pending texts, those before text `index`, to the sums; Ctrl-C or SIGTERM waits for it."""
        nonlocal pending, boundary
        with interrupts_deferred():
            flush(pending)
            pending, boundary = [], index

    def with_corpus_seconds() -> dict[str, float]:
        """`seconds` with the corpus's share so far: what is neither forward nor accumulation."""
        spent = time.perf_counter() - started
        return {**seconds, "corpus": before["corpus"] + spent - (seconds["forward"] - before["forward"])
                - (seconds["accumulate"] - before["accumulate"])}

    # The rate and ETA count from the first text: the wait for it (a download, or sampling a generated corpus,
    # whose texts all come at once) says nothing of how fast the texts are read.
    texts = iter(texts)
    try:
        first = next(texts, None)
        if first is not None:
            log.info("key statistics: the corpus's first text came after %.1f s", time.perf_counter() - started)
        with Progress(expected_texts or 0, True, interval=PROGRESS_SECONDS, interactive=False, unit="text",
                      label="key statistics", initial=skip) as progress:
            for index, text in enumerate(itertools.chain([] if first is None else [first], texts)):
                if index < skip:  # in the resumed sums, and in the progress's count, not in its rate
                    continue
                progress.advance(1)
                ids = tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"][:sample_length]
                if not ids:
                    continue
                width = max([len(ids)] + [len(s) for s in pending])
                if pending and width * (len(pending) + 1) > batch_tokens:
                    flush_before(index)
                    if checkpoint is not None and time.perf_counter() - saved >= checkpoint.every_seconds:
                        checkpoint.save(boundary, count, with_corpus_seconds(), sums)
                        saved = time.perf_counter()
                pending.append(ids)
            if pending:
                flush_before(index + 1)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (sadr/interrupts.py), never within a batch: the sums are kept
        if checkpoint is not None and boundary > skip:
            with further_interrupts_ignored():  # a second Ctrl-C would cut short the save (GBs at GPT-J's width)
                checkpoint.save(boundary, count, with_corpus_seconds(), sums)
        raise
    seconds = with_corpus_seconds()
    if count == 0:
        raise InvalidSettingError("the statistics corpus produced no tokens; check model.stats (corpus, text_file, n_samples)")
    return SecondMomentSums(sums, count, seconds)


class SecondMomentStatistics:
    """C per layer for one loaded model: from the disk cache, ROME .npz files, or one pass over a corpus."""

    def __init__(self, model, adapter: ModelAdapter, tokenizer, *, fingerprint: str, corpus: Corpus | None,
                 sample_length: int, batch_tokens: int, cache_dir: str | Path, npz_dir: str | None = None,
                 npz_samples: int | None = None, product_dtype: torch.dtype = torch.float64,
                 factor_dtype: torch.dtype = torch.float64, factors_on_host: bool = False):
        self.model, self.adapter, self.tokenizer = model, adapter, tokenizer
        self.fingerprint, self.corpus = fingerprint, corpus
        self.sample_length, self.batch_tokens = sample_length, batch_tokens
        self.cache_dir = Path(cache_dir) / "stats"
        self.npz_dir, self.npz_samples = npz_dir, npz_samples
        self.product_dtype, self.factor_dtype, self.factors_on_host = product_dtype, factor_dtype, factors_on_host
        self._memory: dict[int, torch.Tensor] = {}
        self._factors: dict[int, FactorizedMoment] = {}

    def check_files(self, layers: list[int]) -> None:
        """Where C is read from ROME's files (model.stats.npz_dir): the folder holds files of `npz_samples`, and each
        of `layers`' file exists. The runner checks the layers whose C the editor reads when the run starts, not when
        the editor first reads C, after the unedited model is scored; a folder no layer reads from is not checked."""
        if self.npz_dir and layers:
            check_rome_npz_dir(self.npz_dir, self.npz_samples)
            for layer in layers:
                check_rome_npz_file(self._source(layer))

    def description(self) -> dict:
        if self.npz_dir:
            return {"kind": "rome_npz", "dir": str(self.npz_dir), "n": self.npz_samples}
        products = {} if self.product_dtype == torch.float64 else {"products": str(self.product_dtype).removeprefix("torch.")}
        return {**self.corpus.description, "sample_length": self.sample_length, **products}

    def _cache_file(self, layer: int) -> Path:
        module = self.adapter.mlp_down.format(layer)
        key = cache_key(kind="mom2", model=self.fingerprint, layer=layer, module=module, corpus=self.description())
        return self.cache_dir / f"{module}.{key}.pt"

    def _source(self, layer: int) -> Path:
        """Where a layer's C is read from: ROME's .npz file, or the cache (where a corpus pass writes it)."""
        if self.npz_dir:
            # `~` expanded, as `check_rome_npz_dir` expands it
            folder = Path(self.npz_dir).expanduser()
            return folder / f"{self.adapter.mlp_down.format(layer)}_float32_mom2_{self.npz_samples}.npz"
        return self._cache_file(layer)

    def _pass_lock(self) -> Path:
        """One lock per (model, corpus): a corpus pass computes every missing layer at once. Beside it, with the suffix
        `.partial.pt`, its checkpoint."""
        return self.cache_dir / f"pass.{cache_key(kind='mom2-pass', model=self.fingerprint, corpus=self.description())}"

    def _cached(self, layer: int) -> torch.Tensor | None:
        entry = read_entry(self._cache_file(layer), TORCH)
        return None if entry is None else entry["mom2"]

    def take(self, layers: list[int]) -> dict[int, torch.Tensor]:
        """layer -> C (float64, where it lies: on the host when read from disk or computed here), no longer kept: for a
        caller that turns C into something else and releases it (AlphaEdit's projections). A later `take` or `factorized`
        reads it again from the disk cache. Every missing layer is computed in a single corpus pass."""
        self._load(layers)
        return {layer: self._memory.pop(layer) for layer in layers}

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _load(self, layers: list[int]) -> None:
        """Every layer's C into memory, where it is (on the host when read from disk or computed here), computing
        every missing layer in a single corpus pass."""
        missing = [layer for layer in layers if layer not in self._memory]
        to_compute = []
        for layer in missing:
            if self.npz_dir:
                self._memory[layer] = load_rome_npz(self._source(layer))
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

    def factorized(self, layers: list[int]) -> dict[int, FactorizedMoment]:
        """layer -> C's LU factors (in `factor_dtype`), factored once on the model's device, a layer at a time, and kept
        there, or in host memory with `factors_on_host` (the solves then run on the host).

        Each C comes to the device only when its layer is factored, converted to `factor_dtype` on the host first,
        so the device holds the factors so far (none, with `factors_on_host`) and one C: with float32 factors, no
        float64 C is ever on it. Each C becomes its own factors (`take` reads C again from the cache if asked)."""
        missing = [layer for layer in layers if layer not in self._factors]
        self._load(missing)  # one corpus pass for every layer not cached yet
        device = self._device()
        for layer in missing:
            moment = self._memory.pop(layer)
            on_device = moment.to(self.factor_dtype).to(device)
            try:
                factors = FactorizedMoment.of(on_device, overwrite=True, dtype=self.factor_dtype)
            except torch.linalg.LinAlgError as err:  # an exactly zero pivot: a key direction the corpus never reaches
                raise InvalidSettingError(
                    f"the key statistics C of layer {layer} are singular ({str(err).splitlines()[0].rstrip('.')}), so no "
                    "update can be solved with them: some direction of the layer's keys is zero in every token of the "
                    "corpus. Give the statistics more or other text (model.stats.n_samples, model.stats.corpus), or "
                    f"edit other layers (editor.layers). This layer's C is in {self._source(layer)}"
                ) from err
            self._factors[layer] = factors.to(torch.device("cpu")) if self.factors_on_host else factors
            del on_device, factors  # with factors_on_host, the device copy is freed before the next layer's C comes
        return {layer: self._factors[layer] for layer in layers}

    def _compute(self, layers: list[int]) -> None:
        log.info("computing key statistics for layers %s over %s", layers, self.description())
        lock = self._pass_lock()
        checkpoint = PassCheckpoint(lock.with_name(lock.name + ".partial.pt"),
                                    {"layers": layers, "device": self._device().type}, CHECKPOINT_SECONDS)
        try:
            result = accumulate_second_moments(self.model, self.adapter, self.tokenizer, layers, self.corpus.texts(),
                                               self.sample_length, self.batch_tokens, self.product_dtype,
                                               expected_texts=self.corpus.description.get("n"), checkpoint=checkpoint)
        except torch.cuda.OutOfMemoryError as error:  # not retried with fewer parallel cases: it is not theirs
            detail = (str(error).splitlines() or ["no detail"])[0]
            raise DeviceMemoryError(
                f"the key statistics pass for layers {layers} ran out of GPU memory ({detail}); lower "
                f"model.stats.batch_tokens (now {self.batch_tokens}), the tokens per forward (and, for a generated "
                "corpus, per sampling batch)") from error
        with interrupts_deferred():  # the sums are in no checkpoint now: Ctrl-C or SIGTERM waits for their entries
            self._store(layers, result, checkpoint)

    def _store(self, layers: list[int], result: SecondMomentSums, checkpoint: PassCheckpoint) -> None:
        """Each layer's C, made whole from the pass's sums, into the disk cache, and the pass's checkpoint removed."""
        width = max(total.width for total in result.sums.values())
        # each C leaves the device as soon as it is whole (`factorized` brings it back in turn); the peak is read after,
        # so it holds making them whole, and what comes next (the first edits' peak) starts from the model alone
        moments = {layer: result.take_moment(layer).cpu() for layer in layers} if result.count >= width else {}
        timing = {**result.timing(), "layers": layers, "tf32": tf32_in_use(self._device()),
                  **take_peak_memory(self._device())}
        peak = f", GPU peak {timing['cuda_peak_bytes'] / 1e9:.1f} GB" if "cuda_peak_bytes" in timing else ""
        log.info("key statistics: %d tokens at %.0f tokens/s (forward %.1f s, accumulation %.1f s, corpus %.1f s%s)",
                 result.count, timing["tokens_per_second"] or 0.0, result.seconds["forward"],
                 result.seconds["accumulate"], result.seconds["corpus"], peak)
        if result.count < width:
            raise InvalidSettingError(
                f"the key statistics' corpus gave {result.count} tokens, fewer than the {width} dimensions of the keys, "
                f"so C = E[k kᵀ] is singular and the updates cannot be solved with it; give it more text: raise "
                f"model.stats.n_samples (now {self.corpus.description.get('n')}) or model.stats.sample_length "
                f"(now {self.sample_length})")
        for layer, moment in moments.items():
            write_atomically({"mom2": moment, "count": result.count, "corpus": self.description(), "pass": timing},
                             self._cache_file(layer), TORCH)
            self._memory[layer] = moment
        checkpoint.remove()
