"""``report.html``: the whole report in one self-contained file (plots embedded as PNG data URIs, no scripts, no
external links), to open in a browser or attach to an MLflow run."""
from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping, Sequence

from pipelines.evaluate.mistakes import Mistake, caption
from pipelines.evaluate.protocol import EvalReport
from pipelines.evaluate.render import Section, notes, sections, summary

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; white-space: nowrap; }
th { background: #f2f2f2; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
td:first-child { white-space: normal; min-width: 8em; max-width: 22em; }
tbody tr:nth-child(even) { background: #fafafa; }
.caption { color: #555; margin: 0.2em 0; } .wrap { overflow-x: auto; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; } img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; } .options td { text-align: left; white-space: normal; }
"""
NUMBER = re.compile(r"^(-|-?\d+(\.\d+)?|\[-?\d.*\])$")


def _td(text: str) -> str:
    numeric = NUMBER.match(text) is not None  # numbers (and intervals, "-" for undefined) line up on the right
    return f'<td class="n">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in rows)
    return f'<div class="wrap"><table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _section(s: Section) -> str:
    caption = f'<p class="caption">{html.escape(s.caption)}</p>' if s.caption else ""
    return f"<h2>{html.escape(s.title)}</h2>{caption}{_table(s.columns, s.rows)}"


def _figure(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(title, quote=True)}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def _options(options: Mapping[str, Mapping]) -> str:
    """The ``spai score`` options of each table, one column per table."""
    keys = list(dict.fromkeys(k for o in options.values() for k in o))
    rows = [[key, *(json.dumps(o[key]) if key in o else "" for o in options.values())] for key in keys]
    return _table(["option", *options], rows, "options") if rows else "<p>The tables carry no options column.</p>"


def _mistakes(mistakes: Sequence[Mistake], threshold: float) -> str:
    shown = "".join(_figure(m.title, m.png) if m.png is not None else
                    f"<p>{html.escape(m.title)}: not drawn, {html.escape(m.error or '')}</p>" for m in mistakes)
    return (f'<h2>Most confident mistakes</h2><p class="caption">{html.escape(caption(threshold))}</p>'
            + (shown or "<p>No mistakes at this threshold.</p>"))


def page(report: EvalReport, plots: Mapping[str, tuple[str, bytes]], mistakes: Sequence[Mistake] | None = None) -> str:
    """The HTML report; ``plots`` maps each plot's file name to its (title, PNG bytes); ``mistakes`` (drawn) get
    their section."""
    runs = f"{len(report.runs)} runs" if len(report.runs) > 1 else report.runs[0]
    parts = [f"<h1>SPAI evaluation: {html.escape(runs)}</h1>",
             "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in summary(report)) + "</ul>"]
    parts += [_section(s) for s in sections(report)]
    parts.append("<h2>Plots</h2>" + "".join(_figure(title, png) for title, png in plots.values()))
    if mistakes is not None:
        parts.append(_mistakes(mistakes, report.threshold))
    parts.append("<h2>Options of each run</h2>" + _options(report.options))
    left = notes(report)
    parts.append("<h2>Left out, and caveats</h2>" + ("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in left)
                                                     + "</ul>" if left else "<p>Nothing was left out.</p>"))
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>SPAI evaluation</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
