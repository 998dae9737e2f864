"""Resumable output: finished windows become part files in a work directory beside the output.

    answers.parquet.partial/
        manifest.json              inputs (path, size, mtime), model, answer-changing options
        part-000000000000.parquet  rows [0, n), each part written to a .tmp file and renamed
        part-000000001024.parquet  ...
        assembled                  present once the output file is complete

A run that dies leaves whole parts only. Rerunning the same command checks the manifest,
skips the rows the parts hold and goes on from the first missing row; windows keep the
same boundaries (multiples of --rows-per-window), so batches and answers are exactly those
of an uninterrupted run. At the end the parts are copied into one file that replaces the
output in one rename, and the work directory is removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from . import faults
from .errors import RuntimeFailure, UsageError
from .read import InputPlan
from .write import count_answers

MANIFEST = "manifest.json"
ASSEMBLED = "assembled"
_PART = re.compile(r"^part-(\d{12})\.parquet$")


def work_dir_for(output: str) -> str:
    return output + ".partial"


def input_fingerprint(plan: InputPlan) -> list[dict]:
    """What identifies the inputs: their paths, sizes and modification times."""
    out = []
    for path in plan.files:
        st = os.stat(path)
        out.append({"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _describe_difference(old: dict, new: dict) -> str:
    """Name what differs between two manifests, most telling first."""
    if old.get("inputs") != new.get("inputs"):
        before = {i["path"]: i for i in old.get("inputs", [])}
        after = {i["path"]: i for i in new.get("inputs", [])}
        for path in sorted(set(before) | set(after)):
            if path not in after:
                return f"input {path} was part of the interrupted run but is not given now"
            if path not in before:
                return f"input {path} was not part of the interrupted run"
            if before[path] != after[path]:
                return f"input {path} changed since the interrupted run (size or modification time)"
        return "the inputs are given in another order"
    if old.get("model") != new.get("model"):
        return f"the model differs: {old.get('model')} then, {new.get('model')} now"
    for key in sorted(set(old.get("options", {})) | set(new.get("options", {}))):
        a, b = old.get("options", {}).get(key), new.get("options", {}).get(key)
        if a != b:
            return f"option {key} differs: {a!r} then, {b!r} now"
    return "the output schema differs"


class WorkDir:
    """The parts of one output, finished so far."""

    def __init__(self, path: str):
        self.path = path

    @property
    def exists(self) -> bool:
        return os.path.isfile(os.path.join(self.path, MANIFEST))

    @property
    def assembled(self) -> bool:
        return os.path.exists(os.path.join(self.path, ASSEMBLED))

    def check_or_create(self, manifest: dict, restart: bool) -> None:
        """Start a new work directory, or accept the old one if it is for the same job."""
        manifest = json.loads(json.dumps(manifest))  # compare as stored (tuples become lists)
        if restart and os.path.exists(self.path):
            shutil.rmtree(self.path)
        if self.exists:
            with open(os.path.join(self.path, MANIFEST)) as f:
                old = json.load(f)
            if old != manifest:
                raise UsageError(
                    f"{self.path} holds the parts of an interrupted run that differs from this one: "
                    f"{_describe_difference(old, manifest)}. Rerun the original command to finish it, "
                    "or pass --restart to discard its parts.")
            for name in os.listdir(self.path):  # a part whose rename never happened
                if name.endswith(".tmp"):
                    os.unlink(os.path.join(self.path, name))
            return
        if os.path.exists(self.path):
            shutil.rmtree(self.path)  # no manifest: a run that died before writing any part
        os.makedirs(self.path)
        _write_atomic(os.path.join(self.path, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())

    def parts(self) -> list[tuple[int, str]]:
        """(first row, path) of every finished part, in row order."""
        found = []
        for name in os.listdir(self.path):
            m = _PART.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self.path, name)))
        return sorted(found)

    def finished_rows(self) -> int:
        """Rows held by consecutive parts from row 0: where the run goes on."""
        row = 0
        for first, path in self.parts():
            if first != row:
                break
            row += pq.read_metadata(path).num_rows
        return row

    def write_part(self, first_row: int, table: pa.Table) -> None:
        path = os.path.join(self.path, f"part-{first_row:012d}.parquet")
        try:
            pq.write_table(table, path + ".tmp", compression="zstd")
            faults.point("part_written")
            os.replace(path + ".tmp", path)
        except OSError as e:
            raise RuntimeFailure(
                f"could not write {path}: {e.strerror or e}. The finished parts are kept: "
                "fix the cause (disk space, permissions) and rerun the same command to resume") from None

    def assemble(self, output: str, schema: pa.Schema, metadata_for: Callable[[dict], bytes]) -> dict:
        """Copy the parts, in order, into `output` (atomically), then remove the work directory.

        `metadata_for(counts)` gives the file's qa_batch metadata from the counts over all
        parts (rows, chunks, answered, errors), which are also returned.
        """
        tmp = os.path.join(os.path.dirname(os.path.abspath(output)), f".{os.path.basename(output)}.assembling.tmp")
        counts = {"rows": 0, "chunks": 0, "answered": 0, "errors": 0}
        try:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for i, (_, path) in enumerate(self.parts()):
                    table = pq.read_table(path, schema=schema)
                    writer.write_table(table)
                    for key, n in count_answers(table).items():
                        counts[key] += n
                    faults.point("assembling")
                writer.add_key_value_metadata({"qa_batch": metadata_for(counts)})
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise RuntimeFailure(
                f"could not write {output}: {e.strerror or e}. The finished parts in {self.path} are "
                "kept: fix the cause and rerun the same command to resume") from None
        # Once the marker exists the output is complete; a rerun only finishes the clean-up.
        _write_atomic(os.path.join(self.path, ASSEMBLED), b"")
        faults.point("renaming")
        os.replace(tmp, output)
        faults.point("cleaning_up")
        shutil.rmtree(self.path)
        return counts

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
