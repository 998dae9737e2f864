"""Resumable output: finished windows become part files in a work directory beside the output.

    answers.parquet.partial/
        manifest.json              job id, inputs (path, size, mtime), model, answer-changing options
                                   (a calibration by the digest of its parameters)
        part-000000000000.parquet  rows [0, n), each part written to a .tmp file and renamed
        part-000000001024.parquet  ...

A run that dies leaves whole parts only, one per window of --rows-per-window rows.
Rerunning the same command checks the manifest and answers only the windows no part
holds (several worker processes may have left gaps); windows keep the same boundaries
(multiples of --rows-per-window), so batches and answers are exactly those of an
uninterrupted run. At the end the parts are copied into one file that replaces the
output in one move, and the work directory is removed. The output may be a local path
or a URI (s3://...): everything here goes through storage.py.

A finished job is recognised by its output, not by a marker: the output's metadata carries
the job id of the manifest that produced it. A run killed after the move but before the
work directory was gone finds its own output in place (same job: nothing left to do);
a run of another job finds leftovers of a finished one (removed, then it starts afresh);
an older output from another job never passes for this job's.
"""

from __future__ import annotations

import json
import re
import uuid
from enum import Enum
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from .. import faults, storage
from ..errors import RuntimeFailure, UsageError
from ..stages.read import InputPlan
from ..stages.shape import OutputShape
from ..stages.write import read_metadata
from . import commit

MANIFEST = "manifest.json"
_PART = re.compile(r"^part-(\d{12})\.parquet$")


def work_dir_for(output: str) -> str:
    return storage.with_suffix(output, ".partial")


QUESTIONS = "(question list)"  # the inputs' entry for --questions/--question: the questions themselves


def input_fingerprint(plan: InputPlan) -> list[dict]:
    """What identifies the inputs: their paths, sizes and modification times; and the question
    list asked of every row, by its content."""
    out = []
    for path in plan.files:
        st = storage.info(path)
        out.append({"path": storage.identity(path), "size": st.size, "mtime_ns": st.mtime_ns})
    if plan.questions is not None:
        out.append({"path": QUESTIONS, "questions": list(plan.questions.questions),
                    "fields": None if plan.questions.fields is None else list(plan.questions.fields)})
    return out


def describe_difference(old: dict, new: dict) -> str:
    """Name what differs between two manifests, most telling first."""
    if old.get("inputs") != new.get("inputs"):
        before = {i["path"]: i for i in old.get("inputs", [])}
        after = {i["path"]: i for i in new.get("inputs", [])}
        for path in sorted(set(before) | set(after)):
            if path == QUESTIONS:
                if before.get(path) != after.get(path):
                    return ("the questions asked of every row (--questions, --question) differ from the "
                            "interrupted run's")
                continue
            if path not in after:
                return f"input {path} was part of the interrupted run but is not given now"
            if path not in before:
                return f"input {path} was not part of the interrupted run"
            if before[path] != after[path]:
                return f"input {path} changed since the interrupted run (size or modification time)"
        return "the inputs are given in another order"
    if old.get("model") != new.get("model"):
        return f"the model differs: {old.get('model')} then, {new.get('model')} now"
    if old.get("versions") != new.get("versions"):
        if "versions" not in old:
            return "the interrupted run was made by an older qa-batch that did not record its versions"
        then, now = old["versions"], new.get("versions", {})
        changed = [f"{k} {then.get(k)} then, {now.get(k)} now" for k in sorted(set(then) | set(now))
                   if then.get(k) != now.get(k)]
        return "what computes the answers changed since the interrupted run: " + "; ".join(changed)
    for key in sorted(set(old.get("options", {})) | set(new.get("options", {}))):
        a, b = old.get("options", {}).get(key), new.get("options", {}).get(key)
        if a != b:
            if key == "calibration" and isinstance(a, dict) and isinstance(b, dict) and a["path"] == b["path"]:
                return f"the calibration {b['path']} was refitted since the interrupted run (its parameters differ)"
            if key == "calibration" and isinstance(a, str):  # earlier manifests named it by its path only
                return (f"the interrupted run applied the calibration {a} but did not record its parameters "
                        "(an older qa-batch), so they cannot be checked")
            return f"option {key} differs: {a!r} then, {b!r} now"
    return "the output schema differs"


