"""`sadr report`: one self-contained HTML page of a run or a sweep, and every plot as PNG and SVG beside
the CSV it was drawn from (so the plotted numbers can be checked, or re-plotted elsewhere)."""
from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from sadr.evaluation.summary import ALWAYS, paired_with_baselines
from sadr.report import page
from sadr.report.data import (
    TRADEOFF_METRICS,
    Run,
    Series,
    bars_table,
    config_diff,
    environments,
    load_runs,
    matrix_frame,
    phase_seconds,
    series_of,
    tradeoff_table,
)
from sadr.report.plots import bars_figure, drift_figure, save, tradeoff_figure

REPORT_FILE = "report.html"
FILES_LIST = "report_files.txt"  # the names of the files the last report wrote into its folder, one a line
MAX_STEM = 120  # characters of a file name before its suffix; file systems allow 255 bytes


def file_stem(*parts: str) -> str:
    """`parts` joined by "_" as a file name: other characters than [A-Za-z0-9.=-] become "_", and a name longer than
    MAX_STEM (a series of many shards, or of runs in long folders) is cut and ends in a hash of the whole."""
    stem = re.sub(r"[^A-Za-z0-9.=-]+", "_", "_".join(parts)).strip("_")
    if len(stem) <= MAX_STEM:
        return stem
    return f"{stem[:MAX_STEM - 11]}_{hashlib.sha1(stem.encode()).hexdigest()[:10]}"


class ReportFolder:
    """The folder a report is written into, and the names of the files written there. `finish` removes the files the
    previous report listed in FILES_LIST that this one did not write again (a removed run's plots, a paired.csv where
    nothing pairs now), which would pass for this report's, and leaves every other file in the folder alone."""

    def __init__(self, path: Path):
        self.path = path
        self.written: set[str] = set()

    def csv(self, table: pd.DataFrame, name: str, **options) -> None:
        table.to_csv(self.path / name, **options)
        self.written.add(name)

    def figure(self, figure, stem: str) -> str:
        """`stem`.png and `stem`.svg; the PNG as base64, for embedding in the page."""
        png = save(figure, self.path, stem)
        self.written |= {f"{stem}.png", f"{stem}.svg"}
        return png

    def text(self, name: str, text: str) -> None:
        (self.path / name).write_text(text, encoding="utf-8")
        self.written.add(name)

    def finish(self) -> list[str]:
        """Remove the previous report's files that this one did not write, list this one's; the names removed."""
        listed = self.path / FILES_LIST
        previous = listed.read_text(encoding="utf-8").splitlines() if listed.is_file() else []
        # a plain name only: the list is a file a user may edit
        stale = sorted({name for name in previous if name and Path(name).name == name} - self.written)
        for name in stale:
            (self.path / name).unlink(missing_ok=True)
        listed.write_text("".join(f"{name}\n" for name in sorted(self.written)), encoding="utf-8")
        return stale


def write_report(root: str | Path, out: str | Path | None = None) -> str:
    """Write the report of every run under `root` into `out` (default: ROOT/report); returns what to print."""
    root = Path(root)
    runs = load_runs(root)
    target = Path(out) if out else root / "report"
    target.mkdir(parents=True, exist_ok=True)
    folder = ReportFolder(target)
    series = series_of(runs)
    sections = [
        ("tradeoff", "γ trade-off", _tradeoff(series, folder)),
        ("drift", "Attention drift by layer and head", _drift(series, folder)),
        ("metrics", "Every metric, edited vs unedited", _metrics(series, root, folder)),
        ("runs", "Runs, settings, versions, times", _metadata(runs, folder)),
    ]
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"{len(runs)} run(s) under {root.resolve()}; prompt-level means ×100 with 95 % CIs; made {generated}"
    folder.text(REPORT_FILE, page.page(f"sadr report: {root.resolve().name}", subtitle, sections))
    removed = folder.finish()
    plots = sum(part.count("<figure>") for _, _, parts in sections for part in parts)
    done = (f"wrote {target / REPORT_FILE} and {plots} plots (PNG and SVG, each beside the CSV it was drawn from) in "
            f"{target}")
    if removed:
        done += f"; removed the {len(removed)} file(s) of the previous report that this one does not have"
    return done


def _tradeoff(series: list[Series], folder: ReportFolder) -> list[str]:
    table = tradeoff_table(series)
    if table.empty:
        return [page.paragraph("No run has any of the trade-off metrics (DNS, RS, NS, ES, PS, Drift) in its metrics.csv.")]
    folder.csv(table, "tradeoff.csv", index=False)
    png = folder.figure(tradeoff_figure(table, TRADEOFF_METRICS), "tradeoff")
    caption = ("Edited model, prompt level, mean ± 95 % CI against the SADR weight γ (equally spaced categories), "
               "one line per editor.")
    return [page.figure_html(png, "tradeoff", caption, ["tradeoff.csv"])]


