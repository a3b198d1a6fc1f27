"""The writer's lock: one ``vlaug embed`` process writes a cache at a time; a lock left by a
process that is gone is stale and taken over."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlaug.cache.layout import LOCK_NAME
from vlaug.cache.manifest import _now


def _lock_holder_alive(info: dict) -> bool:
    """True unless the lock's process is known to be gone (same host, no such pid)."""
    import socket

    if info.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes: assume it is alive
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def acquire_lock(path: str | os.PathLike) -> tuple[Path, bool]:
    """Create ``LOCK_NAME`` in the cache folder (exclusively). A lock left by a process
    that is gone (crash, SIGKILL) is stale and taken over.

    Returns:
        the lock file and whether a stale lock was replaced.

    Raises:
        CacheLockedError: a live process holds the lock.
    """
    import socket

    from vlaug.errors import CacheLockedError

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    stale = False
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            check_unlocked(folder)  # raises while the holder lives
            lock.unlink(missing_ok=True)  # stale (or unreadable: its writer died while creating it)
            stale = True
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}, f)
        return lock, stale
    raise CacheLockedError(f"could not take the lock {str(lock)!r}; another process keeps creating it.")


def check_unlocked(path: str | os.PathLike) -> None:
    """Raise CacheLockedError if a live process holds the cache's lock; return if there is
    no lock, or only a stale or unreadable one."""
    from vlaug.errors import CacheLockedError

    lock = Path(path) / LOCK_NAME
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if _lock_holder_alive(info):
        raise CacheLockedError(
            f"{str(path)!r} is being written by vlaug embed (pid {info.get('pid')} on {info.get('host')}, since "
            f"{info.get('started')}). Wait for it to finish; if that process no longer exists, delete {str(lock)!r}."
        )


def release_lock(lock: Path) -> None:
    lock.unlink(missing_ok=True)
