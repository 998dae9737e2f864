"""What the table formats share (--table-format delta, iceberg): the one interface the engines
use (`TableTarget`, made by `job.table_target`), the partition a run writes, the table's columns, and
how a table's schema differs from a run's output.

A run writes its answers as Parquet files, then one commit registers them in the table:

    check(file_schema, partition, schema_mode)   before any model work: refused (exit 2) if it cannot fit
    assembly_path(work_dir, partition, job_id)   where the local engine assembles its one file
    commit(files, ...)                           the files (anywhere) placed in the table and registered
    committed(job_id), summary_of(job_id)        what a rerun reads: did this job commit, with what summary
"""

from __future__ import annotations

import re
from typing import Protocol

import pyarrow as pa

from ..errors import UsageError

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TableTarget(Protocol):
    partition_in_files: bool  # Iceberg reads a file's partition from its columns; Delta from its log

    def check(self, file_schema: pa.Schema, partition: dict[str, str], schema_mode: str) -> None: ...

    def committed(self, job_id: str | None) -> bool: ...

    def summary_of(self, job_id: str) -> dict: ...

    def assembly_path(self, work_dir: str, partition: dict[str, str], job_id: str) -> str: ...

    def commit(self, files: list[tuple[str, int]], file_schema: pa.Schema, partition: dict[str, str], job_id: str,
               summary: dict, schema_mode: str) -> None: ...


def parse_partition(values: tuple[str, ...]) -> dict[str, str]:
    """--partition date=2026-12-01 (repeatable) -> {"date": "2026-12-01"}, in the order given."""
    out: dict[str, str] = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not _KEY.match(key) or not value:
            raise UsageError(f"--partition {v!r}: expected KEY=VALUE with a column name as KEY (e.g. "
                             "--partition date=2026-12-01)")
        if key in out:
            raise UsageError(f"--partition {key} is given twice: give each partition column once")
        if "/" in value or value in (".", ".."):
            raise UsageError(f"--partition {v!r}: a partition value cannot hold '/'")
        out[key] = value
    return out


def logical(t: pa.DataType) -> str:
    """A type as Delta stores it: the Arrow string and binary encodings are one type there."""
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{logical(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(f"{f.name}: {logical(f.type)}" for f in t) + ">"
    return str(t)


def table_schema(file_schema: pa.Schema, partition: dict[str, str]) -> pa.Schema:
    """The table's columns: the output's, then the partition columns (strings)."""
    clash = [k for k in partition if k in file_schema.names]
    if clash:
        raise UsageError(f"--partition {clash[0]}: the output has a column {clash[0]!r} of its own; name the "
                         "partition column otherwise")
    return pa.schema([*file_schema, *(pa.field(k, pa.string()) for k in partition)])


def schema_difference(table: pa.Schema, run: pa.Schema) -> list[str]:
    """What differs, column by column: missing, new, or of another type."""
    out = []
    have = {f.name: f for f in table}
    for f in run:
        if f.name not in have:
            out.append(f"new column {f.name} ({logical(f.type)})")
        elif logical(have[f.name].type) != logical(f.type):
            out.append(f"column {f.name} is {logical(have[f.name].type)} in the table, {logical(f.type)} here")
    out += [f"column {name} of the table is not in this run's output" for name in have if name not in run.names]
    return out