def _matrices(line: Series, folder: ReportFolder, kind: str, compute, label) -> tuple[list, list[str]]:
    """(label, layers × heads matrix) of every run of `line` that has one, each also written as `<kind>_*.csv`."""
    matrices, files = [], []
    for run in line.runs:
        matrix = compute(run)
        if matrix is not None:
            name = f"{file_stem(kind, line.label, line.tag(run))}.csv"
            folder.csv(matrix_frame(matrix), name)
            matrices.append((label(run), matrix))
            files.append(name)
    return matrices, files


def _drift(series: list[Series], folder: ReportFolder) -> list[str]:
    figures = []
    intro = page.paragraph(
        "Per layer and head: attention from the last prompt token to the edited subject's last token on every "
        "Distract Neighborhood prompt, edited − unedited, mean over prompts, in percentage points (red: the edit "
        "pulls attention onto the subject). Green: in how many rewrite prompts SADR's last δ step restricted the head.")
    for line in series:
        drift, drift_files = _matrices(line, folder, "drift", lambda run: run.cases.drift,
                                       lambda run: f"γ={line.tag(run)} ({'SADR' if run.gamma > 0 else 'no SADR'})")
        selected, selected_files = _matrices(line, folder, "selected_heads", lambda run: run.cases.selected_heads,
                                             lambda run: f"heads SADR selected, γ={line.tag(run)}")
        files = drift_files + selected_files
        if not drift and not selected:
            continue
        figure = drift_figure(f"{line.label}: attention drift to the edited subject (DNS prompts)", drift, selected)
        stem = file_stem("drift", line.label)
        figures.append(page.figure_html(folder.figure(figure, stem), stem, line.label, files))
    if not figures:
        return [page.paragraph("No run recorded subject_attention; runs made with eval.drift=true (the default) do.")]
    return [intro, page.side_by_side(figures)]


def _metrics(series: list[Series], root: Path, folder: ReportFolder) -> list[str]:
    parts, unmeasured = [], []
    for line in series:
        table = bars_table(line)
        if table.empty:  # its metrics had no prompt in its cases
            unmeasured += [run.name for run in line.runs]
            continue
        stem = file_stem("bars", line.label)
        folder.csv(table, f"{stem}.csv", index=False)
        png = folder.figure(bars_figure(table, line.label), stem)
        caption = f"{line.label}: every metric of the unedited model and of each run, prompt level, mean ± 95 % CI."
        parts.append(page.figure_html(png, stem, caption, [f"{stem}.csv"]))
    if unmeasured:
        parts.append(page.paragraph(f"Not shown: runs whose metrics.csv has no entry (their eval.metrics had no prompt "
                                    f"in their cases): {', '.join(unmeasured)}."))
    paired, unpaired = paired_with_baselines(root)
    if paired.empty:
        parts.append(page.paragraph("No run with γ > 0 has a γ = 0 run that differs from it only in SADR settings, "
                                    "δ steps and metrics evaluated, so there is no prompt-by-prompt comparison."))
    else:
        folder.csv(paired, "paired.csv", index=False)
        parts.append(page.subsection("Each γ > 0 run against its γ = 0 run, prompt by prompt (as sadr compare)", [
            page.paragraph("difference: other − base, ×100, with its paired 95 % CI; up/down: prompts that changed; "
                           "sign-test p: exact two-sided; base steps: the γ = 0 run's δ steps."),
            page.table_html(paired)]))
    if unpaired:
        parts.append(page.subsection("γ > 0 runs not paired with a γ = 0 run", [page.paragraph(line) for line in unpaired]))
    return parts


def _metadata(runs: list[Run], folder: ReportFolder) -> list[str]:
    overview = pd.DataFrame([{"run": run.name, **{k: run.settings.get(k) for k in ALWAYS}, "cases": run.cases.count}
                             for run in runs]).set_index("run")
    diff = config_diff(runs)
    envs = environments(runs)
    seconds = phase_seconds(runs)
    for name, table in (("runs", overview), ("config_diff", diff), ("environment", envs), ("seconds", seconds)):
        folder.csv(table, f"{name}.csv", index=name != "environment")
    parts = [page.table_html(overview)]
    if diff.columns.empty:
        parts.append(page.subsection("Config differences", [page.paragraph(
            "Every run has the same config; see its config.yaml.")]))
    else:
        parts.append(page.subsection("Config differences (only the keys that differ)", [page.table_html(diff)]))
    parts.append(page.subsection("Machine and versions (environment.json; one column per distinct environment)",
                                 [page.table_html(envs.set_index("runs").T.rename_axis(index="run(s)", columns=None))]))
    parts.append(page.subsection("Seconds per phase, summed over cases", [page.table_html(seconds)]))
    return parts
