"""Many run directories -> one comparison table, with the keys that differ between runs as columns."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from sadr.data.selection import parse_shard
from sadr.errors import DamagedFileError
from sadr.evaluation.aggregate import LABELS, metric_table, scored_fields
from sadr.evaluation.latex import latex_table
from sadr.evaluation.paired import compare_runs
from sadr.results import CONFIG_FILE, METRICS_FILE, RunDirectory, read_config

STEPS_KEY = "editor.v_num_grad_steps"
DECIMALS = 2  # of the means and CIs in summary.md and summary.tex (summary.csv keeps full precision)
# SADR comparisons must report δ-step counts (the paper's SADR runs used more steps than its baselines).
ALWAYS = ("model.name", "editor.name", "dataset.name", "sadr.lambda", STEPS_KEY)
# Keys that differ between runs but are not columns: the seed, and where an editor's hyperparameters were published
# (a sentence, which would make summary.md a few hundred characters wide; config.yaml keeps it).
NOT_COLUMNS = ("seed", "editor.source")
# Where a dataset is downloaded from: a column only where runs of one dataset.name differ in it (a mirror); otherwise
# dataset.name says it. A run that read dataset.path did not use it at all (`run_settings` leaves it out).
URL_KEY = "dataset.url"
# Keys in which a run may differ from the γ = 0 run it is paired with: the paper's SADR runs changed δ steps too, and
# the metrics two runs both have are compared whichever others either has (a baseline made when the default list of
# metrics was shorter still pairs).
MAY_DIFFER_FROM_BASELINE = ("sadr.", STEPS_KEY, "eval.metrics")
# Settings of the edit alone: the unedited model's row leaves them blank (it is the same model whatever they are).
EDIT_ONLY = ("editor.", "sadr.")
# Columns placed right after another metric's, so related numbers read side by side.
NEXT_TO = {LABELS["distract_neighborhood"]: (LABELS["drift_max"], LABELS["drift_mean"])}
# The runs of one configuration that differ only in this key are shards of it (`dataset.shard=i/n`).
SHARD_KEY = "dataset.shard"
METRIC_COLUMNS = ("state", "metric", "label", "quantity", "protocol", "mean", "ci95", "n")  # of the runner's metrics.csv


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
        unfinished = unfinished_runs(root)
        listed = "; ".join(f"{run} ({RunDirectory(run).count()} finished cases)" for run in unfinished[:3])
        more = f" and {len(unfinished) - 3} more" if len(unfinished) > 3 else ""
        hint = (f"; unfinished runs, without metrics (still running, killed or failed; re-running the same command "
                f"resumes them): {listed}{more}") if unfinished else ""
        raise FileNotFoundError(f"no finished runs under {root} (looked for {METRICS_FILE} beside {CONFIG_FILE}){hint}")
    return runs


def unfinished_runs(root: str | Path) -> list[Path]:
    """Run directories under `root` that hold a config but no metrics: still running, killed, or failed."""
    return sorted(p.parent for p in Path(root).rglob(CONFIG_FILE)
                  if ".hydra" not in p.parts and not (p.parent / METRICS_FILE).is_file())


def run_name(run: Path, root: Path) -> str:
    """How tables and reports name a run: its folder relative to the root they were asked for, or its folder's own
    name when it is that root."""
    return str(run.relative_to(root)) if run != root else run.resolve().name


def run_settings(runs: list[Path]) -> dict[Path, dict]:
    """Each run's config.yaml, flattened to dotted keys ("editor.name"), less `dataset.url` where the run read its
    records from `dataset.path` instead (sadr/data/sources.py)."""
    settings = {run: _flatten(read_config(run / CONFIG_FILE)) for run in runs}
    for values in settings.values():
        if values.get("dataset.path"):
            values.pop(URL_KEY, None)
    return settings


def differing_keys(settings: dict[Path, dict]) -> list[str]:
    """The dotted keys whose value is not the same in every run, sorted."""
    keys = sorted({k for s in settings.values() for k in s})
    return [k for k in keys if len({repr(s.get(k)) for s in settings.values()}) > 1]


def pair_title(base: Path, other: Path, protocol: str) -> str:
    """The title of `sadr compare`'s table: which run is the base, what an observation is, and the settings in which
    the two runs differ (when both have their config.yaml), so that a difference no one meant is seen."""
    title = f"{other} against the base {base}, {protocol} by {protocol}, ×100 (difference: other − base)"
    if not all((run / CONFIG_FILE).is_file() for run in (base, other)):
        return title + ":"
    settings = run_settings([base, other])
    differ = [f"{key} ({settings[base].get(key)} → {settings[other].get(key)})" for key in differing_keys(settings)]
    return f"{title}; their settings differ in: {', '.join(differ) or 'nothing'}:"


def baseline_groups(settings: dict[Path, dict]) -> list[list[Path]]:
    """Runs grouped by every setting but those a run may change against its γ = 0 baseline (SADR's, δ steps)."""
    groups: dict[tuple, list[Path]] = {}
    for run, values in settings.items():
        fixed = tuple(sorted((k, repr(v)) for k, v in values.items() if not k.startswith(MAY_DIFFER_FROM_BASELINE)))
        groups.setdefault(fixed, []).append(run)
    return list(groups.values())


@dataclass
class Configuration:
    """One configuration's results: a single run, or the shards (`dataset.shard=i/n`) of one merged."""

    runs: list[Path]
    settings: dict  # the runs' common settings, `dataset.shard` left out
    shard_indexes: tuple[int, ...] = ()  # i of each run's i/n, in the order of `runs`
    n_shards: int = 0  # n of i/n; 0 when not sharded
    unfinished: tuple[int, ...] = ()  # shard indexes whose run has not written its metrics

    @property
    def missing(self) -> list[int]:
        present = set(self.shard_indexes) | set(self.unfinished)
        return [i for i in range(1, self.n_shards + 1) if i not in present]

    def shards_label(self) -> str:
        """"4/4", or "2/4; missing 2; unfinished 4" (unfinished shards are listed, not counted)."""
        label = f"{len(self.runs)}/{self.n_shards}"
        if self.missing:
            label += f"; missing {', '.join(map(str, self.missing))}"
        if self.unfinished:
            label += f"; unfinished {', '.join(map(str, self.unfinished))}"
        return label

    def metrics(self, scored: list[dict] | None = None) -> pd.DataFrame:
        """The runner's metrics.csv; for shards, the same table over every shard's cases (CIs over all prompts), from
        `scored`, their rows' `scored_fields` where the caller has read them already, or else read here."""
        if not self.n_shards:
            return read_metrics(self.runs[0] / METRICS_FILE)
        if scored is None:
            scored = [scored_fields(row) for run in self.runs for row in RunDirectory(run).iter_rows()]
        return metric_table(scored)


def read_metrics(file: Path) -> pd.DataFrame:
    """A run's metrics.csv; one that cannot be read, or lacks the columns the runner writes, is named with the fix."""
    try:
        table = pd.read_csv(file)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        problem = f"cannot be read ({' '.join(str(err).split())})"
    else:
        missing = [column for column in METRIC_COLUMNS if column not in table.columns]
        if not missing:
            return table
        problem = f"lacks the column(s) {', '.join(missing)}"
    raise DamagedFileError(f"{file} {problem}; it was damaged or edited: delete it, and a rerun of the run's own "
                           f"command writes it again from its cases.jsonl")


def configurations(root: str | Path) -> list[Configuration]:
    """Every finished run under `root`, with the shards of one configuration merged into one Configuration."""
    runs = find_runs(root)
    settings = run_settings(runs)
    unfinished = unfinished_runs(root)
    unfinished_settings = run_settings(unfinished)
    groups: dict[tuple, list[Path]] = {}
    for run in runs:
        common = tuple(sorted((k, repr(v)) for k, v in settings[run].items() if k != SHARD_KEY))
        groups.setdefault(common if settings[run].get(SHARD_KEY) is not None else (run,), []).append(run)
    out = []
    for group in [part for group in groups.values() for part in _sweeps_of(group, settings)]:
        if settings[group[0]].get(SHARD_KEY) is None:  # without the key, as a sharded one: they may pair
            out.append(Configuration(group, {k: v for k, v in settings[group[0]].items() if k != SHARD_KEY}))
            continue
        shards = [parse_shard(settings[run][SHARD_KEY]) for run in group]
        n = shards[0][1]
        common = {k: v for k, v in settings[group[0]].items() if k != SHARD_KEY}
        pending = tuple(sorted(parse_shard(values[SHARD_KEY])[0] for run, values in unfinished_settings.items()
                               if values.get(SHARD_KEY) is not None
                               and {k: v for k, v in values.items() if k != SHARD_KEY} == common))
        order = sorted(range(len(group)), key=lambda j: shards[j][0])
        out.append(Configuration([group[j] for j in order], common, tuple(shards[j][0] for j in order), n, pending))
    return out


def _sweeps_of(group: list[Path], settings: dict[Path, dict]) -> list[list[Path]]:
    """The runs of one sharded configuration, as one group when they are i/n with one n and each i once, else split
    by the folder that holds them (two sweeps of the same settings, each with its own shards)."""
    def consistent(runs: list[Path]) -> bool:
        shards = [parse_shard(settings[run][SHARD_KEY]) for run in runs]
        return len({n for _, n in shards}) == 1 and len({i for i, _ in shards}) == len(shards)

    if settings[group[0]].get(SHARD_KEY) is None or consistent(group):
        return [group]
    folders: dict[Path, list[Path]] = {}
    for run in group:
        folders.setdefault(run.parent, []).append(run)
    if len(folders) > 1 and all(consistent(runs) for runs in folders.values()):
        return list(folders.values())
    listed = ", ".join(f"{run} ({settings[run][SHARD_KEY]})" for run in group)
    raise ValueError(f"the shards of one configuration must be i/n with one n and each i once; found {listed}. "
                     "Remove the runs made twice, or summarize each sweep's folder on its own")


def summarize(root: str | Path, protocol: str = "prompt", found: list[Configuration] | None = None) -> pd.DataFrame:
    """Rows: configurations (edited) plus the unedited model once per distinct setting; columns: swept keys, metrics.

    The shards of one configuration (runs that differ only in `dataset.shard`) make one row: their cases
    together, CIs over all prompts, and a `shards` column ("3/4; missing 2"). `n_cases` counts the records
    edited; `n_obs` is the largest n behind a mean (prompts under the prompt protocol, records under the case
    protocol). Means and CIs keep full precision; `summary.md` shows them to 2 decimals (`rounded_metrics`).
    `found`: `configurations(root)`, where the caller has them already.
    """
    root = Path(root)
    found = configurations(root) if found is None else found
    settings = {id(c): c.settings for c in found}
    keys = {k for s in settings.values() for k in s}
    url_per_name = {(s.get("dataset.name"), s[URL_KEY]) for s in settings.values() if URL_KEY in s}
    url_named = len(url_per_name) == len({name for name, _ in url_per_name})
    swept = [k for k in ALWAYS if k in keys] + [k for k in differing_keys(settings)
                                                if k not in ALWAYS + NOT_COLUMNS and not (k == URL_KEY and url_named)]
    sharded = any(c.n_shards for c in found)
    records = []
    for configuration in found:
        table = configuration.metrics()
        if table.empty:  # nothing measured (`write_summary` names such runs)
            continue
        # every record has at least one metric, so the case protocol's largest n is the number of records
        n_cases = int(table[(table.protocol == "case") & (table.quantity == "value")].n.max())
        table = table[(table.protocol == protocol) & (table.quantity != "magnitude")]
        runs = ",".join(run_name(run, root) for run in configuration.runs)
        for state, part in table.groupby("state", sort=False):
            record = {k: configuration.settings.get(k) for k in swept}
            if sharded:
                record["shards"] = configuration.shards_label() if configuration.n_shards else ""
            record.update(state=state, n_cases=n_cases, n_obs=int(part[part.quantity == "value"].n.max()) if (part.quantity == "value").any() else 0,
                          run=runs)
            for _, row in part.iterrows():
                record[row.label] = row["mean"]
                if row.quantity == "value":
                    record[f"{row.label} ci95"] = row["ci95"]
            records.append(record)
    if not records:
        raise FileNotFoundError(f"no run under {root} has a metric entry in its {METRICS_FILE}: "
                                f"{', '.join(str(run) for c in found for run in c.runs)}")
    frame = pd.DataFrame.from_records(records)
    edited = frame[frame.state == "edited"]
    # the unedited model once per model, dataset and setting of the evaluation (settings of the edit do not change it)
    same_unedited = [c for c in frame.columns if c not in (*swept, "run", "state", "shards")]
    same_unedited += [key for key in ("model.name", "dataset.name") if key in frame]
    unedited = frame[frame.state == "unedited"].drop_duplicates(subset=same_unedited)
    edit_only = [key for key in swept if key.startswith(EDIT_ONLY)]
    unedited = unedited.assign(**{key: None for key in edit_only})
    if "editor.name" in unedited:
        unedited = unedited.assign(**{"editor.name": "none"})
    # the edit-only columns as objects in both parts, and no empty part: pandas 2 and 3 then give the table the same
    # dtypes (blanks, not NaN, where the unedited rows have no γ), and pandas 2 no FutureWarning
    parts = [part.astype({key: object for key in edit_only}) for part in (unedited, edited) if not part.empty]
    return _order_columns(pd.concat(parts, ignore_index=True))


def markdown_table(table: pd.DataFrame, **options) -> str:
    """`table` as Markdown with a blank, not "nan", where a run has no value (a metric it did not evaluate, a setting
    it does not have); `options` go to `DataFrame.to_markdown` (tabulate)."""
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, missingval="", **options)


