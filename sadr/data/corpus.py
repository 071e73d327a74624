"""Text corpora for the key statistics: a hub dataset, a user's text file, or text the model samples itself."""
from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from sadr.cache import JSON, TORCH, cached, read_entry, write_atomically
from sadr.errors import MissingInputError, UnavailableError
from sadr.models.fingerprint import cache_key
from sadr.interrupts import further_interrupts_ignored, interrupts_deferred
from sadr.models.generation import sampled_batches

log = logging.getLogger(__name__)

GENERATION_SEEDS = ("The", "In", "A", "It", "When", "This", "There", "One", "After", "His", "Her", "According to")


class CorpusUnavailableError(UnavailableError):
    pass


@dataclass
class Corpus:
    """`description` names the corpus in results and cache keys; `texts()` yields its documents."""

    description: dict
    texts: Callable[[], Iterator[str]]


def reference_sample(n_documents: int, n_samples: int, seed: int) -> list[int]:
    """The documents ROME's code takes (`random_sample=seed`): indices 0..n-1 shuffled by Python's `random.Random(seed)`,
    then the first `n_samples`. The same permutation algorithm, so on the same dataset it is the same subset."""
    order = list(range(n_documents))
    random.Random(seed).shuffle(order)
    return order[:n_samples]


def hub_corpus(dataset: str, config: str | None, split: str, n_samples: int, sample: str = "random",
               seed: int = 1) -> Corpus:
    """A Hugging Face text dataset: `n_samples` documents drawn at random as ROME's code draws them (the whole split is
    downloaded once, into the datasets cache), or with `sample="first"` the first ones, streamed. Empty texts are
    skipped (they hold no tokens, so C is the same)."""
    if sample not in ("random", "first"):
        raise ValueError(f"hub corpus sample must be 'random' or 'first', got {sample!r}")

    def texts() -> Iterator[str]:
        try:
            from datasets import load_dataset

            rows = load_dataset(dataset, config, split=split, streaming=sample == "first")
        except Exception as err:  # datasets raises many types for "offline" / "not found"
            raise CorpusUnavailableError(
                f"could not open the Hugging Face dataset {dataset!r} ({config}) for key statistics: {err}. "
                "Offline, use model.stats.corpus=generated, or model.stats.corpus=file model.stats.text_file=PATH, "
                "or ROME .npz files with model.stats.npz_dir=DIR."
            ) from err
        if sample == "first":
            chosen = itertools.islice(rows, n_samples)
        else:
            chosen = rows.select(reference_sample(len(rows), n_samples, seed))
        yield from (row["text"] for row in chosen if row.get("text", "").strip())

    description = {"kind": "hub", "dataset": dataset, "config": config, "split": split, "n": n_samples, "sample": sample}
    if sample == "random":
        description["seed"] = seed
    return Corpus(description, texts)


def text_file(path: str | None) -> Path:
    """model.stats.text_file, which must name an existing file where model.stats.corpus=file."""
    if not path:
        raise CorpusUnavailableError("model.stats.corpus=file needs model.stats.text_file=PATH")
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingInputError(f"statistics text file {file} does not exist (model.stats.text_file)")
    return file


def file_corpus(path: str | None, n_samples: int) -> Corpus:
    file = text_file(path)
    stat = file.stat()

    def texts() -> Iterator[str]:
        blocks = (b.strip() for b in file.read_text(encoding="utf-8").split("\n\n"))
        documents = list(itertools.islice((b for b in blocks if b), n_samples))
        if len(documents) < n_samples:
            log.warning("model.stats.text_file=%s holds %d documents (blocks between blank lines), fewer than "
                        "model.stats.n_samples=%d: the key statistics are computed from those %d", file,
                        len(documents), n_samples, len(documents))
        yield from documents

    return Corpus({"kind": "file", "path": str(file.resolve()), "size": stat.st_size, "mtime": stat.st_mtime, "n": n_samples}, texts)


