"""comparison.html opened in headless Chromium: its figures load and are drawn on the page.

Two checks: the DOM after load (every <img> decoded to its PNG's size), and a screenshot whose colour
pixels (matplotlib's lines; the page itself is black, grey and white) come from the figures: the same page
with the images removed has almost none.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simulations.compare import compare, load_compare_config

GRID = """
[compare]
seeds = [1]
partitions = ["iid", "dirichlet:0.5"]
target-epsilons = [30.0]
target-accuracy = 0.3

[run]
dataset = "digits"
model = "mlp"
num-clients = 3
num-rounds = 1
learning-rate = 0.1
"""
FIGURES = ("fig_accuracy_vs_work.png", "fig_accuracy_vs_epsilon.png", "fig_accuracy_vs_alpha.png",
           "fig_client_spread.png")
WINDOW = (1400, 4000)


def chromium() -> str:
    """The browser, installed with apt-get when missing and we are root; skip only if that is impossible."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=900)
        found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed and could not be installed (needs root and apt-get); "
                    "run `make browser` or `apt-get install -y chromium`")
    return found


def browse(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}", *extra, page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        if tag == "img":
            self.images.append(dict(attrs))


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("html")
    (folder / "grid.toml").write_text(GRID)
    result = compare(load_compare_config(path=folder / "grid.toml"), folder / "out", echo=lambda _: None)
    return result.files["html"]


def test_html_embeds_every_figure_as_its_png(comparison):
    parser = Images()
    parser.feed(comparison.read_text())
    assert [img["data-file"] for img in parser.images] == list(FIGURES)
    for img in parser.images:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,") and img["alt"]
        # Self-contained: the embedded bytes are exactly the PNG written beside the page.
        assert base64.b64decode(src.split(",", 1)[1]) == (comparison.parent / img["data-file"]).read_bytes()


def test_browser_decodes_every_figure(comparison, tmp_path):
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load', () => { document.body.dataset.sizes = "
              "[...document.images].map(i => i.naturalWidth + 'x' + i.naturalHeight).join(' '); });</script>")
    probe.write_text(comparison.read_text().replace("</body>", script + "</body>"))
    dom = browse(probe, tmp_path / "profile", "--dump-dom").stdout
    sizes = re.search(r'data-sizes="([^"]*)"', dom)
    assert sizes is not None, dom[-500:]
    expected = [Image.open(comparison.parent / name).size for name in FIGURES]
    assert sizes.group(1).split() == [f"{w}x{h}" for w, h in expected]


def colour_pixels(png: Path) -> int:
    """Pixels with a clear hue (matplotlib's tab10 lines and markers); text, tables and paper are grey."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def test_screenshot_shows_the_figures(comparison, tmp_path):
    shot = tmp_path / "page.png"
    browse(comparison, tmp_path / "profile", f"--screenshot={shot}")
    image = Image.open(shot)
    assert image.size == WINDOW
    without = tmp_path / "no-figures.html"
    without.write_text(re.sub(r"<img [^>]*>", "", comparison.read_text()))
    bare = tmp_path / "bare.png"
    browse(without, tmp_path / "profile2", f"--screenshot={bare}")
    # The figure area is drawn (thousands of coloured pixels), and that colour is the figures' alone.
    assert colour_pixels(shot) > 5000
    assert colour_pixels(bare) < 200
    # Not blank either: the figures add hundreds of rows of ink (axes, ticks, labels) to the page.
    assert ink_rows(shot) > ink_rows(bare) + 300


def ink_rows(png: Path) -> int:
    grey = np.asarray(Image.open(png).convert("L"))
    return int(((grey < 200).sum(axis=1) > 20).sum())