PAIRED_DIGITS = ".3g"  # a paired table's floats, as `sadr compare`, paired.md and paired.tex show them


def paired_latex(table: pd.DataFrame, title: str) -> str:
    """A paired comparison (`compare_runs`, `paired_with_baselines`) as LaTeX, its floats as paired.md shows them."""
    floats = [column for column in table.columns if table[column].dtype.kind == "f"]
    return latex_table(table, title, dict.fromkeys(floats, PAIRED_DIGITS))


def rounded_metrics(table: pd.DataFrame) -> pd.DataFrame:
    """`summarize`'s table with its metric columns rounded to DECIMALS, settings such as γ = 0.001 left as they are.
    A mean that rounds to zero is 0, not -0 (-0.001 rounds to -0.0, which the Markdown table shows as -0)."""
    metrics = _metric_columns(table)
    rounded = table.round(dict.fromkeys(metrics, DECIMALS))
    floats = [column for column in metrics if rounded[column].dtype.kind == "f"]
    rounded[floats] = rounded[floats] + 0.0
    return rounded


def _metric_columns(table: pd.DataFrame) -> list[str]:
    """`summarize`'s metric columns: every column after `run`."""
    return list(table.columns[table.columns.get_loc("run") + 1 :])


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


def _baseline_of(runs: tuple, baselines: list[tuple], settings: dict) -> tuple | None:
    """The γ = 0 configuration to pair `runs` with: the one with the same δ-step count, else the only one; sought
    among those in the same folder where there are any (two sweeps of the same settings under one root pair within
    each)."""
    folders = {run.parent for run in runs}
    candidates = [base for base in baselines if {run.parent for run in base} == folders] or baselines
    same_steps = [base for base in candidates if settings[base].get(STEPS_KEY) == settings[runs].get(STEPS_KEY)]
    if same_steps:
        return same_steps[0]
    return candidates[0] if len(candidates) == 1 else None


