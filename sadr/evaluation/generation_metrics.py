"""Fluency and ROME's consistency, from text the model samples after each case's `generation_prompts`.

Per case, the first `prompts_per_case` generation prompts are continued by top-k 5 sampling, in one of two styles
(`eval.generation_style`): `reference`, ROME's `generate_fast` (each text grows to `length` tokens counting its
prompt, EOS may be drawn and sampling goes on; ROME's evaluation used 100), or `fixed` (`length` new tokens after
the prompt, EOS never drawn, transformers' `generate`). Seeds derive from the run seed and the case id, so a case gets
the same texts whether it is evaluated with all cases (the unedited model) or in its edit group (the edited model),
and the edited and unedited models continue its prompts with the same random streams. In the `reference` style each
text has its own stream (seeded by its case and its place among the case's prompts), so the texts of many cases are
sampled in batches of `batch_size` rows (`eval.generation_batch_size`) without depending on their batch-mates beyond
the rounding of another batch shape (which can move a draw in half precision); `fixed` draws a call's rows from one
stream, so each case is sampled in its own call.

Entries per case: `fluency` (one value, the mean n-gram entropy of the case's texts, as ROME's and the SADR repo's
evaluations compute it, so a table's FL and its CI count cases; each text's entropy and the texts themselves beside
it) and, when ROME's
TF-IDF files are configured and readable, `consistency` (one TF-IDF cosine of the joined texts vs the
attribute snippets of (relation_id, target_new_id)). A case without generation prompts gets neither;
without the files, or without snippets for its (relation, new object), no consistency entry is made
and the log says why.
"""
from __future__ import annotations

import functools
import logging

from sadr.data.lengths import GENERATION_PROMPTS
from sadr.data.records import EditCase
from sadr.errors import InvalidSettingError
from sadr.evaluation.case_rows import CaseRows, one_model
from sadr.evaluation.consistency import ConsistencyData, ConsistencyUnavailable, load_consistency_data
from sadr.evaluation.fluency import ngram_entropy
from sadr.evaluation.suite import Evaluator
from sadr.models.fingerprint import cache_key
from sadr.models.generation import sample_each_to_length_like_rome, sample_texts

log = logging.getLogger(__name__)

TOP_K = 5  # ROME's generation setting


def case_seed(seed: int, case_id: int | str) -> int:
    """The `fixed` style's sampling seed: it depends only on the run seed and the case (64 bits)."""
    return int(cache_key(kind="generation", seed=seed, case=str(case_id)), 16)


def text_seed(seed: int, case_id: int | str, index: int) -> int:
    """The `reference` style's seed of a case's `index`-th text: only the run seed, the case and the index (64 bits)."""
    return int(cache_key(kind="generation text", seed=seed, case=str(case_id), text=index), 16)


