"""Reports of a grid as one list of blocks, rendered twice: Markdown (figures as PNG files beside it) and a
self-contained HTML page (figures embedded as base64 PNG), so both say the same thing. Figures are drawn on a
bare matplotlib Figure with the Agg canvas (no pyplot, hence no global backend state), as the privacy report
does.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Figure:
    filename: str  # the PNG written beside the Markdown file
    caption: str
    png: bytes


Block = Heading | Para | Bullets | Table | Figure

_MD_ESCAPE = re.compile(r"([\\`*_\[\]<>|])")


def _md(text: str) -> str:
    # Values from records (setting names, paths) must not turn into Markdown structure.
    return _MD_ESCAPE.sub(r"\\\1", " ".join(str(text).splitlines()))


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {_md(b.text)}")
        elif isinstance(b, Para):
            out.append(_md(b.text))
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {_md(item)}" for item in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(map(_md, b.headers)) + " |", "|" + "---|" * len(b.headers)]
            lines += ["| " + " | ".join(map(_md, row)) + " |" for row in b.rows]
            out.append("\n".join(lines))
        else:
            out.append(f"![{_md(b.caption)}]({b.filename})\n\n*{_md(b.caption)}*")
    return "\n\n".join(out) + "\n"


_STYLE = """
body { font-family: sans-serif; max-width: 72em; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #aaa; padding: 0.2em 0.55em; text-align: left; }
th { background: #eee; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #333; max-width: 36em; }
"""


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
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f'<figure><img alt="{e(b.caption)}" data-file="{e(b.filename)}" '
                       f'src="data:image/png;base64,{data}"><figcaption>{e(b.caption)}</figcaption></figure>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_documents(folder: Path, stem: str, blocks: Sequence[Block], title: str) -> tuple[Path, Path]:
    """Write folder/stem.md, folder/stem.html and every figure's PNG; returns (md, html)."""
    for b in blocks:
        if isinstance(b, Figure):
            write_atomic(folder / b.filename, b.png)
    md, page = folder / f"{stem}.md", folder / f"{stem}.html"
    write_atomic(md, to_markdown(blocks).encode("utf-8"))
    write_atomic(page, to_html(blocks, title).encode("utf-8"))
    return md, page


def write_atomic(path: Path, data: bytes) -> None:
    # A report cut off halfway must not look complete.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
    fig.savefig(buffer, format="png", metadata={"Software": None})  # same records, same bytes
    return buffer.getvalue()
