"""The numbers behind every part of `sadr report`, as tables (each plot's table is also written as its CSV).

Means and 95 % CIs come from each run's metrics.csv (sadr/evaluation/aggregate.py); runs are found, their shards
merged and grouped as `sadr summarize` finds, merges and pairs them (sadr/evaluation/summary.py).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sadr.evaluation.aggregate import scored_fields
from sadr.evaluation.drift import ATTENTION, decode_entry
from sadr.evaluation.summary import (ALWAYS, MAY_DIFFER_FROM_BASELINE, baseline_groups, configurations, differing_keys,
                                    run_name)
from sadr.results import ENV_FILE, RunDirectory

# The γ trade-off's panels, in order: what SADR protects first, then what the edit must still achieve, then drift.
TRADEOFF_METRICS = ("distract_neighborhood", "relation", "neighborhood", "efficacy", "paraphrase", "drift_max")
PROTOCOL = "prompt"  # every prompt one observation, as SADR's Table 3


@dataclass(frozen=True)
class Cases:
    """What the report reads of a configuration's cases.jsonl rows, reduced as they are read (`tally_cases`): the
    rows hold attention blobs and every prompt's scores, several GB a run at paper scale, too many to keep a sweep's.

    `drift`, layers × heads: the mean over every DNS prompt of edited − unedited attention to the edited subject, ×100
    (percentage points, as the tables' Drift); None when no row recorded `subject_attention` (eval.drift=false).
    `selected_heads`, layers × heads: in how many rewrite prompts SADR's last δ step selected each head, mean over the
    rows that recorded `selected_head_counts`; None for runs without SADR, or made before the regularizer recorded it.
    """

    count: int  # rows
    drift: np.ndarray | None
    selected_heads: np.ndarray | None
    seconds: dict[str, float]  # phase -> seconds summed over the rows, shared edit times split (`_add_phase_seconds`)


@dataclass(frozen=True)
class Run:
    """One configuration: a run directory, or the shard directories (`dataset.shard=i/n`) of one, merged."""

    name: str  # its folder(s) relative to the report's root, comma-separated (the folder's name when it is the root)
    settings: dict  # config.yaml, flattened to dotted keys (`dataset.shard` left out when sharded)
    metrics: pd.DataFrame  # metrics.csv; of shards, over all their cases
    cases: Cases  # of every folder's cases.jsonl
    environments: dict[str, dict]  # folder name -> its environment.json ({} when missing)

    @property
    def editor(self) -> str:
        return str(self.settings.get("editor.name"))

    @property
    def gamma(self) -> float:
        return float(self.settings.get("sadr.lambda", 0.0))


@dataclass(frozen=True)
class Series:
    """Runs that differ only in SADR settings, δ steps and metrics evaluated: one line of the trade-off, one row of
    heatmaps."""

    label: str
    runs: list[Run]  # by increasing γ

    def tag(self, run: Run) -> str:
        """The run's name within the series: its γ, and its folder where another run has the same γ."""
        same = [r for r in self.runs if r.gamma == run.gamma]
        return f"{run.gamma:g}" if len(same) == 1 else f"{run.gamma:g}_run{run.name.replace('/', '_')}"


def load_runs(root: str | Path) -> list[Run]:
    root = Path(root)
    runs = []
    for configuration in configurations(root):
        names = {path: run_name(path, root) for path in configuration.runs}
        env_files = {path: path / ENV_FILE for path in configuration.runs}
        scored: list[dict] = []  # a sharded configuration's metrics come from its rows: read once, for both
        cases = tally_cases(_scored_as_read(RunDirectory(path).rows(), scored if configuration.n_shards else None)
                            for path in configuration.runs)
        runs.append(Run(",".join(names.values()), configuration.settings, configuration.metrics(scored), cases,
                        {names[path]: json.loads(file.read_text()) if file.is_file() else {}
                         for path, file in env_files.items()}))
    return runs


def _scored_as_read(rows: list[dict], scored: list[dict] | None) -> list[dict]:
    """`rows`, their `scored_fields` added to `scored` (unless None)."""
    if scored is not None:
        scored += [scored_fields(row) for row in rows]
    return rows


class _RunningMean:
    """The mean of layers × heads maps added one at a time, summed in float64 in the order they come: the same
    numbers as stacking them all and taking the mean over the first axis (numpy sums that axis in order), without
    holding them."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count = 0

    def add(self, maps: np.ndarray | list) -> None:
        for matrix in np.asarray(maps, dtype=np.float64):
            self.total = matrix if self.total is None else self.total + matrix
            self.count += 1

    def mean(self) -> np.ndarray | None:
        return None if self.total is None else self.total / self.count


def tally_cases(parts: Iterable[list[dict]]) -> Cases:
    """`Cases` of a configuration's rows, one list per folder (a sequential run's rows share their folder's edit
    time); from a generator, each folder's rows are let go as the next folder's are read."""
    count, drift, selected, seconds = 0, _RunningMean(), _RunningMean(), {}
    for rows in parts:
        count += len(rows)
        for row in rows:
            drift.add(_attention_increase(row))
            selected.add(_selected_head_counts(row))
            _add_phase_seconds(seconds, row, len(rows))
    mean_drift = drift.mean()
    return Cases(count, None if mean_drift is None else 100 * mean_drift, selected.mean(), seconds)


def _attention_increase(row: dict) -> np.ndarray:
    """(DNS prompts, layers, heads): edited − unedited attention to the subject; no prompts where a state lacks it."""
    if ATTENTION in row.get("edited", {}) and ATTENTION in row.get("unedited", {}):
        return decode_entry(row["edited"][ATTENTION]) - decode_entry(row["unedited"][ATTENTION])
    return np.zeros((0, 0, 0), np.float32)


def _selected_head_counts(row: dict) -> list:
    """The row's layers × heads `selected_head_counts` as a list of one map, or no map."""
    diagnostics = row.get("diagnostics", {})
    return [diagnostics["selected_head_counts"]] if "selected_head_counts" in diagnostics else []


