"""The report's single HTML page: plots embedded as base64 PNG, tables inline, no script, nothing fetched."""
from __future__ import annotations

import html

import pandas as pd

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1320px;
       padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-bottom: 0.3em; }
p.meta, figcaption, p.note { color: #555; font-size: 0.9em; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.scroll { overflow-x: auto; margin-bottom: 1.5em; }
table.data { border-collapse: collapse; font-size: 0.8em; font-variant-numeric: tabular-nums; }
table.data th, table.data td { border-bottom: 1px solid #e4e4e4; padding: 0.25em 0.6em; text-align: right;
                               vertical-align: top; max-width: 28em; }
table.data th { background: #f5f5f5; position: sticky; top: 0; }
table.data tbody tr:hover { background: #fafafa; }
nav a { margin-right: 1.2em; }
.side-by-side { display: flex; flex-wrap: wrap; gap: 0 2em; align-items: flex-start; }
"""


def _number(value: float) -> str:
    """A table's float (pandas writes a missing one as its `na_rep`, never through here)."""
    if value.is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


def table_html(frame: pd.DataFrame) -> str:
    """A DataFrame as an HTML table (values escaped; a named index as the first column), in a box that scrolls
    sideways when wide."""
    shown = frame.reset_index() if frame.index.name else frame
    body = shown.to_html(index=False, border=0, classes="data", na_rep="–", float_format=_number, escape=True)
    return f'<div class="scroll">{body}</div>'


def figure_html(png_base64: str, name: str, caption: str, data_files: list[str]) -> str:
    """An embedded plot with its caption and links to its PNG, SVG and data files (beside the page)."""
    files = [f"{name}.png", f"{name}.svg", *data_files]
    links = " · ".join(f'<a href="{html.escape(f)}">{html.escape(f)}</a>' for f in files)
    return (f'<figure><img src="data:image/png;base64,{png_base64}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}<br>files: {links}</figcaption></figure>")


def side_by_side(parts: list[str]) -> str:
    """Figures next to each other while the page is wide enough, wrapping onto new lines after."""
    return '<div class="side-by-side">' + "\n".join(parts) + "</div>"


def paragraph(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def subsection(title: str, parts: list[str]) -> str:
    return f"<h3>{html.escape(title)}</h3>\n" + "\n".join(parts)


def page(title: str, subtitle: str, sections: list[tuple[str, str, list[str]]]) -> str:
    """The whole document; `sections` are (anchor, heading, html parts), listed in a table of contents."""
    nav = " ".join(f'<a href="#{anchor}">{html.escape(heading)}</a>' for anchor, heading, _ in sections)
    body = "\n".join(f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>\n' + "\n".join(parts) + "\n</section>"
                     for anchor, heading, parts in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f'<p class="meta">{html.escape(subtitle)}</p>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n')
