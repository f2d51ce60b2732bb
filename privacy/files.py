"""Writing a record so that a crash never leaves half of it: ledgers, privacy records, run records, reports."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, private: bool = False) -> None:
    """Write `path` so that a reader sees the old file or the new one, never part of one: a temp file in the
    same folder, flushed to disk, then renamed over the target. Creates parent folders.

    private: owner-only (0600) from the moment the file exists, for a data owner's ledger and privacy records;
    otherwise the usual umask permissions, so that records and reports stay readable by others.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    # A unique temp name: two writers of the same file must not share (and rename) one temp file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
