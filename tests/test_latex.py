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
        "% $m \\pm c$: a mean m and the half-width c of its 95 % CI",
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


def test_a_table_of_numbers_only_keeps_its_integers_integers():
    """pandas hands each row of an all-number table over as floats: the count must still print with `d`."""
    assert "\n$1234567$ & $0.5$ \\\\\n" in latex_table(pd.DataFrame({"n_obs": [1234567], "ES": [0.5]}), "t")


def test_a_swept_true_false_setting_reads_true_and_false_as_in_the_markdown_table():
    """A bool is an int to Python: it printed as $1$ and $0$. The unedited rows have no such setting (blank)."""
    table = pd.DataFrame({"editor.mom2_adjustment": [None, True, False], "ES": [1.0, 2.0, 3.0]})
    assert latex_table(table, "t").splitlines()[2:] == [
        "\\begin{tabular}{lr}", "\\toprule", "editor.mom2\\_adjustment & ES \\\\", "\\midrule",
        " & $1$ \\\\", "True & $2$ \\\\", "False & $3$ \\\\", "\\bottomrule", "\\end{tabular}"]


def test_a_settings_column_of_numbers_with_blanks_is_right_aligned_as_numbers():
    """The unedited rows lack γ, so pandas keeps the column as objects; its cells are numbers all the same."""
    table = pd.DataFrame({"sadr.lambda": [None, 0.0, 0.001], "run": ["u", "a", "b"]}, dtype=object)
    assert table["sadr.lambda"].dtype == object
    assert "\\begin{tabular}{rl}\n" in latex_table(table, "t")
    blank = pd.DataFrame({"text": [None, None], "number": [math.nan, math.nan]})  # no value: aligned by dtype
    assert "\\begin{tabular}{lr}\n" in latex_table(blank, "t")


def test_g_notation_and_infinity_are_typeset_as_math_not_as_letters():
    """format(1e-05, "g") is 1e-05, which math mode typesets as 1e − 05 (e a variable, minus a binary operator)."""
    table = pd.DataFrame({"v_lr": [1e-05, 2.5e12, math.inf, -math.inf, 0.5]})
    assert latex_table(table, "t").splitlines()[6:11] == [
        "$1 \\times 10^{-5}$ \\\\", "$2.5 \\times 10^{12}$ \\\\", "$\\infty$ \\\\", "$-\\infty$ \\\\", "$0.5$ \\\\"]


def test_every_line_of_a_title_is_a_comment():
    """A title with a line break (a setting's value in `sadr compare`'s title, say) must not put its second line
    into the document, nor text after a carriage return."""
    lines = latex_table(pd.DataFrame({"a": [1]}), "one\ntwo 50%\r\nthree\rfour").splitlines()
    assert lines[:5] == ["% one", "% two 50%", "% three", "% four", "% needs \\usepackage{booktabs}"]
    assert latex_table(pd.DataFrame({"a": [1]}), "").startswith("% \n% needs")  # an empty title: an empty comment


def test_angle_brackets_and_bars_are_typeset_as_themselves_in_the_default_font_encoding():
    """With only \\usepackage{booktabs} (OT1 fonts), a bare <|endoftext|> is typeset as ¡—endoftext—¿."""
    assert escape("<|endoftext|>") == r"\textless{}\textbar{}endoftext\textbar{}\textgreater{}"


def test_a_value_that_rounds_to_zero_is_typeset_without_a_minus_sign():
    """-0.001 to 2 decimals is -0.00 by Python's format; a table in a paper says 0.00. A negative value shown stays."""
    table = pd.DataFrame({"Drift": [-0.001, -0.0, -0.006], "Drift ci95": [0.5, 0.5, 0.5], "v": [-0.0, -0.004, 0.0]})
    assert latex_table(table, "t", {"Drift": ".2f"}).splitlines()[7:10] == [
        "$0.00 \\pm 0.50$ & $0$ \\\\", "$0.00 \\pm 0.50$ & $-0.004$ \\\\", "$-0.01 \\pm 0.50$ & $0$ \\\\"]