def output_job_id(output: str) -> str | None:
    """The job id a finished qa-batch output carries: a file's metadata, or a directory's
    `_SUCCESS` (--engine ray). None for anything else (not there, unfinished, not ours)."""
    try:
        if storage.is_file(output):
            return read_metadata(output).get("job_id")
        return (commit.read_success(output) or {}).get("job_id")
    except (OSError, ValueError, KeyError, pa.ArrowInvalid):  # not a qa-batch output: not ours
        return None


def _is_output_of(manifest: dict | None, output: str) -> bool:
    """Does `output` carry the job id of `manifest` (the output that job wrote)? Tables answer
    through WorkDir.open's `committed`."""
    return manifest is not None and manifest.get("job_id") is not None and output_job_id(output) == manifest["job_id"]


def readable(path: str) -> bool:
    """Can a Parquet file's footer be read? A part cut short (a power loss before its bytes
    reached the disk) cannot: it is treated as missing and its rows are answered again."""
    try:
        fs, inner = storage.locate(path)
        pq.read_metadata(inner, filesystem=fs)
        return True
    except pa.ArrowInvalid:  # the file's bytes are wrong; a failed read (OSError) is raised, deletes nothing
        return False


class Opened(Enum):
    """What a run found in the work directory."""

    NEW = "new"  # nothing of this job: every row is to answer
    RESUMED = "resumed"  # parts of this job, interrupted: answer the rest
    FINISHED = "finished"  # this job's output is already in place: only the clean-up was left


