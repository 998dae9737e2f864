"""Crash points for the resume tests.

With QA_BATCH_CRASH_AT=NAME:N in the environment the process kills itself with SIGKILL the
N-th time it passes `point(NAME)`: a real, unannounced death at a chosen moment (reading,
mid-batch, while writing a part, during the final rename). Unset, `point` does nothing.

QA_BATCH_OOM_ABOVE=N makes every forward of more than N chunks raise CUDA's out-of-memory
error, so the split-and-retry path runs on the CPU too. Two more, for the Ray engine's tests: QA_BATCH_TRACE=FILE makes `record` append a line per
event (which shard an actor started, which it wrote), so a test can count the work done
across processes; QA_BATCH_LOSE_AT=NAME makes `lose(NAME, path)` delete a file, as a write
that went missing would.
"""

from __future__ import annotations

import os
import signal
import threading

_target = os.environ.get("QA_BATCH_CRASH_AT")
_once = os.environ.get("QA_BATCH_CRASH_ONCE")  # NAME:MARKER_FILE, for workers that get restarted
_trace = os.environ.get("QA_BATCH_TRACE")
_lose = os.environ.get("QA_BATCH_LOSE_AT")
_oom_above = os.environ.get("QA_BATCH_OOM_ABOVE")
_pause = os.environ.get("QA_BATCH_PAUSE_AT")
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


def record(event: str, detail: str) -> None:
    """Append `event detail` to the QA_BATCH_TRACE file (one short write: whole lines)."""
    if _trace is None:
        return
    fd = os.open(_trace, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{event} {detail}\n".encode())
    finally:
        os.close(fd)


def lose(name: str, path: str) -> bool:
    """Delete `path` at `name` when QA_BATCH_LOSE_AT=NAME (local paths only); True if it did."""
    if _lose == name and os.path.exists(path):
        os.remove(path)
        return True
    return False


def out_of_memory(rows: int) -> bool:
    """True when QA_BATCH_OOM_ABOVE=N and a forward of more than N chunks is to run out of memory:
    the engines' out-of-memory path, on any device and in any process (Ray actors included)."""
    return _oom_above is not None and rows > int(_oom_above)


def pause(name: str) -> None:
    """Wait at `name` when QA_BATCH_PAUSE_AT=NAME (a minute) or NAME:SECONDS: a test's window to act
    while the process is at that point (a second signal while a stop is under way, a signal while
    windows remain)."""
    if _pause is not None and _pause.split(":")[0] == name:
        import time

        time.sleep(float(_pause.split(":")[1]) if ":" in _pause else 60)
