"""`latex_table`: what a paper's table is typeset from, checked against a table written out by hand."""
from __future__ import annotations

import math

import pandas as pd

from sadr.evaluation.latex import escape, latex_table


def test_a_table_with_means_cis_text_counts_and_gaps_is_typeset_as_written_by_hand():
    table = pd.DataFrame({
        "editor.name": ["rome", "memit_2"], "sadr.lambda": [0.0, 0.001], "n_obs": [128, 64],
        "DNS": [42.1875, math.nan], "DNS ci95": [8.589, math.nan], "Drift": [-0.0598, 1.5], "Drift ci95": [0.0919, math.nan],
        "score": [79.8856, 12.0], "p ci95": [0.5, 0.25],  # a CI column without its mean's column stays a column
    })
    expected = "\n".join([
        "% results ×100 of every run in /runs/a_b:",
        "% needs \\usepackage{booktabs}",
        "\\begin{tabular}{lrrrrrr}",
        "\\toprule",
        "editor.name & sadr.lambda & n\\_obs & DNS & Drift & score & p ci95 \\\\",
        "\\midrule",
        "rome & $0$ & $128$ & $42.19 \\pm 8.59$ & $-0.06 \\pm 0.09$ & $79.89$ & $0.5$ \\\\",
        "memit\\_2 & $0.001$ & $64$ &  & $1.50$ & $12.00$ & $0.25$ \\\\",
        "\\bottomrule",
        "\\end{tabular}",
        "",
    ])
    metrics = {column: ".2f" for column in ("DNS", "Drift", "score")}
    assert latex_table(table, "results ×100 of every run in /runs/a_b:", metrics) == expected


def test_every_character_latex_reserves_is_typeset_literally():
    assert escape(r"a_b & 50% #1 $x$ {y} ~z^2 \n") == (r"a\_b \& 50\% \#1 \$x\$ \{y\} \textasciitilde{}z"
                                                      r"\textasciicircum{}2 \textbackslash{}n")


def test_a_count_of_a_million_or_more_is_typeset_in_full_not_in_g_notation():
    """An integer cell prints with `d` (a numpy int64 made a Python int first): `g` would show 1234567 as
    1.23457e+06, six digits of a count."""
    assert "\na & $1234567$ \\\\\n" in latex_table(pd.DataFrame({"run": ["a"], "n_obs": [1234567]}), "t")
