"""Errors that end a run, each with the exit code the CLI returns for it."""

from __future__ import annotations

from .counts import Count

EXIT_OK = 0
EXIT_USAGE = 2  # bad options, bad input, model not found
EXIT_RUNTIME = 3  # the model or the device failed while running
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # SIGTERM


class QaBatchError(Exception):
    """An error with a message meant for the user and an exit code."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(QaBatchError):
    """Bad options, unreadable or malformed input, a model that cannot be loaded."""

    exit_code = EXIT_USAGE


class RuntimeFailure(QaBatchError):
    """The model or the device failed during the run."""

    exit_code = EXIT_RUNTIME


class Interrupted(Exception):
    """The run stopped on request after keeping every finished window; rerun to resume."""

    def __init__(self, done: Count, work_dir: str):
        super().__init__(f"stopped after {done}")
        self.done = done  # every answer kept, earlier runs' included
        self.work_dir = work_dir
