"""Documents as one list of blocks, rendered twice: Markdown (figures as PNG files beside it) and a
self-contained HTML page (figures embedded as base64 PNG), so both always say the same thing.

Shared by the privacy report (privacy/report.py) and the comparison and sweep reports (simulations/).
Figures are drawn on a bare matplotlib Figure with the Agg canvas: no pyplot, hence no global backend state.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privacy.files import write_atomic

__all__ = ["Block", "Bullets", "Code", "Figure", "FigureRow", "Heading", "Para", "Table", "figures_of", "new_axes",
           "png_bytes", "to_html", "to_markdown", "write_documents"]


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    warning: bool = False  # each item is marked WARNING (bold in Markdown, red in HTML)


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Figure:
    filename: str  # the PNG written beside the Markdown file
    caption: str
    png: bytes


@dataclass(frozen=True)
class FigureRow:
    """Figures shown side by side, captions listed below them in Markdown."""

    figures: tuple[Figure, ...]


Block = Heading | Para | Bullets | Table | Code | Figure | FigureRow

# Values from records (setting names, paths, commands) must not turn into Markdown structure: links, HTML,
# table cells, code. Underscores stay: inside words they never start emphasis, and names like num_clients
# must read as written in the raw file.
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|])")


def _md(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {_md(b.text)}")
        elif isinstance(b, Para):
            out.append(_md(b.text))
        elif isinstance(b, Bullets):
            prefix = "**WARNING** " if b.warning else ""
            out.append("\n".join(f"- {prefix}{_md(item)}" for item in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(map(_md, b.headers)) + " |", "|" + "---|" * len(b.headers)]
            lines += ["| " + " | ".join(map(_md, row)) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Code):
            longest = max((len(m) for m in re.findall(r"`+", b.text)), default=0)
            fence = "`" * max(3, longest + 1)
            out.append(f"{fence}\n{b.text}\n{fence}")
        elif isinstance(b, Figure):
            out.append(f"![{_md(b.caption)}]({b.filename})\n\n*{_md(b.caption)}*")
        else:
            # Images on one line so that renderers show them side by side.
            out.append(" ".join(f"![{_md(f.caption)}]({f.filename})" for f in b.figures))
            out.append("\n".join(f"- {_md(f.caption)} ({_md(f.filename)})" for f in b.figures))
    return "\n\n".join(out) + "\n"


_STYLE = """
body { font-family: sans-serif; max-width: 72em; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #aaa; padding: 0.2em 0.55em; text-align: left; vertical-align: top; }
th { background: #eee; }
pre { background: #f4f4f4; padding: 0.8em; overflow-x: auto; }
ul.warnings li { color: #8a1c00; }
.figrow { display: flex; flex-wrap: wrap; gap: 1em; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
.figrow figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #333; max-width: 36em; }
"""


def _figure_html(f: Figure) -> str:
    e = html.escape
    data = base64.b64encode(f.png).decode("ascii")
    return (f'<figure><img alt="{e(f.caption)}" data-file="{e(f.filename)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(f.caption)}</figcaption></figure>")


def to_html(blocks: Sequence[Block], title: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{_STYLE}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Bullets):
            cls = ' class="warnings"' if b.warning else ""
            prefix = "<strong>WARNING</strong> " if b.warning else ""
            out.append(f"<ul{cls}>" + "".join(f"<li>{prefix}{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Code):
            out.append(f"<pre><code>{e(b.text)}</code></pre>")
        elif isinstance(b, Figure):
            out.append(_figure_html(b))
        else:
            out.append('<div class="figrow">' + "".join(map(_figure_html, b.figures)) + "</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def figures_of(blocks: Sequence[Block]) -> list[Figure]:
    found: list[Figure] = []
    for b in blocks:
        if isinstance(b, Figure):
            found.append(b)
        elif isinstance(b, FigureRow):
            found.extend(b.figures)
    return found


def write_documents(folder: Path, stem: str, blocks: Sequence[Block], title: str) -> tuple[Path, Path]:
    """Write folder/stem.md, folder/stem.html and every figure's PNG; returns (md, html)."""
    for figure in figures_of(blocks):
        write_atomic(folder / figure.filename, figure.png)
    md, page = folder / f"{stem}.md", folder / f"{stem}.html"
    write_atomic(md, to_markdown(blocks).encode("utf-8"))
    write_atomic(page, to_html(blocks, title).encode("utf-8"))
    return md, page


def new_axes(title: str, xlabel: str, ylabel: str, size: tuple[float, float] = (6.0, 4.0)) -> tuple[Any, Any]:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=size, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def png_bytes(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no 'Software' stamp: same records, same bytes
    return buffer.getvalue()
