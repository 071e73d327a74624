"""`sadr`: everything that is not a run (tables from finished runs, cache housekeeping)."""
from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tables and utilities for sadr-run results.")


@app.callback()
def _root() -> None:
    """sadr: knowledge-editing experiments with Selective Attention Drift Restriction."""


@app.command()
def summarize(
    root: Path = typer.Argument(..., help="a run directory, or a multirun directory holding many runs"),
    protocol: str = typer.Option("prompt", help="prompt (SADR Table 3) or case (ROME/MEMIT papers)"),
    out: Path = typer.Option(None, help="where to write summary.csv and summary.md (default: ROOT)"),
) -> None:
    """One comparison table (CSV and Markdown) of every run under ROOT, swept keys as columns."""
    from sadr.evaluation.summary import summarize as build

    if protocol not in ("prompt", "case"):
        raise typer.BadParameter(f"--protocol must be 'prompt' or 'case', not {protocol!r}")
    try:
        table = build(root, protocol)
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    target = out or root
    target.mkdir(parents=True, exist_ok=True)
    table.to_csv(target / "summary.csv", index=False)
    markdown = table.to_markdown(index=False)
    (target / "summary.md").write_text(markdown + "\n")
    typer.echo(markdown)
    typer.echo(f"\nwrote {target / 'summary.csv'} and {target / 'summary.md'}")


@app.command()
def compare(
    base: Path = typer.Argument(..., help="run directory of the baseline (e.g. the editor with sadr.lambda=0)"),
    other: Path = typer.Argument(..., help="run directory of the variant, on the same records (e.g. with SADR)"),
    out: Path = typer.Option(None, help="also write the table to this CSV file"),
) -> None:
    """Prompt-by-prompt comparison of two runs: paired difference ± 95 % CI, prompts up/down, sign test."""
    from sadr.evaluation.paired import compare_runs

    try:
        table = compare_runs(base, other)
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    if out:
        table.to_csv(out, index=False)
    typer.echo(table.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    app()
