"""Text corpora for the key statistics: a hub dataset, a user's text file, or text the model samples itself."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from sadr.errors import MissingInputError, UnavailableError
from sadr.models.generation import sample_texts

GENERATION_SEEDS = ("The", "In", "A", "It", "When", "This", "There", "One", "After", "His", "Her", "According to")


class CorpusUnavailableError(UnavailableError):
    pass


@dataclass
class Corpus:
    """`description` names the corpus in results and cache keys; `texts()` yields its documents."""

    description: dict
    texts: Callable[[], Iterator[str]]


def hub_corpus(dataset: str, config: str | None, split: str, n_samples: int) -> Corpus:
    def texts() -> Iterator[str]:
        try:
            from datasets import load_dataset

            stream = load_dataset(dataset, config, split=split, streaming=True)
        except Exception as err:  # datasets raises many types for "offline" / "not found"
            raise CorpusUnavailableError(
                f"could not open the Hugging Face dataset {dataset!r} ({config}) for key statistics: {err}. "
                "Offline, use model.stats.corpus=generated, or model.stats.corpus=file model.stats.text_file=PATH, "
                "or ROME .npz files with model.stats.npz_dir=DIR."
            ) from err
        nonempty = (row["text"] for row in stream if row.get("text", "").strip())
        yield from itertools.islice(nonempty, n_samples)

    return Corpus({"kind": "hub", "dataset": dataset, "config": config, "split": split, "n": n_samples}, texts)


def file_corpus(path: str | None, n_samples: int) -> Corpus:
    if not path:
        raise CorpusUnavailableError("model.stats.corpus=file needs model.stats.text_file=PATH")
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingInputError(f"statistics text file {file} does not exist (model.stats.text_file)")
    stat = file.stat()

    def texts() -> Iterator[str]:
        blocks = (b.strip() for b in file.read_text(encoding="utf-8").split("\n\n"))
        yield from itertools.islice((b for b in blocks if b), n_samples)

    return Corpus({"kind": "file", "path": str(file.resolve()), "size": stat.st_size, "mtime": stat.st_mtime, "n": n_samples}, texts)


def generated_corpus(model, tokenizer, n_samples: int, length: int, seed: int) -> Corpus:
    """Text sampled by the model itself (top-k 5) from fixed seed words: an offline stand-in for Wikipedia."""

    def texts() -> Iterator[str]:
        prompts = [GENERATION_SEEDS[i % len(GENERATION_SEEDS)] for i in range(n_samples)]
        yield from sample_texts(model, tokenizer, prompts, max_new_tokens=length, seed=seed, batch_size=64)

    return Corpus({"kind": "generated", "n": n_samples, "length": length, "seed": seed, "top_k": 5}, texts)
