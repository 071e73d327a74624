"""`sadr`: everything that is not a run: tables, paired comparisons and reports from finished runs."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Callable, TypeVar

import typer

T = TypeVar("T")

# Markdown mode joins a docstring's wrapped lines into paragraphs; the default rich mode keeps every source line break.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="Tables and utilities for sadr-run results.",
)


class Protocol(str, Enum):
    """How prompts are pooled: each prompt an observation (SADR's Table 3), or each case's mean (ROME/MEMIT papers)."""

    prompt = "prompt"
    case = "case"


@app.callback()
def _root() -> None:
    """sadr: knowledge-editing experiments with Selective Attention Drift Restriction."""


def _or_usage_error(action: Callable[[], T]) -> T:
    """What `action` returns; a path that cannot be read or written, or a value that does not fit, is printed as one
    `error:` line (exit status 2), without a traceback."""
    try:
        return action()
    except (OSError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err


@app.command()
def summarize(
    root: Path = typer.Argument(..., metavar="ROOT", help="a run directory, or a multirun directory holding many runs"),
    protocol: Protocol = typer.Option(Protocol.prompt, help="prompt (SADR Table 3) or case (ROME/MEMIT papers)"),
    out: Path = typer.Option(None, help="where to write summary.* and paired.* (default: ROOT)"),
) -> None:
    """One comparison table (CSV, Markdown and LaTeX) of every run under ROOT, swept keys as columns.

    Where a run with γ > 0 has a γ = 0 run that differs only in SADR settings, δ steps and the metrics evaluated,
    paired.csv, paired.md and paired.tex also compare the two under the same protocol (as `sadr compare`).
    """
    from sadr.evaluation.summary import write_summary

    typer.echo(_or_usage_error(lambda: write_summary(root, protocol.value, out)))


@app.command()
def compare(
    base: Path = typer.Argument(..., metavar="BASE", help="run directory of the baseline (e.g. the editor with sadr.lambda=0)"),
    other: Path = typer.Argument(..., metavar="OTHER", help="run directory of the variant, on the same records (e.g. with SADR)"),
    out: Path = typer.Option(None, help="also write the table to this file: LaTeX where it ends in .tex (.TEX), else "
                                        "CSV (its folder is made if missing)"),
    protocol: Protocol = typer.Option(Protocol.prompt,
                                      help="pair prompts, or each case's mean over its prompts (case)"),
) -> None:
    """Prompt-by-prompt (or case-by-case) comparison of two runs: paired difference ± 95 % CI, observations up/down,
    sign test."""
    from sadr.evaluation.paired import compare_runs
    from sadr.evaluation.summary import PAIRED_DIGITS, markdown_table, pair_title

    table = _or_usage_error(lambda: compare_runs(base, other, protocol.value))
    title = _or_usage_error(lambda: pair_title(base, other, protocol.value))
    if out:  # before the table is printed, so that a path it cannot write ends the output with the error alone
        _or_usage_error(lambda: _write_table(table, title, out))
    typer.echo(title)
    typer.echo(markdown_table(table, floatfmt=PAIRED_DIGITS))
    if out:
        typer.echo(f"wrote {out}")


def _write_table(table, title: str, out: Path) -> None:
    """`table` at `out`, as LaTeX under `title` where its name ends in .tex (floats to 3 digits, as printed), else as
    CSV, making its folder where it is missing, as `summarize --out` and `report --out` do."""
    from sadr.evaluation.summary import paired_latex

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".tex":  # as .YML settings are .yml
        out.write_text(paired_latex(table, title))
    else:
        table.to_csv(out, index=False)


@app.command()
def report(
    root: Path = typer.Argument(..., metavar="ROOT", help="a run directory, or a multirun directory holding many runs"),
    out: Path = typer.Option(None, help="where to write report.html and the plots (default: ROOT/report)"),
) -> None:
    """One self-contained HTML page of every run under ROOT (γ trade-off, attention-drift heatmaps, every metric,
    settings, versions, times), and each plot as PNG and SVG beside the CSV it was drawn from."""
    from sadr.report.build import write_report

    typer.echo(_or_usage_error(lambda: write_report(root, out)))


if __name__ == "__main__":
    app()
