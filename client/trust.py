"""Which code may touch a data owner's data: this machine's installed fedpriv ClientApp, and nothing else.

A deployment's server ships an app bundle (FAB) with every run, and Flower's default executor runs the
ClientApp in it. fedpriv's promise, "the budget is enforced by the data owner", holds only if the code that
enforces it is the owner's, so `fedpriv client` runs its own installed ClientApp and accepts a run only when
the bundle asks for exactly that app: the same app id (publisher/name), the same version, the same ClientApp
reference, and the same source for every package the ClientApp runs (a content hash). A bundle that differs
in any of these is refused with a reply that says why; the client's own code never changes.

Flower 1.41's SuperNode `--trusted-entities` was considered: it checks a publisher's signature over the
bundle, which says who built the code, not that it is the code this machine vetted, and it still runs the
bundle's code. Comparing against the installed package needs no key management and decides on the code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

# The packages a ClientApp process imports: what decides what happens to the data and to the budget.
CLIENT_PACKAGES = ("client", "common", "models", "privacy")
APP_ID = "fedpriv/fedpriv"
CLIENTAPP_REF = "client.app:app"
# Files Flower leaves out of a bundle (flwr.common.constant.FAB_EXCLUDE_PATTERNS): skipped on both sides.
_SKIPPED = ("*_test.py", "test_*.py")


def installed_version() -> str:
    try:
        return importlib.metadata.version("fedpriv")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _digest(files: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def _kept(name: str) -> bool:
    parts = name.split("/")
    return (len(parts) > 1 and parts[0] in CLIENT_PACKAGES and name.endswith(".py")
            and "__pycache__" not in parts and not any(fnmatch(parts[-1], p) for p in _SKIPPED))


def installed_sources() -> dict[str, bytes]:
    """The installed ClientApp packages' .py files, by bundle path (e.g. 'client/app.py')."""
    files: dict[str, bytes] = {}
    for package in CLIENT_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {package!r} is not importable; reinstall fedpriv")
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in root.rglob("*.py"):
            name = f"{package}/{path.relative_to(root).as_posix()}"
            if _kept(name):
                files[name] = path.read_bytes()
    return files


@dataclass(frozen=True)
class TrustedApp:
    """What this data owner runs: its installed fedpriv, as a bundle would describe it."""

    app_id: str
    version: str
    sources: Mapping[str, bytes]

    @property
    def digest(self) -> str:
        return _digest(self.sources)

    @classmethod
    def installed(cls) -> TrustedApp:
        return cls(APP_ID, installed_version(), installed_sources())

    def describe(self) -> str:
        return f"{self.app_id} {self.version}, client code {self.digest[:12]}"


def check_bundle(fab: bytes, trusted: TrustedApp) -> str | None:
    """None when the bundle asks for exactly the trusted app; otherwise why not, in one line."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            contents = {n: archive.read(n) for n in archive.namelist() if not n.endswith("/")}
    except (zipfile.BadZipFile, OSError, ValueError):
        return "the app bundle is not a readable FAB"
    try:
        app = tomllib.loads(contents.get("pyproject.toml", b"").decode())
        project, flwr_app = app["project"], app["tool"]["flwr"]["app"]
        app_id = f"{flwr_app['publisher']}/{project['name']}"
        version, ref = str(project["version"]), str(flwr_app["components"]["clientapp"])
    except (KeyError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "the app bundle has no readable pyproject.toml naming its app and ClientApp"
    shipped = f"{app_id} {version}"
    if app_id != trusted.app_id:
        return f"it ships app {shipped}, not {trusted.app_id}"
    if version != trusted.version:
        return f"it ships {shipped}, this client runs {trusted.version}"
    if ref != CLIENTAPP_REF:
        return f"it names ClientApp {ref!r}, not {CLIENTAPP_REF!r}"
    sources = {n: data for n, data in contents.items() if _kept(n)}
    if sources != dict(trusted.sources):
        changed = sorted(n for n in set(sources) | set(trusted.sources)
                         if sources.get(n) != trusted.sources.get(n))
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        return (f"its client code {_digest(sources)[:12]} differs from this machine's ({', '.join(changed[:3])}"
                f"{more})")
    return None


def refusal_line(client_id: str, run_id: int | str, reason: str, trusted: TrustedApp) -> str:
    return (f"REFUSED run {run_id}: {reason}; this client runs only its installed {trusted.describe()}. "
            "Run the server with the same fedpriv, or start this client with --allow-server-code")
