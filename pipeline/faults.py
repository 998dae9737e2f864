"""Crash points for the resume tests.

With QA_BATCH_CRASH_AT=NAME:N in the environment the process kills itself with SIGKILL the
N-th time it passes `point(NAME)`: a real, unannounced death at a chosen moment (reading,
mid-batch, while writing a part, during the final rename). Unset, `point` does nothing.
"""

from __future__ import annotations

import os
import signal
import threading

_target = os.environ.get("QA_BATCH_CRASH_AT")
_once = os.environ.get("QA_BATCH_CRASH_ONCE")  # NAME:MARKER_FILE, for workers that get restarted
_seen: dict[str, int] = {}
_lock = threading.Lock()


def point(name: str) -> None:
    if _target is None:
        return
    with _lock:
        _seen[name] = _seen.get(name, 0) + 1
        if _target == f"{name}:{_seen[name]}":
            os.kill(os.getpid(), signal.SIGKILL)


def once(name: str) -> None:
    """Die at `name` the first time any process of the job gets there (a marker file records it)."""
    if _once is None or not _once.startswith(name + ":"):
        return
    marker = _once.split(":", 1)[1]
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
