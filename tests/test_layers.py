"""The packages' layers, read from the source (every import, at module level or inside a function): data flows
one way, so a lower package never imports a higher one, and the two apps talk only through Flower messages.

    privacy, models                 pure math and the model zoo
    common                          what both apps need (config, data, training, codecs)
    client | server                 the two apps: neither imports the other
    simulations                     engines and the commands that launch things
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the fedpriv packages it must never import
FORBIDDEN = {
    "privacy": {"models", "common", "client", "server", "simulations"},
    "models": {"common", "client", "server", "simulations"},
    "common": {"client", "server", "simulations"},
    "client": {"server", "simulations"},
    "server": {"client", "simulations"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it_or_the_other_app(package: str) -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for name, line in sorted(imported_packages(path)) if name in FORBIDDEN[package]]
    assert not wrong, "\n".join(wrong)


def test_privacy_is_pure_math_without_flower() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line}" for path in sorted((ROOT / "privacy").rglob("*.py"))
             for name, line in imported_packages(path) if name == "flwr"]
    assert not wrong, wrong


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("import os\n\ndef f():\n    from server.rounds import exchange\n    import client.app\n")
    assert imported_packages(source) == {("os", 1), ("server", 4), ("client", 5)}
