"""Which cases of a loaded dataset a run uses: `case_ids`, then `limit`, then `shard`, in that order.

The shard comes last, so the n shards of a selection are that selection, whatever limit it has: a sweep over
`dataset.shard=1/n..n/n` edits the cases of the same command without a shard."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from sadr.conf.schema import DatasetConfig
from sadr.data.records import EditCase
from sadr.errors import InvalidSettingError

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Selection:
    case_ids: tuple[Any, ...] | None = None
    shard: tuple[int, int] | None = None  # (i, n): the i-th (1-based) of n contiguous shards
    limit: int | None = None

    @classmethod
    def from_config(cls, cfg: DatasetConfig) -> Selection:
        """Validate the selection keys up front, before any file is read or downloaded."""
        limit = cfg.limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidSettingError(f"dataset.limit={limit!r} is not valid: expected a non-negative integer or null.")
        case_ids = tuple(cfg.case_ids) if cfg.case_ids is not None else None
        if case_ids is not None:
            _check_listed_once(case_ids)
        return cls(case_ids, parse_shard(cfg.shard) if cfg.shard is not None else None, limit)

    def apply(self, cases: Sequence[EditCase]) -> tuple[list[EditCase], dict]:
        """The selected cases (in dataset order) and a description of what was applied."""
        selected = list(cases)
        if self.case_ids is not None:
            selected = _by_ids(selected, self.case_ids)
        if self.limit is not None:
            selected = selected[: self.limit]
        shard_range = None
        if self.shard is not None:
            i, n = self.shard
            shard_range = [(i - 1) * len(selected) // n, i * len(selected) // n]
            selected = selected[shard_range[0] : shard_range[1]]
        return selected, {
            "n_loaded": len(cases),
            "case_ids": list(self.case_ids) if self.case_ids is not None else None,
            "shard": f"{self.shard[0]}/{self.shard[1]}" if self.shard else None,
            "shard_range": shard_range,  # [start, stop) positions after the case_ids filter and the limit
            "limit": self.limit,
            "n_selected": len(selected),
        }


def parse_shard(value: str) -> tuple[int, int]:
    match = _SHARD.fullmatch(str(value))
    i, n = (int(match[1]), int(match[2])) if match else (0, 0)
    if not 1 <= i <= n:
        raise InvalidSettingError(
            f"dataset.shard={value!r} is not valid: expected 'i/n' with 1 <= i <= n, e.g. dataset.shard=1/8."
        )
    return i, n


def _check_listed_once(case_ids: tuple[Any, ...]) -> None:
    """Each id once: a run edits a case once, so an id listed twice (or as 7 and "7") would silently run fewer cases
    than listed."""
    repeated = [key for key, count in Counter(map(str, case_ids)).items() if count > 1]
    if repeated:
        raise InvalidSettingError(
            f"dataset.case_ids lists {', '.join(repeated)} more than once (ids match by their string form, so 7 and "
            "\"7\" are the same case); a run edits each case once, so list each id once.")


def _by_ids(cases: list[EditCase], wanted: tuple[Any, ...]) -> list[EditCase]:
    """Ids match by their string form, so 7 and "7" (e.g. from a YAML file or the command line) are the same."""
    wanted_keys = {str(x) for x in wanted}
    selected = [case for case in cases if str(case.case_id) in wanted_keys]
    missing = wanted_keys - {str(case.case_id) for case in selected}
    if missing:
        shown = ", ".join(sorted(missing, key=lambda k: (len(k), k)))
        raise InvalidSettingError(
            f"dataset.case_ids: no case with id {shown} among the {len(cases)} loaded cases. "
            "Check the ids (zsRE, KnowEdit and SADR-merged records are numbered by position from 0), "
            "or invalid records skipped by dataset.on_invalid=skip."
        )
    return selected
