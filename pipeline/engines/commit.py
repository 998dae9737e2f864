"""Committing a directory output (--engine ray): every file in place first, `_SUCCESS` last.

    <output>.partial/                         the staging directory of one job
        manifest.json                         the job (resume.py): inputs, model, options, job id
        files/                                what becomes the output
            part-000000000000-000000000016.parquet     rows [0, 16), each written whole
            ...
            _SUCCESS                          once every row is there: the run summary as JSON

`publish` makes `files/` the output, the way Spark and Hadoop commit a job:

- local disks and HDFS rename a directory in one step: the output appears at once, its
  `_SUCCESS` included. An older output (--overwrite) is first renamed aside, to
  `.<name>.replaced` beside it, and deleted once the new one is in place.
- object stores cannot rename a directory (it is a prefix of many objects), so the older
  output's `_SUCCESS` is deleted first, the files are copied in (server-side), files of the
  older output that the new one lacks are deleted, and `_SUCCESS` is written last.

On every filesystem a reader, an Airflow sensor or a cron job waits for `<output>/_SUCCESS`;
until it exists the directory is not an output. Every step can be repeated: a run killed
while publishing publishes again when rerun.
"""

from __future__ import annotations

import json

from .. import faults, storage

SUCCESS = "_SUCCESS"


def marker(directory: str) -> str:
    return storage.join(directory, SUCCESS)


def read_success(directory: str) -> dict | None:
    """The JSON in `directory`/_SUCCESS, or None when there is none (or not ours)."""
    try:
        data = json.loads(storage.read_bytes(marker(directory)))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_file_atomic(path: str, data: bytes) -> None:
    """Write under a hidden temporary name (readers skip `.` files), then move into place."""
    tmp = storage.join(storage.parent(path), f".{storage.basename(path)}.inprogress")
    storage.write_bytes(tmp, data)
    storage.sync(tmp)
    storage.move(tmp, path)


def write_success(directory: str, content: dict) -> None:
    write_file_atomic(marker(directory), json.dumps(content, indent=1, sort_keys=True).encode())
    faults.record("success_written", storage.basename(directory))


def aside_path(output: str) -> str:
    """Where an older output waits while the new one is renamed into place."""
    return storage.join(storage.parent(output), f".{storage.basename(output)}.replaced")


def clean_up(output: str) -> None:
    """What a publish killed between its last two steps leaves: the older output, set aside."""
    if storage.renames_dirs(output):
        storage.delete(aside_path(output))


def publish(files: str, output: str) -> None:
    """Make the directory `files` (its `_SUCCESS` written) the output; see the module docstring."""
    if storage.renames_dirs(output):
        aside = aside_path(output)
        storage.delete(aside)  # left by a run killed between the two renames
        if storage.exists(output):
            storage.move(output, aside)
            faults.point("publishing")
        storage.move(files, output)
        faults.point("replaced")
        storage.delete(aside)
        return
    if storage.is_file(output):  # an older output that is one object (a local-engine file)
        storage.delete_file(output)
    if storage.exists(marker(output)):
        storage.delete_file(marker(output))  # from now on the older output is not a finished one
    names = {storage.relative(files, f) for f in storage.list_files(files)}
    for name in sorted(names - {SUCCESS}):
        storage.copy(storage.join(files, name), storage.join(output, name))
        faults.point("publishing")
    if storage.is_dir(output):
        for f in storage.list_files(output):
            if storage.relative(output, f) not in names:
                storage.delete_file(f)
    storage.copy(marker(files), marker(output))
