"""Run the vlaug CLI with a crash injected inside a cache write, for the reliability suite.

    python -m tests.fault_injection KIND:N embed SOURCE --out FEATURES ...

The process SIGKILLs itself on its N-th rename of a ``KIND`` file: ``part`` (a file of
``images/``) or ``manifest`` (``manifest.json``). :func:`vlaug.cache.files.atomic_write`
renames a file into place right after writing and fsyncing it under a temporary name, so
the kill lands at the worst moment for a crash. Production code has no hook for this: the
rename is wrapped here, in the child process only.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from vlaug.cache.layout import IMAGES_DIR, MANIFEST_NAME


def _kind(path) -> str:
    path = Path(path)
    return "manifest" if path.name == MANIFEST_NAME else "part" if path.parent.name == IMAGES_DIR else "other"


def kill_on_rename(fault: str) -> None:
    """Make this process SIGKILL itself before its N-th ``os.replace`` onto a file of the
    kind that ``fault`` (``"part:N"`` or ``"manifest:N"``) names."""
    want, _, n = fault.partition(":")
    n = int(n or 1)
    seen = 0
    replace = os.replace

    def replace_or_die(src, dst, *args, **kwargs):
        nonlocal seen
        if _kind(dst) == want:
            seen += 1
            if seen == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)

    os.replace = replace_or_die


if __name__ == "__main__":
    kill_on_rename(sys.argv[1])
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    from vlaug.cli import main

    main()
