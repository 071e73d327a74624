"""Many run directories -> one comparison table, with the keys that differ between runs as columns."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from sadr.evaluation.aggregate import LABELS
from sadr.results import CONFIG_FILE, METRICS_FILE, RunDirectory

# SADR comparisons must report δ-step counts (the paper's SADR runs used more steps than its baselines).
ALWAYS = ("model.name", "editor.name", "dataset.name", "sadr.lambda", "editor.v_num_grad_steps")
# Columns placed right after another metric's, so related numbers read side by side.
NEXT_TO = {LABELS["distract_neighborhood"]: (LABELS["drift_max"], LABELS["drift_mean"])}


def _flatten(node, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = str(value) if isinstance(value, list) else value
    return flat


def find_runs(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; pass a run directory or a multirun directory")
    runs = sorted(p.parent for p in root.rglob(METRICS_FILE) if (p.parent / CONFIG_FILE).is_file())
    if not runs:
        raise FileNotFoundError(f"no finished runs under {root} (looked for {METRICS_FILE} beside {CONFIG_FILE})")
    return runs


def summarize(root: str | Path, protocol: str = "prompt") -> pd.DataFrame:
    """Rows: runs (edited) plus the unedited model once per distinct setting; columns: swept keys, metrics.

    `n_cases` counts the records edited; `n_obs` is the largest n behind a mean (prompts under the prompt
    protocol, records under the case protocol).
    """
    runs = find_runs(root)
    settings = {run: _flatten(OmegaConf.to_container(OmegaConf.load(run / CONFIG_FILE), resolve=False)) for run in runs}
    keys = sorted({k for s in settings.values() for k in s})
    swept = [k for k in keys if len({repr(s.get(k)) for s in settings.values()}) > 1 and k != "seed" or k in ALWAYS]
    swept = [k for k in ALWAYS if k in keys] + [k for k in swept if k not in ALWAYS]
    n_cases = {run: len(RunDirectory(run).rows()) for run in runs}
    records = []
    for run in runs:
        table = pd.read_csv(run / METRICS_FILE)
        table = table[(table.protocol == protocol) & (table.quantity != "magnitude")]
        for state, part in table.groupby("state", sort=False):
            record = {k: settings[run].get(k) for k in swept}
            record.update(state=state, n_cases=n_cases[run], n_obs=int(part[part.quantity == "value"].n.max()) if (part.quantity == "value").any() else 0,
                          run=str(run.relative_to(root)) if run != Path(root) else ".")
            for _, row in part.iterrows():
                record[row.label] = round(row["mean"], 2)
                if row.quantity == "value":
                    record[f"{row.label} ci95"] = round(row["ci95"], 2)
            records.append(record)
    frame = pd.DataFrame.from_records(records)
    edited = frame[frame.state == "edited"]
    unedited = frame[frame.state == "unedited"].drop_duplicates(subset=[c for c in frame.columns if c not in (*swept, "run", "state")] + ["model.name", "dataset.name"])
    if "editor.name" in unedited:
        unedited = unedited.assign(**{"editor.name": "none"})
    return _order_columns(pd.concat([unedited, edited], ignore_index=True))


def _order_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Move each NEXT_TO group (with its ci95 columns) right after its anchor metric's columns."""
    columns = list(frame.columns)
    for anchor, followers in NEXT_TO.items():
        moved = [c for label in followers for c in (label, f"{label} ci95") if c in columns]
        if anchor not in columns or not moved:
            continue
        columns = [c for c in columns if c not in moved]
        at = columns.index(f"{anchor} ci95") if f"{anchor} ci95" in columns else columns.index(anchor)
        columns[at + 1 : at + 1] = moved
    return frame[columns]


def write_summary(table: pd.DataFrame, target: Path) -> str:
    """summary.csv and summary.md in `target`; returns the Markdown."""
    target.mkdir(parents=True, exist_ok=True)
    table.to_csv(target / "summary.csv", index=False)
    markdown = table.to_markdown(index=False)
    (target / "summary.md").write_text(markdown + "\n")
    return markdown


class SummarizeSweep(Callback):
    """Hydra callback: when a multirun ends, its one comparison table (as `sadr summarize <sweep dir>`).

    Enabled per overlay (`hydra.callbacks.summarize._target_: sadr.evaluation.summary.SummarizeSweep`);
    Hydra does not call it when a job failed, so rebuild the table then with `sadr summarize`.
    """

    def __init__(self, protocol: str = "prompt") -> None:
        self.protocol = protocol

    def on_multirun_end(self, config, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        markdown = write_summary(summarize(root, self.protocol), root)
        print(f"\n{self.protocol}-level results ×100 of every run in {root}:\n{markdown}\n\n"
              f"wrote {root / 'summary.csv'} and {root / 'summary.md'}")
