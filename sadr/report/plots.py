"""The report's figures, drawn from the tables of sadr/report/data.py.

Each figure is a bare `matplotlib.figure.Figure` on an Agg canvas, never a pyplot figure: nothing enters
pyplot's global registry, so nothing has to be closed and no backend setting leaks into the caller.
"""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
UNEDITED_COLOR = "0.6"
DRIFT_METRICS = ("drift_max", "drift_mean")


def _shortened(labels: list[str], most: int = 24) -> list[str]:
    """Labels of at most `most` characters, their middle elided (a run's tag ends with its folder, which tells runs of
    one γ apart), where they stay distinct; a label as long as a folder path would take a panel's whole width, and the
    layout would give up. The full names are in the figure's CSV."""
    head = (most - 1) // 2
    short = [label if len(label) <= most else f"{label[:head]}…{label[head + 1 - most:]}" for label in labels]
    return short if len(set(short)) == len(set(labels)) else labels


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _unit(metric: str, quantity: str = "value") -> str:
    if metric in DRIFT_METRICS:
        return "attention drift (pp)"
    if quantity == "harmonic_mean":
        return "harmonic mean of rates"
    if metric == "fluency":
        return "n-gram entropy ×100"
    return "% of prompts"


def _grid(figure: Figure, n_panels: int, n_columns: int):
    columns = min(n_columns, n_panels)
    axes = list(figure.subplots(math.ceil(n_panels / columns), columns, squeeze=False).flat)
    for unused in axes[n_panels:]:
        unused.set_visible(False)
    return axes[:n_panels]


def tradeoff_figure(table: pd.DataFrame, metrics: tuple[str, ...]) -> Figure:
    """One panel per metric (in `metrics` order): mean ± 95 % CI against γ, one line per series.

    γ is categorical (its values in increasing order, equally spaced) since it includes 0 and spans decades;
    the series are nudged sideways so their error bars do not hide each other.
    """
    present = [m for m in metrics if m in set(table.metric)]
    gammas = sorted(table["lambda"].unique())
    position = {gamma: i for i, gamma in enumerate(gammas)}
    series = list(dict.fromkeys(table.series))
    nudge = 0.06 if len(gammas) > 1 else 0.03
    figure = _figure(4.0 * min(3, len(present)), 3.1 * math.ceil(len(present) / 3) + 0.5)
    for ax, metric in zip(_grid(figure, len(present), 3), present):
        part = table[table.metric == metric]
        for i, name in enumerate(series):
            points = part[part.series == name].sort_values("lambda")
            x = [position[g] + nudge * (i - (len(series) - 1) / 2) for g in points["lambda"]]
            ax.plot(x, points["mean"], marker="o", color=f"C{i}", label=name)
            ax.errorbar(x, points["mean"], yerr=points["ci95"], fmt="none", ecolor=f"C{i}", capsize=3)
        ax.set_xticks(range(len(gammas)), [f"{g:g}" for g in gammas])
        ax.set_xlim(-0.5, len(gammas) - 0.5)
        ax.set_title(f"{part.label.iloc[0]}  ({metric.replace('_', ' ')})")
        ax.set_xlabel("γ (sadr.lambda)")
        ax.set_ylabel(_unit(metric))
        ax.grid(axis="y", alpha=0.3)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=len(series), title="editor")
    return figure


def bars_figure(table: pd.DataFrame, title: str) -> Figure:
    """One panel per metric: a bar (mean ± 95 % CI) for the unedited model and each edited run."""
    metrics = list(dict.fromkeys(table.metric))
    bars = list(dict.fromkeys(table.bar))
    colors = [UNEDITED_COLOR] * ("unedited" in bars) + [f"C{i}" for i in range(len(bars) - ("unedited" in bars))]
    figure = _figure(2.2 * min(5, len(metrics)) + 0.4, 2.5 * math.ceil(len(metrics) / 5) + 0.5)
    for ax, metric in zip(_grid(figure, len(metrics), 5), metrics):
        part = table[table.metric == metric].set_index("bar")
        shown = [i for i, bar in enumerate(bars) if bar in part.index]
        means = [part.loc[bars[i], "mean"] for i in shown]
        cis = [part.loc[bars[i], "ci95"] for i in shown]
        ax.bar(shown, means, yerr=cis, color=[colors[i] for i in shown], capsize=3)
        for x, mean, ci in zip(shown, means, cis):  # the value just beyond the error bar's end
            reach = mean + math.copysign(0.0 if math.isnan(ci) else ci, mean)
            ax.annotate(f"{mean:.3g}", (x, reach), xytext=(0, 3 if mean >= 0 else -3), textcoords="offset points",
                        ha="center", va="bottom" if mean >= 0 else "top", fontsize=7)
        ax.set_xticks(range(len(bars)), _shortened(bars), rotation=30, ha="right", fontsize=8)
        ax.set_title(part.label.iloc[0], fontsize=10)
        ax.set_ylabel(_unit(metric, part.quantity.iloc[0]), fontsize=8)
        ax.margins(y=0.15)
    figure.suptitle(title)
    return figure


def drift_figure(title: str, drift: list[tuple[str, np.ndarray]], selected: list[tuple[str, np.ndarray]]) -> Figure:
    """Layer × head heatmaps side by side: attention drift of each run (one shared diverging scale), then
    how often SADR selected each head (one shared sequential scale)."""
    maps = [m for _, m in drift + selected]
    layers, heads = maps[0].shape
    panel_width = min(4.0, max(1.9, 0.12 * heads + 0.9))
    colorbars = bool(drift) + bool(selected)
    figure = _figure(panel_width * len(maps) + 1.0 * colorbars + 0.4, min(8.0, max(3.5, 0.11 * layers + 1.8)))
    axes = figure.subplots(1, len(maps), squeeze=False)[0]
    drift_limit = max((float(np.abs(m).max()) for _, m in drift), default=0.0) or 1e-9
    selected_limit = max((float(m.max()) for _, m in selected), default=0.0) or 1.0
    norms = [("RdBu_r", Normalize(-drift_limit, drift_limit))] * len(drift)
    norms += [("Greens", Normalize(0.0, selected_limit))] * len(selected)
    names = _shortened([name for name, _ in drift + selected])
    images = []
    for ax, name, matrix, (cmap, norm) in zip(axes, names, maps, norms):
        images.append(ax.imshow(matrix, origin="lower", aspect="auto", cmap=cmap, norm=norm, interpolation="nearest"))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("layer")
    if drift:
        figure.colorbar(images[0], ax=list(axes[: len(drift)]), label="edited − unedited (pp)")
    if selected:
        figure.colorbar(images[len(drift)], ax=list(axes[len(drift):]), label="prompts per edit")
    figure.suptitle(title)
    return figure


def save(figure: Figure, directory: Path, name: str) -> str:
    """Write `name`.png and `name`.svg into `directory`; return the PNG as base64, for embedding in the page."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    (directory / f"{name}.png").write_bytes(buffer.getvalue())
    figure.savefig(directory / f"{name}.svg", format="svg", metadata={"Date": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")