def _add_phase_seconds(totals: dict[str, float], row: dict, folder_rows: int) -> None:
    """Add a row's seconds per phase to `totals`, its edit phases split among the rows that shared them.

    A row carries the phase times of the edit it was part of (a batch's under `batch`, the whole run's under
    `sequential`: its folder's, of `folder_rows` rows); `eval_per_case` is the row's own share already.
    """
    sharing = folder_rows if row.get("protocol") == "sequential" else row.get("batch_size", 1)
    for phase, seconds in row.get("seconds", {}).items():
        name = "evaluation" if phase == "eval_per_case" else phase
        totals[name] = totals.get(name, 0.0) + seconds / (1 if phase == "eval_per_case" else sharing)


def series_of(runs: list[Run]) -> list[Series]:
    """The runs grouped as `sadr summarize` pairs them, each group labelled by its editor.

    Where one editor has several groups, the label adds the keys that tell them apart: the model and data set
    when those differ, else every key that does.
    """
    by_name = {run.name: run for run in runs}
    groups = [[by_name[name] for name in group] for group in baseline_groups({run.name: run.settings for run in runs})]
    out = []
    for group in groups:
        rivals = [g for g in groups if g[0].editor == group[0].editor]
        label = group[0].editor
        if len(rivals) > 1:
            keys = [k for k in differing_keys({g[0].name: g[0].settings for g in rivals})
                    if not k.startswith(MAY_DIFFER_FROM_BASELINE)]
            keys = [k for k in keys if k in ALWAYS] or keys
            label += " (" + ", ".join(f"{k}={group[0].settings.get(k)}" for k in keys) + ")"
        out.append(Series(label, sorted(group, key=lambda run: run.gamma)))
    return out


def _prompt_rows(run: Run, state: str) -> pd.DataFrame:
    table = run.metrics
    return table[(table.state == state) & (table.protocol == PROTOCOL) & (table.quantity != "magnitude")]


def tradeoff_table(series: list[Series]) -> pd.DataFrame:
    """One row per (series, run, metric) of TRADEOFF_METRICS: the edited model's mean and 95 % CI ×100."""
    records = []
    for line in series:
        for run in line.runs:
            part = _prompt_rows(run, "edited")
            for metric in TRADEOFF_METRICS:
                for _, row in part[(part.metric == metric) & (part.quantity == "value")].iterrows():
                    records.append({"series": line.label, "editor": run.editor, "lambda": run.gamma, "run": run.name,
                                    "metric": metric, "label": row.label, "mean": row["mean"], "ci95": row.ci95, "n": row.n})
    return pd.DataFrame.from_records(records, columns=["series", "editor", "lambda", "run", "metric", "label", "mean", "ci95", "n"])


def bars_table(line: Series) -> pd.DataFrame:
    """Every metric of a series, prompt level: the unedited model once, then each run edited (×100, 95 % CI)."""
    records = []
    bars = [("unedited", "unedited", line.runs[0], np.nan)] + [("edited", f"γ={line.tag(run)}", run, run.gamma) for run in line.runs]
    for state, bar, run, gamma in bars:
        for _, row in _prompt_rows(run, state).iterrows():
            records.append({"bar": bar, "state": state, "lambda": gamma, "run": run.name, "metric": row.metric,
                            "label": row.label, "quantity": row.quantity, "mean": row["mean"], "ci95": row.ci95, "n": row.n})
    return pd.DataFrame.from_records(records, columns=["bar", "state", "lambda", "run", "metric", "label", "quantity", "mean", "ci95", "n"])


def matrix_frame(matrix: np.ndarray) -> pd.DataFrame:
    """A layers × heads map as a table: one row per layer, one column per head."""
    return pd.DataFrame(matrix, index=pd.RangeIndex(matrix.shape[0], name="layer"), columns=[str(h) for h in range(matrix.shape[1])])


def config_diff(runs: list[Run]) -> pd.DataFrame:
    """One row per run, one column per config key whose value is not the same in every run."""
    keys = differing_keys({run.name: run.settings for run in runs})
    return pd.DataFrame([[run.settings.get(k) for k in keys] for run in runs],
                        index=pd.Index([run.name for run in runs], name="run"), columns=keys)


def environments(runs: list[Run]) -> pd.DataFrame:
    """One row per distinct environment (machine, Python, commit, package versions) and the run folders made in it."""
    grouped: dict[str, dict] = {}
    for run in runs:
        for folder, env in run.environments.items():
            record = {"python": env.get("python"), "platform": env.get("platform"), "device": env.get("device_name"),
                      "git_commit": env.get("git_commit"), **(env.get("packages") or {})}
            entry = grouped.setdefault(json.dumps(record, sort_keys=True, default=str), {"runs": [], **record})
            entry["runs"].append(folder)
    return pd.DataFrame([{**entry, "runs": ", ".join(entry["runs"])} for entry in grouped.values()])


def phase_seconds(runs: list[Run]) -> pd.DataFrame:
    """Seconds each phase took in each run, summed over its cases (`_add_phase_seconds` splits shared edit times)."""
    records = [{"run": run.name, "cases": run.cases.count, **run.cases.seconds,
                "total": sum(run.cases.seconds.values())} for run in runs]
    table = pd.DataFrame.from_records(records).set_index("run")
    return table[[c for c in table.columns if c != "total"] + ["total"]]
