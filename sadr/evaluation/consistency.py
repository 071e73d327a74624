"""ROME's generation consistency: TF-IDF cosine of generated text vs Wikipedia snippets about the new object.

ROME loads sklearn's `TfidfVectorizer` state from `idf.npy` and `tfidf_vocab.json` and compares the
joined generations with the joined `attribute_snippets.json` texts for (relation_id, target_new id).
`tfidf_cosine` re-implements that `transform` without sklearn: lower-case, tokens = runs of two or
more word characters (sklearn's default token_pattern), in-vocabulary term counts × idf, cosine.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from sadr.data.download import ROME_DATA_URL, DownloadError, RemoteFile, download

FILES = {
    "idf.npy": RemoteFile(
        ROME_DATA_URL + "idf.npy", size=11_042_168, sha256="c073d642589d4ac6432f467230329b36364a01e72de63a77a3624b745b923dda"
    ),
    "tfidf_vocab.json": RemoteFile(
        ROME_DATA_URL + "tfidf_vocab.json",
        size=31_639_072,
        sha256="8a78c4f20d8d85dadfd14e283d71af255482ff18aa0eb8a81716024c05ff888b",
    ),
    "attribute_snippets.json": RemoteFile(
        ROME_DATA_URL + "attribute_snippets.json",
        size=926_285_719,
        sha256="10b5c1cd105e54d5983c72de1b45bfc88bc7af786f7b99def2557886ff23385b",
    ),
}
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


class ConsistencyUnavailable(RuntimeError):
    """The TF-IDF files are missing or unreadable; the message gives the reason (the metric is then omitted)."""


def tfidf_cosine(text_a: str, text_b: str, vocab: Mapping[str, int], idf: np.ndarray) -> float:
    """Cosine of the two texts' TF-IDF vectors; 0.0 when either has no in-vocabulary word (ROME gives NaN)."""
    a, b = _tfidf(text_a, vocab, idf), _tfidf(text_b, vocab, idf)
    norm = math.sqrt(sum(w * w for w in a.values())) * math.sqrt(sum(w * w for w in b.values()))
    return sum(w * b.get(i, 0.0) for i, w in a.items()) / norm if norm else 0.0


@dataclass(frozen=True)
class ConsistencyData:
    vocab: dict[str, int]
    idf: np.ndarray
    snippets: dict[tuple[str, str], list[str]]  # (relation_id, target_id) -> snippet texts

    def snippets_for(self, relation_id: str, target_id: str) -> list[str]:
        """Wikipedia snippets about subjects whose `relation_id` object is `target_id`; [] when there are none."""
        return self.snippets.get((relation_id, target_id), [])

    def score(self, generations: Iterable[str], relation_id: str, target_id: str) -> float:
        """ROME's consistency of one case: the joined generations vs the joined snippets for (relation, new object)."""
        return tfidf_cosine(
            " ".join(generations), " ".join(self.snippets_for(relation_id, target_id)), self.vocab, self.idf
        )


def load_consistency_data(directory: str | os.PathLike, download_missing: bool = False) -> ConsistencyData:
    """Read ROME's three files from `directory`, first downloading missing ones if `download_missing`."""
    directory = Path(directory)
    if download_missing:
        for remote in FILES.values():
            try:
                download(remote, directory)
            except DownloadError as exc:
                raise ConsistencyUnavailable(str(exc)) from exc
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        urls = ", ".join(FILES[name].url for name in missing)
        raise ConsistencyUnavailable(f"{', '.join(missing)} not found in {directory}; download {urls} into it.")
    try:
        idf = np.load(directory / "idf.npy")
        vocab = json.loads((directory / "tfidf_vocab.json").read_text(encoding="utf-8"))
        if not isinstance(vocab, dict) or not vocab:
            raise ValueError("tfidf_vocab.json holds no vocabulary (a JSON object from words to indices)")
        if not all(type(index) is int for index in vocab.values()):
            raise ValueError("tfidf_vocab.json maps a word to something other than an integer index")
        if idf.ndim != 1 or not 0 <= min(vocab.values()) <= max(vocab.values()) < len(idf):
            raise ValueError("idf.npy and tfidf_vocab.json do not match (a vocabulary index is out of range)")
        snippets = _index_snippets(json.loads((directory / "attribute_snippets.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConsistencyUnavailable(f"could not read the TF-IDF files in {directory}: {exc}") from exc
    return ConsistencyData(vocab, idf, snippets)


def _index_snippets(entries: list[dict]) -> dict[tuple[str, str], list[str]]:
    """ROME's file: a list of {"relation_id", "target_id", "samples": [{"text", ...}, ...]}."""
    index: dict[tuple[str, str], list[str]] = defaultdict(list)
    for entry in entries:
        index[entry["relation_id"], entry["target_id"]].extend(sample["text"] for sample in entry["samples"])
    return dict(index)


def _tfidf(text: str, vocab: Mapping[str, int], idf: np.ndarray) -> dict[int, float]:
    counts = Counter(vocab[token] for token in _TOKEN.findall(text.lower()) if token in vocab)
    return {i: n * float(idf[i]) for i, n in counts.items()}