def paired_with_baselines(root: str | Path, protocol: str = "prompt",
                          found: list[Configuration] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Every configuration with γ > 0 against the γ = 0 one that differs from it only in SADR settings, δ steps and
    `eval.metrics` (MAY_DIFFER_FROM_BASELINE).

    That baseline is the one with the same δ-step count, or else the only γ = 0 one (the paper's SADR runs took more
    steps than their baselines; `base steps` says which). Returns one row per (configuration, metric), as
    `sadr compare --protocol <protocol>`, shards merged (empty when none pairs), and a line for each configuration left unpaired though
    it has γ = 0 runs beside it: several with other step counts, or records not the same (a shard not finished).
    `found`: `configurations(root)`, where the caller has them already.
    """
    root = Path(root)
    found = {tuple(c.runs): c for c in (configurations(root) if found is None else found)}
    settings = {runs: c.settings for runs, c in found.items()}
    name = lambda runs: ",".join(run_name(run, root) for run in runs)  # noqa: E731
    tables, unpaired = [], []
    for group in baseline_groups(settings):
        baselines = [runs for runs in group if settings[runs].get("sadr.lambda") == 0]
        for runs in group:
            if not baselines or runs in baselines:
                continue
            base = _baseline_of(runs, baselines, settings)
            if base is None:
                steps = ", ".join(f"{name(b)} ({settings[b].get(STEPS_KEY)})" for b in baselines)
                unpaired.append(f"{name(runs)} ({settings[runs].get(STEPS_KEY)} δ steps): several γ = 0 runs, none "
                                f"with its δ steps: {steps}; pair it with one by `sadr compare`")
                continue
            try:
                table = compare_runs(list(base), list(runs), protocol)
            except ValueError as err:
                unpaired.append(f"{name(runs)} against {name(base)}: {err}")
                continue
            tables.append(table.assign(**{key: settings[runs].get(key) for key in ("editor.name", "sadr.lambda", STEPS_KEY)},
                                       **{"base steps": settings[base].get(STEPS_KEY)}, base_run=name(base), run=name(runs)))
    if not tables:
        return pd.DataFrame(), unpaired
    table = pd.concat(tables, ignore_index=True)
    leading = ["editor.name", "sadr.lambda", STEPS_KEY, "base steps", "base_run", "run"]
    return table[leading + [c for c in table.columns if c not in leading]], unpaired


def write_summary(root: Path, protocol: str, target: Path | None = None) -> str:
    """summary.csv/.md/.tex and, where runs pair with a γ = 0 baseline, paired.csv/.md/.tex in `target` (default:
    root); where none pairs, an earlier summary's paired.csv/.md/.tex there are removed.

    Returns the text to print: both tables and where they were written.
    """
    found = configurations(root)  # the runs are found and their settings read once, for both tables
    table = summarize(root, protocol, found)
    target = Path(target or root)
    target.mkdir(parents=True, exist_ok=True)
    table.to_csv(target / "summary.csv", index=False)
    # each .md and .tex file opens with the title printed above its table, which names the protocol
    title = f"{protocol}-level results ×100 of every run in {root}:"
    summary = f"{title}\n{markdown_table(rounded_metrics(table))}\n"
    (target / "summary.md").write_text(summary)
    (target / "summary.tex").write_text(latex_table(table, title, {column: f".{DECIMALS}f" for column in
                                                                    _metric_columns(table)}))
    text = summary
    written = [target / f"summary.{kind}" for kind in ("csv", "md", "tex")]
    paired, unpaired = paired_with_baselines(root, protocol, found)
    if not paired.empty:
        paired.to_csv(target / "paired.csv", index=False)
        title = (f"each γ > 0 run against its γ = 0 run, {protocol} by {protocol} (as `sadr compare --protocol "
                 f"{protocol}`):")
        paired_text = f"{title}\n{markdown_table(paired, floatfmt=PAIRED_DIGITS)}\n"
        (target / "paired.md").write_text(paired_text)
        (target / "paired.tex").write_text(paired_latex(paired, title))
        text += "\n" + paired_text
        written += [target / f"paired.{kind}" for kind in ("csv", "md", "tex")]
    stale = [] if not paired.empty else [target / f"paired.{kind}" for kind in ("csv", "md", "tex")
                                         if (target / f"paired.{kind}").is_file()]
    for file in stale:  # an earlier summary's: left beside this one, it would pass for the pairs of these runs
        file.unlink()
    if unpaired:
        text += "\nγ > 0 runs not paired with a γ = 0 run:\n" + "\n".join(f"  {line}" for line in unpaired) + "\n"
    unmeasured = sorted(run for c in found for run in c.runs if read_metrics(run / METRICS_FILE).empty)
    if unmeasured:
        text += ("\nnot in the tables: runs whose metrics.csv has no entry (their eval.metrics had no prompt in their "
                 "cases):\n" + "\n".join(f"  {run}" for run in unmeasured) + "\n")
    unfinished = unfinished_runs(root)
    if unfinished:
        text += ("\nnot in the tables: runs without metrics (still running, killed or failed; re-running the same "
                 "command resumes them):\n" + "\n".join(f"  {run}  log: {_log_of(run)}" for run in unfinished) + "\n")
    names = [file.name for file in stale]
    listed = " and ".join(filter(None, [", ".join(names[:-1]), *names[-1:]]))
    removed = f"; removed the earlier {listed}: no run pairs now" if stale else ""
    return text + f"\nwrote {', '.join(str(p) for p in written)}{removed}"


def _log_of(run: Path) -> str:
    logs = sorted(run.glob("*.log"))
    return ", ".join(map(str, logs)) if logs else "none"


class SummarizeSweep(Callback):
    """Hydra callback: when a multirun ends, its one comparison table (as `sadr summarize <sweep dir>`).

    Enabled for every sweep by config.yaml (`hydra.callbacks.summarize`); Hydra does not call it when a job failed,
    so rebuild the table then with `sadr summarize`.
    """

    def __init__(self, protocol: str = "prompt") -> None:
        self.protocol = protocol

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            print("\n" + write_summary(sweep, self.protocol))
        except (OSError, ValueError) as err:  # the runs are done and kept: one line, not a traceback after them
            print(f"\nno tables for the sweep ({err}); every run's results are in its folder under {sweep}, and "
                  f"`sadr summarize {sweep}` makes the tables once the problem is fixed", file=sys.stderr)