class WorkDir:
    """The parts of one output, finished so far."""

    def __init__(self, path: str):
        self.path = path
        self.job_id: str | None = None  # set once the work directory is opened

    def _file(self, name: str) -> str:
        return storage.join(self.path, name)

    @property
    def exists(self) -> bool:
        return storage.is_file(self._file(MANIFEST))

    def _manifest(self) -> dict | None:
        """The manifest, or None when there is none or one cut short by a crash (not a job to
        resume). Any other read error is raised: a failed read must never pass for 'no job here',
        which would delete the parts."""
        try:
            return json.loads(storage.read_bytes(self._file(MANIFEST)))
        except FileNotFoundError:
            return None
        except ValueError:
            return None

    def wrote(self, output: str) -> bool:
        """Is `output` the finished output of the job this work directory holds?"""
        return _is_output_of(self._manifest(), output)

    def open(self, manifest: dict, restart: bool, output: str, overwrite: bool = True,
             committed: Callable[[str | None], bool] | None = None) -> Opened:
        """Start a new work directory, or take over the old one if it holds the same job. A new
        one is not started over an existing output unless `overwrite` (leftovers of a finished
        job are removed first: they are nobody's work)."""
        manifest = json.loads(json.dumps(manifest))  # compare as stored (tuples become lists)
        old = None if restart else self._manifest()
        if old is not None:
            same = {k: v for k, v in old.items() if k != "job_id"} == manifest
            # the old job's output is in place (or, for a catalog table, `committed` says it committed)
            finished = committed(old.get("job_id")) if committed is not None else _is_output_of(old, output)
            if same and finished:
                self.job_id = old["job_id"]
                return Opened.FINISHED
            if same:
                self.job_id = old["job_id"]
                for name in self._names():  # a part whose move never happened
                    if name.endswith(".tmp"):
                        storage.delete_file(self._file(name))
                for _, part in self.parts():
                    if not readable(part):
                        storage.delete_file(part)
                return Opened.RESUMED
            if not finished:
                raise UsageError(
                    f"{self.path} holds the parts of an interrupted run that differs from this one: "
                    f"{describe_difference(old, manifest)}. Rerun the original command to finish it, "
                    "or pass --restart to discard its parts.")
            # else: the leftovers of another job that finished (its clean-up was cut short)
        storage.delete(self.path)
        if not overwrite and storage.exists(output):  # not ours to replace: refused before anything is made
            raise UsageError(f"output {output} exists: pass --overwrite to replace it, or choose another path with -o")
        storage.make_dirs(self.path)
        self.job_id = uuid.uuid4().hex
        storage.write_bytes_atomic(self._file(MANIFEST),
                                   json.dumps({**manifest, "job_id": self.job_id}, indent=1, sort_keys=True).encode())
        return Opened.NEW

    def open_for(self, manifest: dict, output: str, restart: bool, overwrite: bool,
                 committed: Callable[[str | None], bool] | None = None) -> Opened:
        """What a run does with this work directory and its output path, decided in one place
        for both engines (README: "What a rerun does"):

            work directory holds     output                     the run
            this job                 carries this job's id      FINISHED: only the clean-up is left
            this job                 anything else              RESUMED: answers the rows no part holds
            another job, unfinished  any                        refused (exit 2): rerun it, or --restart
            another job, finished,   exists (not this job's)    refused (exit 2) unless --overwrite
              or nothing             absent, or --overwrite     NEW
        """
        return self.open(manifest, restart, output, overwrite, committed)

    def _names(self) -> list[str]:
        return [storage.basename(f) for f in storage.list_files(self.path)] if storage.is_dir(self.path) else []

    def parts(self) -> list[tuple[int, str]]:
        """(first row, path) of every finished part, in row order."""
        found = []
        for name in self._names():
            m = _PART.match(name)
            if m:
                found.append((int(m.group(1)), self._file(name)))
        return sorted(found)

    def todo(self, total_rows: int, rows_per_window: int) -> list[tuple[int, int]]:
        """The row ranges [start, end) no part holds yet, as runs of whole windows."""
        done = {first for first, _ in self.parts()}
        ranges: list[tuple[int, int]] = []
        for start in range(0, total_rows, rows_per_window):
            if start in done:
                continue
            end = min(start + rows_per_window, total_rows)
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        return ranges

    def write_part(self, first_row: int, table: pa.Table) -> None:
        path = self._file(f"part-{first_row:012d}.parquet")
        try:
            tmp = storage.with_suffix(path, ".tmp")
            fs, inner = storage.locate(tmp)
            pq.write_table(table, inner, compression="zstd", filesystem=fs)
            storage.sync(tmp)
            faults.point("part_written")
            storage.move(tmp, path)
        except OSError as e:
            raise RuntimeFailure(
                f"could not write {path}: {e.strerror or e}. The finished parts are kept: "
                "fix the cause (disk space, permissions) and rerun the same command to resume") from None

    def assemble(self, output: str, shape: OutputShape, metadata_for: Callable[[dict], bytes]) -> dict:
        """Copy the parts, in order, into `output` (atomically); the caller removes the work directory.

        `metadata_for(counts)` gives the file's qa_batch metadata from the counts over all
        parts (rows, chunks, answered, errors; with documents also theirs), which are also
        returned; it must carry this work directory's job id (see `wrote`). Parts hold the
        windows' tables; `shape` makes them the output's (pivoted, or reduced by document).
        """
        tmp = storage.join(storage.parent(output), f".{storage.basename(output)}.assembling.tmp")
        counts = {"rows": 0, "chunks": 0, "answered": 0, "errors": 0}

        def parts():
            for _, path in self.parts():
                try:
                    table = storage.read_table(path, schema=shape.window_schema)
                except pa.ArrowInvalid:  # cut short (a power loss): its rows are answered again
                    storage.delete_file(path)
                    raise RuntimeFailure(f"the part {path} could not be read and was deleted: rerun the same "
                                         "command to answer its rows again") from None
                for key, n in shape.count(table).items():
                    counts[key] += n
                yield table
                faults.point("assembling")

        try:
            fs, inner = storage.locate(tmp)
            with pq.ParquetWriter(inner, shape.schema, compression="zstd", filesystem=fs) as writer:
                written = 0
                for table in shape.assemble(parts(), counts):
                    writer.write_table(table)
                    written += table.num_rows
                counts["output_rows"] = written
                writer.add_key_value_metadata({"qa_batch": metadata_for(counts)})
            storage.sync(tmp)
        except OSError as e:
            if storage.exists(tmp):
                storage.delete_file(tmp)
            raise RuntimeFailure(
                f"could not write {output}: {e.strerror or e}. The finished parts in {self.path} are "
                "kept: fix the cause and rerun the same command to resume") from None
        faults.point("renaming")
        storage.move(tmp, output)  # from here the output carries this job's id: a rerun only cleans up
        return counts

    def remove(self) -> None:
        """Delete the work directory, its manifest last: cut short, it still names its job."""
        for name in self._names():
            if name != MANIFEST:
                storage.delete_file(self._file(name))
        storage.delete(self.path)
