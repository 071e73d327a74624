"""Two runs on the same records, prompt by prompt or case by case (e.g. an editor without and with SADR).

Independent 95 % CIs of two means overlap long before a difference is due to chance, because both runs
score the same prompts. Pairing the prompts gives the CI of the difference itself, how many prompts went
up or down, and an exact two-sided sign test on those counts. Under the case protocol the observations are each
case's mean over its prompts, as in the case-level tables.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from sadr.errors import DamagedFileError
from sadr.evaluation.aggregate import LABELS, PROTOCOLS, mean_ci
from sadr.results import ROWS_FILE, RunDirectory

REQUEST_KEYS = ("dataset", "subject", "target_new")  # a case's request, the same in both runs


def sign_test(up: int, down: int) -> float:
    """Exact two-sided binomial test of up vs down changes (ties dropped) against a fair coin."""
    changed = up + down
    if changed == 0:
        return 1.0
    tail = sum(math.comb(changed, i) for i in range(min(up, down) + 1))
    return min(1.0, 2 * tail / 2**changed)


def _rows(runs: str | Path | list[Path]) -> dict[str, dict]:
    """case id -> row, over one run directory or the shard directories of one configuration."""
    runs = [Path(run) for run in runs] if isinstance(runs, list) else [Path(runs)]
    rows = {}
    for run in runs:
        # the file looked for first: RunDirectory makes its folder
        for row in RunDirectory(run).iter_rows() if (run / ROWS_FILE).is_file() else []:
            rows[str(row["case_id"])] = _compared_fields(row, run / ROWS_FILE)
    if not rows:
        written = any((run / ROWS_FILE).is_file() for run in runs)
        state = f"has no finished case in its {ROWS_FILE}" if written else f"holds no {ROWS_FILE}"
        raise FileNotFoundError(f"{', '.join(map(str, runs))} {state}; pass the directory of a finished or resumed run")
    return rows


def _compared_fields(row: dict, file: Path) -> dict:
    """What compare reads of a row: its request and each metric's per-prompt values, edited. The rest (attention
    blobs, unedited scores, diagnostics) would hold both runs' whole files in memory."""
    if not isinstance(row.get("edited"), dict):
        raise DamagedFileError(
            f"case {row['case_id']} in {file} has no edited scores (an object under \"edited\"), so the file was "
            "damaged or edited: delete that line, and a rerun of the same command redoes its case")
    edited = {metric: {"value": entry["value"]} for metric, entry in row["edited"].items()
              if metric in LABELS and isinstance(entry, dict) and "value" in entry}
    return {**{key: row[key] for key in REQUEST_KEYS if key in row}, "edited": edited}


def _values(row: dict, metric: str) -> list[float]:
    entry = row["edited"].get(metric)
    return list(entry["value"]) if entry else []


def _check_same_requests(a: dict[str, dict], b: dict[str, dict]) -> None:
    """Each case id names the same request in both runs (ids are file positions in most formats, so runs on two
    different files share them)."""
    for case_id in a:
        for key in REQUEST_KEYS:  # rows before 2026-12-06 have no target_new
            if key in a[case_id] and key in b[case_id] and a[case_id][key] != b[case_id][key]:
                raise ValueError(f"case {case_id} has {key} {a[case_id].get(key)!r} in one run but "
                                 f"{b[case_id].get(key)!r} in the other: the runs read different dataset files; "
                                 "compare runs of the same dataset")


def compare_runs(base: str | Path | list[Path], other: str | Path | list[Path], protocol: str = "prompt") -> pd.DataFrame:
    """One row per metric: both means and their paired difference ± 95 % CI (×100), observations up/down, sign-test p.

    `base` and `other` are run directories, or lists of the shard directories of one configuration each. An
    observation is a prompt (`protocol="prompt"`) or a case's mean over its prompts (`"case"`).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    a, b = _rows(base), _rows(other)
    if a.keys() != b.keys():
        only = {name: sorted(mine.keys() - theirs.keys(), key=str)[:10] for name, mine, theirs in (("base", a, b), ("other", b, a))}
        raise ValueError(f"the runs edited different records (case ids only in the base: {only['base']}, only in the "
                         f"other: {only['other']}); compare runs of the same dataset selection")
    _check_same_requests(a, b)
    records = []
    for metric, label in LABELS.items():
        if not all(any(_values(row, metric) for row in run.values()) for run in (a, b)):
            continue  # one run did not evaluate this metric (e.g. fluency off): nothing to pair
        x, y = [], []
        for case_id in a:
            xs, ys = _values(a[case_id], metric), _values(b[case_id], metric)
            if len(xs) != len(ys):
                raise ValueError(f"case {case_id}: {metric} has {len(xs)} prompts in {base} but {len(ys)} in {other}")
            if protocol == "prompt":
                x += xs
                y += ys
            elif xs:
                x.append(sum(xs) / len(xs))
                y.append(sum(ys) / len(ys))
        if not x:
            continue
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        diff = y - x
        mean, ci, n = mean_ci((100 * diff).tolist())
        up, down = int((diff > 0).sum()), int((diff < 0).sum())
        records.append({"metric": label, "n": n, "base": 100 * x.mean(), "other": 100 * y.mean(),
                        "difference": mean, "difference ci95": ci, "up": up, "down": down,
                        "sign-test p": sign_test(up, down)})
    if not records:
        raise ValueError(f"no per-prompt metric values in common between {base} and {other}")
    return pd.DataFrame.from_records(records)
