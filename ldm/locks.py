"""One writer per output: a lock file naming its holder (pid, host, start time, command).

``output_lock(folder)`` creates ``<folder>/<name>`` exclusively (``O_CREAT | O_EXCL``: of two processes racing,
exactly one wins), holds it while the block runs and removes it after. A second writer is refused with the
holder named. A lock left by a process that died (same host, pid no longer running) is taken over with a
warning; a lock from another host cannot be checked and is never taken over.

Why a file and not ``fcntl.flock``: the holder must be named in the message, the lock must survive the
process only when it crashed (so the next run can say what happened), and shared filesystems (NFS) honour
``O_EXCL`` where advisory locks often do nothing.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class LockError(RuntimeError):
    """Another process is writing this output."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # being written this instant, or damaged: treated as held by an unknown process


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process (the lock file is empty or unreadable)"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command', '?')})")


def _try_create(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return True


@contextmanager
def output_lock(folder: str | os.PathLike, name: str = LOCK_NAME, what: str = "this output") -> Iterator[Path]:
    """Hold ``<folder>/<name>`` for the block; ``LockError`` naming the holder if another live process has it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    if not _try_create(path, record):
        holder = _holder(path)
        stale = holder.get("host") == record["host"] and isinstance(holder.get("pid"), int) \
            and not _alive(holder["pid"])
        if not stale:
            raise LockError(f"{folder} is being written ({what}) by {_describe(holder)}; wait for it to finish or "
                            f"use another output folder. If that process is gone for good, delete {path}")
        log.warning("taking over the lock %s of %s, which is no longer running (it was interrupted)",
                    path, _describe(holder))
        path.unlink(missing_ok=True)
        if not _try_create(path, record):  # another process took it over first
            raise LockError(f"{folder} is being written ({what}) by {_describe(_holder(path))}")
    try:
        yield path
    finally:
        if _holder(path).get("pid") == record["pid"]:
            path.unlink(missing_ok=True)
