"""Durable file writes shared by every layer: whole-file replace and directory fsync.

Why one module: snapshots, spools, model artifacts, reports and replay outputs all need
the same guarantee (a reader sees the old file or the new one, never half, and a crash
after the call returns loses nothing). `features` is the bottom layer of the project, so
every other package may import this without pointing a dependency the wrong way.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Persist a rename in `directory` (best effort: not every platform opens a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush an already written file's bytes to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb",
                encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on success fsync it and move it into
    place (then fsync the directory). On any error the target is untouched and the
    temporary file is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically and durably."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically and durably."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
