"""Tables as LaTeX (booktabs), for a paper: each mean and its 95 % CI in one cell, `$m \\pm c$`."""
from __future__ import annotations

import pandas as pd

CI_SUFFIX = " ci95"  # a column `<name> ci95` holds the CI half-widths of column `<name>`
SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
           "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
           # in LaTeX's default font encoding (OT1) these print as ¡, ¿ and —
           "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


def escape(text: str) -> str:
    """`text` as LaTeX typesets it literally."""
    return "".join(SPECIAL.get(char, char) for char in text)


def latex_table(table: pd.DataFrame, title: str, formats: dict[str, str] | None = None) -> str:
    """A booktabs `tabular` of `table` under `title` (comment lines), its columns in order but each `<name> ci95`
    merged into `<name>`'s cells (a comment line then says what `m \\pm c` is). Numbers are formatted with
    `formats[column]` (default `g`: as the Markdown tables show them) in math mode; text is escaped; a missing value
    is an empty cell."""
    formats = formats or {}
    columns = [c for c in table.columns if not (c.endswith(CI_SUFFIX) and c.removesuffix(CI_SUFFIX) in table.columns)]

    def number(value, column: str) -> str | None:
        if value is None or isinstance(value, str) or pd.isna(value):
            return None
        shown = format(value, formats.get(column, "d" if isinstance(value, int) else "g"))
        return _math(shown.removeprefix("-") if float(shown) == 0 else shown)  # -0.001 as 0.00, not -0.00

    def cell(row: pd.Series, column: str) -> str:
        value = row[column]
        if isinstance(value, (str, bool)):  # True/False as the Markdown tables show them, not 1/0
            return escape(str(value))
        shown = number(value, column)
        if shown is None:
            return ""
        ci = number(row[column + CI_SUFFIX], column) if column + CI_SUFFIX in table.columns else None
        return f"${shown} \\pm {ci}$" if ci is not None else f"${shown}$"

    plain = _plain(table)
    # right-aligned: a column of numbers, blanks aside (settings the unedited rows lack make an object column)
    numeric = [_numbers(plain[c]) if not plain[c].map(_missing).all() else
               pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c]) for c in columns]
    key = ["% $m \\pm c$: a mean m and the half-width c of its 95 % CI"] if len(columns) < len(table.columns) else []
    lines = [*(f"% {line}" for line in title.splitlines() or [""]), *key, "% needs \\usepackage{booktabs}",
             f"\\begin{{tabular}}{{{''.join('r' if is_number else 'l' for is_number in numeric)}}}", r"\toprule",
             " & ".join(escape(str(c)) for c in columns) + r" \\", r"\midrule"]
    lines += [" & ".join(cell(row, c) for c in columns) + r" \\" for _, row in plain.iterrows()]
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"


def _plain(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with numpy scalars as Python ones (an integer column's cells as int, so they print without a point),
    its columns kept as objects: a table of numbers only would otherwise hand each row over as floats."""
    return table.astype(object).map(lambda v: v.item() if hasattr(v, "item") and not isinstance(v, str) else v
                                    ).astype(object)


def _missing(value) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def _numbers(column: pd.Series) -> bool:
    """Whether every value of `column` (of `_plain`'s) is a number or missing; True/False and text are not numbers."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in column if not _missing(v))


def _math(shown: str) -> str:
    """A formatted number as math: 1e-05 as 1 \\times 10^{-5} (not 1e − 05), inf as \\infty."""
    mantissa, e, exponent = shown.partition("e")
    if e:
        return f"{mantissa} \\times 10^{{{int(exponent)}}}"
    return shown.replace("inf", "\\infty")