def generated_corpus(model, tokenizer, n_samples: int, length: int, seed: int, batch_tokens: int, *,
                     fingerprint: str | None = None, cache_dir: str | Path | None = None) -> Corpus:
    """Text sampled by the model itself (top-k 5) from fixed seed words: an offline stand-in for Wikipedia.

    Texts are sampled `batch_tokens // length` at a time, so the sampling's key-value cache holds about
    `batch_tokens` tokens, as the statistics pass's forwards do: on GPT-J in float32, 64 texts of 256 tokens held
    15 GB of cache. Which texts come out depends on the batch (each batch draws from one random stream), so the
    batch is part of the corpus's description and of the cache keys of its statistics.

    With `fingerprint` (the model's computation fingerprint) and `cache_dir`, the texts are sampled once and kept in
    `cache_dir/corpora`: every later pass over this corpus (other layers, another editor, a pass resumed after a stop)
    reads the same texts, without sampling again, whatever its threads (float rounding, which depends on them, can
    change a sampled token). The texts sampled so far are kept beside the entry too (`SamplingCheckpoint`), every
    `SAMPLING_CHECKPOINT_SECONDS` and when Ctrl-C, SIGTERM or an error stops the sampling, so that it resumes where it
    was (hours, for a real model's 100,000 texts); a kill loses what came after the last save.
    """
    batch = max(1, batch_tokens // length)
    description = {"kind": "generated", "n": n_samples, "length": length, "seed": seed, "top_k": 5, "batch": batch}

    def sample(checkpoint: SamplingCheckpoint | None) -> list[str]:
        prompts = [GENERATION_SEEDS[i % len(GENERATION_SEEDS)] for i in range(n_samples)]
        texts, rng = checkpoint.load() if checkpoint is not None else ([], None)
        # every text comes at once, after minutes on a CPU: said before, so that the wait does not look like a hang
        log.info("sampling %d texts of %d tokens from the model, %d at a time, for its key statistics (once: the "
                 "texts are cached)%s", n_samples, length, batch,
                 f"; resuming after the {len(texts)} sampled before a stop" if texts else "")
        kept, saved = len(texts), time.monotonic()
        try:
            for sampled, after in sampled_batches(model, tokenizer, prompts[len(texts):], max_new_tokens=length,
                                                  seed=seed, batch_size=batch, rng_state=rng):
                with interrupts_deferred():  # the texts and the state to draw the next ones from, together
                    texts.extend(sampled)
                    rng = after
                if checkpoint is not None and time.monotonic() - saved >= checkpoint.every_seconds:
                    checkpoint.save(texts, rng)
                    kept, saved = len(texts), time.monotonic()
        except BaseException:  # Ctrl-C, SIGTERM (sadr/interrupts.py) or an error: what was sampled is kept
            if checkpoint is not None and len(texts) > kept:
                with further_interrupts_ignored():
                    checkpoint.save(texts, rng)
            raise
        return texts

    def texts() -> Iterator[str]:
        if fingerprint is None or cache_dir is None:
            yield from sample(None)
            return
        key = cache_key(kind="generated_corpus", model=fingerprint, corpus=description)
        entry = Path(cache_dir) / "corpora" / f"{key}{JSON.suffix}"
        checkpoint = SamplingCheckpoint(entry.with_name(f"{key}.partial{TORCH.suffix}"), SAMPLING_CHECKPOINT_SECONDS)
        sampled = cached(entry, lambda: sample(checkpoint))
        checkpoint.remove()
        yield from sampled

    return Corpus(description, texts)


# a generated corpus's sampling keeps its texts this often (and when stopped), as a statistics pass keeps its sums
SAMPLING_CHECKPOINT_SECONDS = 600.0


@dataclass
class SamplingCheckpoint:
    """The texts a generated corpus's sampling has drawn so far, and the random state it draws the next from. The
    file is named by the corpus's cache key (model, tokenizer, device kind and every setting of the corpus), so only
    the same sampling reads it back, and it is removed once the corpus's entry is written."""

    path: Path
    every_seconds: float

    def load(self) -> tuple[list[str], dict | None]:
        state = read_entry(self.path, TORCH)
        return ([], None) if state is None else (state["texts"], state["rng"])

    def save(self, texts: list[str], rng: dict) -> None:
        write_atomically({"texts": texts, "rng": rng}, self.path, TORCH)
        log.info("generated corpus: %d texts sampled so far, kept in %s", len(texts), self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
