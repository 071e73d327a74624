"""Many run directories -> one comparison table, with the keys that differ between runs as columns."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from sadr.evaluation.aggregate import LABELS
from sadr.evaluation.paired import compare_runs
from sadr.results import CONFIG_FILE, METRICS_FILE

# SADR comparisons must report δ-step counts (the paper's SADR runs used more steps than its baselines).
ALWAYS = ("model.name", "editor.name", "dataset.name", "sadr.lambda", "editor.v_num_grad_steps")
# Keys in which a run may differ from the γ = 0 run it is paired with (the paper's SADR runs changed δ steps too).
MAY_DIFFER_FROM_BASELINE = ("sadr.", "editor.v_num_grad_steps")
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


def run_settings(runs: list[Path]) -> dict[Path, dict]:
    """Each run's config.yaml, flattened to dotted keys ("editor.name")."""
    return {run: _flatten(OmegaConf.to_container(OmegaConf.load(run / CONFIG_FILE), resolve=False)) for run in runs}


def differing_keys(settings: dict[Path, dict]) -> list[str]:
    """The dotted keys whose value is not the same in every run, sorted."""
    keys = sorted({k for s in settings.values() for k in s})
    return [k for k in keys if len({repr(s.get(k)) for s in settings.values()}) > 1]


def baseline_groups(settings: dict[Path, dict]) -> list[list[Path]]:
    """Runs grouped by every setting but those a run may change against its γ = 0 baseline (SADR's, δ steps)."""
    groups: dict[tuple, list[Path]] = {}
    for run, values in settings.items():
        fixed = tuple(sorted((k, repr(v)) for k, v in values.items() if not k.startswith(MAY_DIFFER_FROM_BASELINE)))
        groups.setdefault(fixed, []).append(run)
    return list(groups.values())


def summarize(root: str | Path, protocol: str = "prompt") -> pd.DataFrame:
    """Rows: runs (edited) plus the unedited model once per distinct setting; columns: swept keys, metrics.

    `n_cases` counts the records edited; `n_obs` is the largest n behind a mean (prompts under the prompt
    protocol, records under the case protocol).
    """
    runs = find_runs(root)
    settings = run_settings(runs)
    keys = {k for s in settings.values() for k in s}
    swept = [k for k in ALWAYS if k in keys] + [k for k in differing_keys(settings) if k not in ALWAYS and k != "seed"]
    records = []
    for run in runs:
        table = pd.read_csv(run / METRICS_FILE)
        # every record has at least one metric, so the case protocol's largest n is the number of records
        n_cases = int(table[(table.protocol == "case") & (table.quantity == "value")].n.max())
        table = table[(table.protocol == protocol) & (table.quantity != "magnitude")]
        for state, part in table.groupby("state", sort=False):
            record = {k: settings[run].get(k) for k in swept}
            record.update(state=state, n_cases=n_cases, n_obs=int(part[part.quantity == "value"].n.max()) if (part.quantity == "value").any() else 0,
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


def paired_with_baselines(root: str | Path) -> pd.DataFrame:
    """Every run with γ > 0 against the γ = 0 run that differs from it only in SADR settings and δ steps.

    One row per (run, metric), as `sadr compare`; empty when no run has such a baseline under `root`.
    """
    settings = run_settings(find_runs(root))
    tables = []
    for group in baseline_groups(settings):
        baselines = [run for run in group if settings[run].get("sadr.lambda") == 0]
        for run in group:
            if baselines and run not in baselines:
                table = compare_runs(baselines[0], run)
                tables.append(table.assign(**{key: settings[run].get(key) for key in ("editor.name", "sadr.lambda", "editor.v_num_grad_steps")},
                                           base_run=str(baselines[0].relative_to(root)), run=str(run.relative_to(root))))
    if not tables:
        return pd.DataFrame()
    table = pd.concat(tables, ignore_index=True)
    leading = ["editor.name", "sadr.lambda", "editor.v_num_grad_steps", "base_run", "run"]
    return table[leading + [c for c in table.columns if c not in leading]]


def write_summary(root: Path, protocol: str, target: Path | None = None) -> str:
    """summary.csv/.md and, where runs pair with a γ = 0 baseline, paired.csv/.md in `target` (default: root).

    Returns the text to print: both tables and where they were written.
    """
    target = Path(target or root)
    target.mkdir(parents=True, exist_ok=True)
    table = summarize(root, protocol)
    table.to_csv(target / "summary.csv", index=False)
    markdown = table.to_markdown(index=False)
    (target / "summary.md").write_text(markdown + "\n")
    text = f"{protocol}-level results ×100 of every run in {root}:\n{markdown}\n"
    written = [target / "summary.csv", target / "summary.md"]
    paired = paired_with_baselines(root)
    if not paired.empty:
        paired.to_csv(target / "paired.csv", index=False)
        paired_markdown = paired.to_markdown(index=False, floatfmt=".3g")
        (target / "paired.md").write_text(paired_markdown + "\n")
        text += f"\neach γ > 0 run against its γ = 0 run, prompt by prompt (as `sadr compare`):\n{paired_markdown}\n"
        written += [target / "paired.csv", target / "paired.md"]
    return text + f"\nwrote {', '.join(str(p) for p in written)}"


class SummarizeSweep(Callback):
    """Hydra callback: when a multirun ends, its one comparison table (as `sadr summarize <sweep dir>`).

    Enabled per overlay (`hydra.callbacks.summarize._target_: sadr.evaluation.summary.SummarizeSweep`);
    Hydra does not call it when a job failed, so rebuild the table then with `sadr summarize`.
    """

    def __init__(self, protocol: str = "prompt") -> None:
        self.protocol = protocol

    def on_multirun_end(self, config, **kwargs) -> None:
        print("\n" + write_summary(Path(config.hydra.sweep.dir), self.protocol))
