"""Per-case results -> metric tables, in both scoring protocols (never averaged across them).

- prompt (SADR Table 3): every prompt is one observation; mean ×100, 95 % CI = 1.96 · standard error.
- case (ROME/MEMIT papers): mean within each case first, then over cases (CI over the case means).
"""
from __future__ import annotations

import math

import pandas as pd

from sadr.evaluation.probes import METRICS

# Table labels of every metric entry an evaluator may produce (unknown names are shown as they are).
LABELS: dict[str, str] = {name: metric.short for name, metric in METRICS.items()}
LABELS.update(drift_max="Drift", drift_mean="Drift mean")  # sadr/evaluation/drift.py, attention-mass points
LABELS.update(fluency="FL", consistency="Cons")  # sadr/evaluation/generation_metrics.py

# Harmonic-mean summaries and the success rates they combine.
SUMMARIES = {
    "score": ("efficacy", "paraphrase", "neighborhood"),  # ROME's Score
    "avg_s": ("efficacy", "paraphrase", "neighborhood", "relation", "distract_neighborhood"),  # SADR's Avg. S
}
PROTOCOLS = ("prompt", "case")
STATES = ("edited", "unedited")
SCORES = ("value", "p_good", "p_bad")  # what `metric_table` reads of a metric's entry


def mean_ci(values: list[float]) -> tuple[float, float, int]:
    """Mean and 95 % CI half-width (1.96 · sample std / √n) of `values`."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, 1
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n), n


def harmonic_mean(values: list[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def _observations(rows: list[dict], state: str, metric: str, quantity: str, protocol: str) -> list[float]:
    out = []
    for row in rows:
        entry = row.get(state, {}).get(metric)
        if not entry:
            continue
        if quantity == "value":
            values = entry["value"]
        elif "p_bad" in entry:
            values = [g - b for g, b in zip(entry["p_good"], entry["p_bad"])]
        else:
            continue
        if protocol == "prompt":
            out += values
        elif values:
            out.append(sum(values) / len(values))
    return out


def scored_fields(row: dict, states: tuple[str, ...] = STATES) -> dict:
    """What `metric_table` reads of a row: each state's entries, cut to their scores. The rest (attention blobs,
    generated texts, diagnostics) would hold a whole run's cases.jsonl in memory."""
    return {state: {name: {key: entry[key] for key in SCORES if key in entry} for name, entry in row[state].items()}
            for state in states if state in row}


def metric_table(rows: list[dict], states: tuple[str, ...] = STATES) -> pd.DataFrame:
    """One row per (state, metric, quantity, protocol): mean, ci95 and n, ×100.

    `value` is the success rate (or token accuracy, or fluency entropy); `magnitude` is p(good) − p(bad).
    """
    records = []
    names = list(dict.fromkeys(name for row in rows for state in states for name in row.get(state, {})))
    for state in states:
        for protocol in PROTOCOLS:
            for name in names:
                for quantity in ("value", "magnitude"):
                    mean, ci, n = mean_ci(_observations(rows, state, name, quantity, protocol))
                    if n:
                        records.append(dict(state=state, metric=name, label=LABELS.get(name, name), quantity=quantity,
                                            protocol=protocol, mean=100 * mean, ci95=100 * ci, n=n, components=""))
            successes = {r["metric"]: r["mean"] for r in records
                         if r["state"] == state and r["protocol"] == protocol and r["quantity"] == "value"}
            for summary, parts in SUMMARIES.items():
                if all(p in successes for p in parts):
                    records.append(dict(state=state, metric=summary, label=summary, quantity="harmonic_mean",
                                        protocol=protocol, mean=harmonic_mean([successes[p] for p in parts]),
                                        ci95=math.nan, n=len(rows), components="+".join(parts)))
    return pd.DataFrame.from_records(records, columns=["state", "metric", "label", "quantity", "protocol", "mean", "ci95", "n", "components"])


def compact_table(table: pd.DataFrame, protocol: str = "prompt") -> pd.DataFrame:
    """Success rates (and summaries) of one protocol, edited vs unedited, as 'mean ± ci' strings."""
    picked = table[(table.protocol == protocol) & (table.quantity != "magnitude")]
    text = picked.apply(lambda r: f"{r['mean']:.2f}" + ("" if math.isnan(r["ci95"]) else f" ± {r['ci95']:.2f}"), axis=1)
    picked = picked.assign(value=text)
    wide = picked.pivot(index="state", columns="label", values="value")
    order = [c for c in wide.columns if c not in SUMMARIES] + [s for s in SUMMARIES if s in wide.columns]
    return wide[order]
