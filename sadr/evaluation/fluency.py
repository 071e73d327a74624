"""Generation fluency as ROME measures it: weighted n-gram entropy of word tokens.

ROME (`compute_n_gram_entropy`) tokenises with `nltk.word_tokenize`; to avoid an NLTK dependency,
`word_tokens` is a regex approximation of its Treebank rules: words (hyphenated compounds kept
whole), the clitics n't 's 're 've 'll 'd 'm split off ("don't" → "do", "n't"), and every other
non-space character as its own token. It differs from NLTK on abbreviations with periods ("U.S.")
and multi-character punctuation ("...", "--"), which NLTK keeps whole.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORD_TOKEN = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:-\w+)*|[^\w\s]", re.IGNORECASE)


def word_tokens(text: str) -> list[str]:
    return _WORD_TOKEN.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Mean over n of weight_n · H_n, H_n = entropy in bits of the text's n-gram frequencies (0 when it has none)."""
    if len(ns) != len(weights) or not ns:
        raise ValueError(f"ns {tuple(ns)} and weights {tuple(weights)} must be non-empty and of equal length")
    tokens = word_tokens(text)
    weighted = [w * _entropy_bits(Counter(zip(*(tokens[i:] for i in range(n))))) for n, w in zip(ns, weights)]
    return sum(weighted) / len(weighted)


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())
