"""The entry point: `load_cases(cfg, cache_dir)` reads, validates and selects one dataset's edit cases."""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sadr.conf.schema import DatasetConfig, InvalidRecordPolicy
from sadr.data.records import EditCase
from sadr.data.registry import FORMATS
from sadr.data.selection import Selection
from sadr.data.sources import resolve_source
from sadr.data.validation import InvalidRecordError, Record, parse_records
from sadr.errors import InvalidSettingError


log = logging.getLogger(__name__)


class MalformedDatasetError(InvalidSettingError):
    """The file is not a JSON list of records."""


@dataclass
class LoadedDataset:
    cases: list[EditCase]
    n_invalid_skipped: int
    selection: dict  # what case_ids / shard / limit did, see `Selection.apply`
    source: str  # the file actually read

    def why_empty(self) -> str:
        """Why no case is selected, and what to change."""
        n_loaded = self.selection["n_loaded"]
        if n_loaded == 0 and self.n_invalid_skipped == 0:
            return f"{self.source} holds no record"
        if n_loaded == 0:
            return (f"all {self.n_invalid_skipped} records of {self.source} are invalid and were skipped "
                    "(dataset.on_invalid=skip); set dataset.on_invalid=error to see why")
        return f"the selection ({self.chosen()}) keeps none of the {n_loaded} cases of {self.source}; widen it"

    def chosen(self) -> str:
        """The selection keys that were given, as overrides."""
        return ", ".join(f"dataset.{key}={self.selection[key]}" for key in ("case_ids", "shard", "limit")
                         if self.selection[key] is not None)


def load_cases(cfg: DatasetConfig, cache_dir: str | os.PathLike) -> LoadedDataset:
    fmt = FORMATS.get(cfg.name)
    if fmt is None:
        raise InvalidSettingError(f"unknown dataset.name={cfg.name!r}; expected one of: {', '.join(sorted(FORMATS))}.")
    selection = Selection.from_config(cfg)
    path = resolve_source(fmt, cfg, cache_dir)
    parse = _unique_ids(functools.partial(fmt.parse, cfg=cfg))
    fix = "fix it, or give another file with dataset.path" if cfg.path else "fix it, or delete it to download it again"
    raw = read_json_list(path, fix)
    try:
        cases, n_skipped = parse_records(raw, str(path), parse, InvalidRecordPolicy(cfg.on_invalid))
    except InvalidRecordError as error:
        # the first record does not read: perhaps a file of another format, given under this name (a field missing,
        # or of another kind: CounterFact's targets are objects, the SADR merged file's strings)
        if error.index == 0 and (fitting := _formats_reading(raw[0], cfg)):
            fix = f"The file reads as dataset={' or dataset='.join(fitting)}: give that instead of dataset={cfg.name}"
            # a field of the wrong kind may also be a mistake in a record of the right format
            fix += "." if error.missing else ", or fix the record."
            raise InvalidRecordError(error.source, 0, error.field, error.expected, error.got, fix=fix) from None
        raise
    cases, applied = selection.apply(cases)
    loaded = LoadedDataset(cases, n_skipped, applied, str(path))
    if len(cases) < applied["n_loaded"]:
        log.info("dataset=%s: %d of the %d cases of %s are selected (%s)", cfg.name, len(cases), applied["n_loaded"],
                 path, loaded.chosen())
        if cfg.name == "offline_counterfact" and cfg.path is not None and cfg.limit is not None:
            # the default dataset reads CounterFact's format too, so a CounterFact file given without dataset= runs
            log.warning("dataset.path=%s is read as dataset=offline_counterfact (the default), whose dataset.limit=%d "
                        "keeps %d of its %d records; for a CounterFact file, give dataset=counterfact", cfg.path,
                        cfg.limit, len(cases), applied["n_loaded"])
    return loaded


def _formats_reading(record, cfg: DatasetConfig) -> list[str]:
    """The other formats that read `record` (a file's first, which `cfg`'s format cannot): a file given under the
    wrong dataset.name would otherwise read as one bad record, with on_invalid=skip suggested, which skips them all."""
    fitting = []
    for name, fmt in FORMATS.items():
        if name == cfg.name or not isinstance(record, dict):  # a record that is no object fits no format
            continue
        try:
            fmt.parse(Record(record, "", 0), cfg)
        except (InvalidRecordError, ValueError):
            continue
        fitting.append(name)
    return fitting


def _unique_ids(parse: Callable[[Record], EditCase]) -> Callable[[Record], EditCase]:
    """`parse`, failing a record whose case id an earlier record has: results, resume and comparisons key cases by
    their id, so a second case with it would take the first one's place."""
    first_with: dict[str, int] = {}

    def parse_unique(rec: Record) -> EditCase:
        case = parse(rec)
        first = first_with.setdefault(str(case.case_id), rec.index)
        if first != rec.index:
            rec.fail("case_id", f"an id no other record has (record {first} has it too)", case.case_id)
        return case

    return parse_unique


def read_json_list(path: Path, fix: str) -> list:
    """The file's JSON list; `fix` is what the error for a file that is not JSON advises."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and exc.lineno == 2 and exc.colno == 1:  # a whole JSON value on line 1, more after it
            raise MalformedDatasetError(
                f"{path}: one JSON value per line (JSON Lines), but a dataset file is one JSON list of records; "
                f"write the records as a list [record, record, ...], or give another file with dataset.path."
            ) from exc
        raise MalformedDatasetError(
            f"{path}: not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}). "
            f"The file may be truncated or not a dataset; {fix}."
        ) from exc
    except UnicodeDecodeError as exc:
        raise MalformedDatasetError(f"{path}: not UTF-8 text ({exc}); expected a JSON dataset file: {fix}.") from exc
    if not isinstance(data, list):
        raise MalformedDatasetError(f"{path}: expected a JSON list of records [record, record, ...], got a JSON "
                                    f"{type(data).__name__}; {fix}.")
    return data