class GenerationMetrics(Evaluator):
    name = "generation_metrics"

    def __init__(self, seed: int, prompts_per_case: int | None = 2, length: int = 100, style: str = "reference",
                 consistency_dir: str | None = None, consistency_download: bool = False, batch_size: int = 16):
        if prompts_per_case is not None and prompts_per_case < 1:
            raise InvalidSettingError(f"eval.generation_prompts_per_case={prompts_per_case}: must be >= 1, or null for all")
        if length < 1:
            raise InvalidSettingError(f"eval.generation_length={length}: must be >= 1")
        if style not in ("fixed", "reference"):
            raise InvalidSettingError(f"eval.generation_style must be fixed or reference, got {style!r}")
        if batch_size < 1:
            raise InvalidSettingError(f"eval.generation_batch_size={batch_size}: must be >= 1")
        self.seed, self.prompts_per_case, self.length, self.style = seed, prompts_per_case, length, style
        self.batch_size = batch_size
        self.consistency_dir, self.consistency_download = consistency_dir, consistency_download

    @classmethod
    def from_config(cls, cfg) -> GenerationMetrics:
        """From the whole run config (`eval.*` and the run seed)."""
        e = cfg.eval
        return cls(cfg.seed, e.generation_prompts_per_case, e.generation_length, e.generation_style.name,
                   e.consistency_dir, e.consistency_download, e.generation_batch_size)

    @functools.cached_property
    def consistency(self) -> ConsistencyData | None:
        """ROME's TF-IDF data, read on first use (attribute_snippets.json is ~1 GB); None, logged once, if missing."""
        if self.consistency_dir is None:
            log.warning("consistency is not computed: eval.consistency_dir is not set (a folder with ROME's "
                        "attribute_snippets.json, idf.npy and tfidf_vocab.json; add eval.consistency_download=true "
                        "to fetch them, ~1 GB)")
            return None
        try:
            return load_consistency_data(self.consistency_dir, self.consistency_download)
        except ConsistencyUnavailable as exc:
            log.warning("consistency is not computed: %s", exc)
            return None

    def identity(self) -> dict:
        identity = {"name": self.name, "seed": self.seed, "prompts_per_case": self.prompts_per_case,
                    "length": self.length, "style": self.style, "top_k": TOP_K,
                    "consistency": self.consistency is not None}
        # reference-style texts had one stream per case until 2026-12-06: unedited scores cached then are not these
        return identity | {"streams": "text"} if self.style == "reference" else identity

    def _prompts(self, case: EditCase) -> list[str]:
        return list(case.generation_prompts[: self.prompts_per_case])

    def inputs(self, case):
        return [(GENERATION_PROMPTS, prompt) for prompt in self._prompts(case)]

    def evaluate(self, model, tokenizer, adapter, cases: list[EditCase], case_rows: CaseRows = one_model) -> list[dict]:
        prompts = [self._prompts(case) for case in cases]
        texts = (self._reference_texts(model, tokenizer, cases, prompts, case_rows) if self.style == "reference"
                 else self._fixed_texts(model, tokenizer, cases, prompts, case_rows))
        return [self._entries(case, case_texts) if case_texts else {} for case, case_texts in zip(cases, texts)]

    def _reference_texts(self, model, tokenizer, cases, prompts, case_rows: CaseRows) -> list[list[str]]:
        """Every case's texts, sampled `batch_size` rows at a time, each row from its own stream."""
        rows = [(index, prompt, text_seed(self.seed, case.case_id, place))
                for index, (case, case_prompts) in enumerate(zip(cases, prompts))
                for place, prompt in enumerate(case_prompts)]
        texts: list[list[str]] = [[] for _ in cases]
        for start in range(0, len(rows), self.batch_size):
            owners, chunk, seeds = zip(*rows[start : start + self.batch_size])
            with case_rows(list(owners)):
                sampled = sample_each_to_length_like_rome(model, tokenizer, list(chunk), total_tokens=self.length,
                                                          seeds=list(seeds), top_k=TOP_K)
            for owner, text in zip(owners, sampled):
                texts[owner].append(text)
        return texts

    def _fixed_texts(self, model, tokenizer, cases, prompts, case_rows: CaseRows) -> list[list[str]]:
        """Every case's texts, one call per case: a call's rows share one stream."""
        texts = []
        for index, (case, case_prompts) in enumerate(zip(cases, prompts)):
            with case_rows(index):
                texts.append(sample_texts(model, tokenizer, case_prompts, max_new_tokens=self.length,
                                          seed=case_seed(self.seed, case.case_id), top_k=TOP_K)
                             if case_prompts else [])
        return texts

    def _entries(self, case: EditCase, texts: list[str]) -> dict:
        per_text = [ngram_entropy(t) for t in texts]
        entries = {"fluency": {"value": [sum(per_text) / len(per_text)], "per_text": per_text, "text": texts}}
        consistency = self._consistency_entry(case, texts)
        if consistency is not None:
            entries["consistency"] = consistency
        return entries

    def _consistency_entry(self, case: EditCase, texts: list[str]) -> dict | None:
        data = self.consistency
        if data is None:
            return None
        relation, target = case.request.relation_id, case.request.target_new_id
        if relation is None or target is None or not data.snippets_for(relation, target):
            log.info("case %s: no consistency (no attribute snippets for relation %s, new object %s)",
                     case.case_id, relation, target)
            return None
        return {"value": [data.score(texts, relation, target)]}
