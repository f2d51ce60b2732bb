"""Paths a user names (a flag or a run-config key), checked before anything starts: one line naming the flag,
the path and the fix, instead of a traceback halfway through a run. Used by every command, hence here, in the
lowest layer that has ConfigError.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.config import ConfigError


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_dir(path: str | Path, flag: str) -> Path:
    """A folder this command will create or write into: not a file, under no file, writable."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file, not a folder; give a folder (it is created if missing)")
    existing = _nearest_existing(out)
    if not existing.is_dir():
        raise ConfigError(f"{flag} {out}: {existing} is a file, so no folder can be made there; give another "
                          "path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: {existing} is not writable by this user; give a folder you can write")
    return out


def input_file(path: str | Path, flag: str, what: str = "file") -> Path:
    """A file this command reads: there, and a file."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; give the {what} itself")
    if not p.exists():
        raise ConfigError(f"{flag} {p} does not exist; check the path")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{flag} {p} is not readable by this user; check its permissions")
    return p


def input_dir(path: str | Path, flag: str, what: str = "folder") -> Path:
    """A folder this command reads: there, and a folder."""
    p = Path(path).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is a file; give the {what}")
    if not p.exists():
        raise ConfigError(f"{flag} {p} does not exist; give the {what}")
    return p
