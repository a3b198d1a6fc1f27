"""Atomic files and folders: a reader sees the old version or the complete new one, never a mix."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from vlaug.cache.layout import TMP_MARKER
from vlaug.errors import UsageError


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename ``tmp_path`` onto ``path``.

    A crash at any moment leaves either the old file or the new one, never a mix; the
    temporary file of an interrupted write is recognisable by its ``.tmp-`` marker.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary folder beside ``path``; when the block succeeds, rename it onto
    ``path`` (replacing an existing folder), and when it fails, delete it. Readers see the
    old folder or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f"{path.name}{TMP_MARKER}old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(file: Path, error: type[Exception], hint: str = "") -> dict:
    """Parse a JSON file that must hold an object; a bad file raises ``error`` naming it."""
    try:
        d = json.loads(Path(file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{str(file)!r} is not valid JSON ({e}){hint}") from None
    if not isinstance(d, dict):
        raise error(f"{str(file)!r} must hold a JSON object{hint}")
    return d


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))


def check_output(path: str | os.PathLike, overwrite: bool, is_ours: Callable[[Path], bool], what: str,
                 option: str = "--out") -> Path:
    """Refuse to write ``what`` over an existing ``path`` unless ``overwrite``, and never over
    something that ``is_ours`` does not recognise (a vlaug output of the same kind).

    Raises:
        UsageError: naming the path and the fix.
    """
    if not str(path):
        raise UsageError(f"{option} is required: the {what} to write.")
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{option} {str(path)!r} already exists. Pass --overwrite to replace it, or choose another {option}.")
    if path.exists() and not is_ours(path):
        raise UsageError(f"{option} {str(path)!r} exists and is not a {what}; refusing to replace it. Choose another {option}.")
    return path
