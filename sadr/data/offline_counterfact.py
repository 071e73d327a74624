"""The project's embedded offline dataset: CounterFact's schema plus an optional per-record
`relation_specificity: [{"prompt", "ground_truth"}]` list (same subject, unrelated relation)."""

from __future__ import annotations

import dataclasses

from sadr.conf.schema import DatasetConfig
from sadr.data import counterfact
from sadr.data.fields import labeled_prompts
from sadr.data.records import EditCase
from sadr.data.validation import Record


def parse(rec: Record, cfg: DatasetConfig) -> EditCase:
    return dataclasses.replace(
        counterfact.parse(rec, cfg), relation_prompts=labeled_prompts(rec, "relation_specificity")
    )
