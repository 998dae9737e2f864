"""--table-format delta: the output is a Delta Lake table, and a run's answers become its data
files in one commit.

    <table>/                                  the Delta table (-o), created by the first run
        _delta_log/                           its transaction log
        date=2026-12-01/                      a partition (--partition date=2026-12-01)
            part-<job id>-00000.parquet       this run's answers: written by the assembly, then registered
    <table>.partial/                          the work directory of parts, as for a Parquet output

The commit is one Delta transaction (delta-rs, the `deltalake` package) that registers the
file the run wrote (no row is copied again): with --partition it replaces that partition
(Delta's predicate overwrite, `replaceWhere`: a reader sees the old partition or the new one,
never both, never neither); without, it appends. The transaction carries the app id
`qa-batch-<job id>` (Delta's idempotent transactions, the `txn` action), so a rerun after a
kill at any point knows whether its job committed: before the commit, it writes the file again
under the same name (a file no commit names is invisible to readers) and commits; after it,
only the clean-up is left. The commit's custom metadata holds the job id and the run summary.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from .. import faults, storage
from ..errors import RuntimeFailure, UsageError
from .tables import schema_difference, table_schema

APP = "qa-batch-"  # + job id: the Delta app id of a job's commit


def _deltalake():
    try:
        import deltalake
    except ImportError:
        raise UsageError("--table-format delta needs the deltalake package: pip install 'qa-batch[delta]' "
                         "(in a checkout: pip install -e '.[delta]')") from None
    return deltalake


def is_table(uri: str) -> bool:
    return storage.is_dir(storage.join(uri, "_delta_log"))


def _options(uri: str) -> dict[str, str] | None:
    """delta-rs storage options for an object store: the S3 endpoint the rest of qa-batch uses
    (AWS_ENDPOINT_URL_S3), plain HTTP allowed when it says so; credentials from AWS_* as usual."""
    import os

    if not uri.startswith(("s3://", "s3a://")):
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options = {"conditional_put": "etag"}  # S3's conditional writes: no external lock needed for the log
    if endpoint:
        options["endpoint_url"] = endpoint
        options["allow_http"] = str(endpoint.startswith("http://")).lower()
    return options


def _open(uri: str):
    return _deltalake().DeltaTable(uri, storage_options=_options(uri))


def check_table(uri: str, file_schema: pa.Schema, partition: dict[str, str], schema_mode: str) -> None:
    """Before any model work: `uri` is absent (created by the commit) or a Delta table with this
    run's partition columns and schema (or, with --schema-mode merge, one the run adds columns to)."""
    run = table_schema(file_schema, partition)
    try:
        if storage.exists(uri) and not is_table(uri):
            raise UsageError(f"output {uri} exists and is not a Delta table (no _delta_log): choose another "
                             "path with -o, or drop --table-format delta to write a Parquet file")
        if not storage.exists(uri):
            return
        table = _open(uri)
    except OSError as e:
        raise UsageError(f"output {uri} cannot be checked: {e}") from None
    columns = list(table.metadata().partition_columns)
    if columns != list(partition):
        have = ", ".join(columns) or "none"
        raise UsageError(f"the Delta table {uri} is partitioned by {have}, this run by "
                         f"{', '.join(partition) or 'none'}: give --partition for exactly its partition columns")
    differences = schema_difference(pa.schema(table.schema().to_arrow()), run)
    if differences and (schema_mode != "merge" or any(not d.startswith("new column") for d in differences)):
        raise UsageError(f"the Delta table {uri} has another schema than this run's output: "
                         + "; ".join(differences) + ". Rerun with the options that made the table"
                         + (", or pass --schema-mode merge to add the new columns" if schema_mode != "merge" else
                            " (--schema-mode merge adds new columns only)"))


def data_file(uri: str, partition: dict[str, str], job_id: str) -> str:
    """Where the assembly writes this job's answers: inside the table, in its partition's folder."""
    return storage.join(uri, *(f"{k}={v}" for k, v in partition.items()), f"part-{job_id}-00000.parquet")


def committed(uri: str, job_id: str | None) -> bool:
    """Has the job with this id committed to the table at `uri`?"""
    if job_id is None or not is_table(uri):
        return False
    return _open(uri).transaction_version(APP + job_id) is not None


def place(uri: str, partition: dict[str, str], name: str) -> str:
    """Where a file the run wrote elsewhere (a Ray shard) goes inside the table before its commit."""
    return storage.join(uri, *(f"{k}={v}" for k, v in partition.items()), name)


def commit(uri: str, files: list[tuple[str, int]], file_schema: pa.Schema, partition: dict[str, str], job_id: str,
           summary: dict, schema_mode: str) -> None:
    """Register `files` ((path, rows) each; one written elsewhere is copied into the table first) in
    one transaction: replacing the partition, or appending without one; creating the table on its
    first run."""
    dl = _deltalake()
    from deltalake.transaction import AddAction, create_table_with_add_actions

    adds = []
    for i, (path, rows) in enumerate(files):
        if not storage.within(path, uri):  # a file written elsewhere (a Ray shard): copied in first
            target = place(uri, partition, f"part-{job_id}-{i:05d}.parquet")
            storage.make_dirs(storage.parent(target))
            storage.copy(path, target)
            faults.point("publishing")
            path = target
        info = storage.info(path)
        adds.append(AddAction(storage.relative(uri, path), info.size, dict(partition),
                              info.mtime_ns // 1_000_000 or int(time.time() * 1000), True,
                              json.dumps({"numRecords": rows})))
    properties = dl.CommitProperties(
        custom_metadata={"qa_batch.job_id": job_id, "qa_batch.summary": json.dumps(summary, sort_keys=True)},
        app_transactions=[dl.Transaction(APP + job_id, 1)])
    schema = table_schema(file_schema, partition)
    faults.point("table_committing")
    try:
        if not is_table(uri):
            create_table_with_add_actions(uri, dl.Schema.from_arrow(schema), adds, mode="error",
                                          partition_by=list(partition) or None,
                                          storage_options=_options(uri), commit_properties=properties)
        else:
            table = _open(uri)
            if schema_mode == "merge":
                have = pa.schema(table.schema().to_arrow())  # its columns, then the new ones (check_table)
                schema = pa.schema([*have, *(f for f in schema if f.name not in have.names)])
            table.create_write_transaction(
                adds, mode="overwrite" if partition else "append", schema=schema,
                partition_by=list(partition) or None,
                partition_filters=[(k, "=", v) for k, v in partition.items()] or None, commit_properties=properties)
    except OSError as e:
        raise RuntimeFailure(f"could not commit to the Delta table {uri}: {e}. The answers are kept: rerun the "
                             "same command to commit them") from None
    faults.point("table_committed")


def summary_of(uri: str, job_id: str) -> dict:
    """The run summary the job's commit recorded."""
    for entry in _open(uri).history():
        if entry.get("qa_batch.job_id") == job_id:
            return json.loads(entry["qa_batch.summary"])
    raise RuntimeFailure(f"the Delta table {uri} names job {job_id} as committed but its commit was not found in "
                         "the table's history")


class DeltaTarget:
    """--table-format delta as the engines use it (tables.TableTarget)."""

    partition_in_files = False  # Delta keeps partition values in its log

    def __init__(self, uri: str):
        self.uri = uri

    def check(self, file_schema: pa.Schema, partition: dict[str, str], schema_mode: str) -> None:
        check_table(self.uri, file_schema, partition, schema_mode)

    def committed(self, job_id: str | None) -> bool:
        return committed(self.uri, job_id)

    def summary_of(self, job_id: str) -> dict:
        return summary_of(self.uri, job_id)

    def assembly_path(self, work_dir: str, partition: dict[str, str], job_id: str) -> str:
        """Inside the table, in its partition's folder: the commit registers it where it is."""
        return data_file(self.uri, partition, job_id)

    def commit(self, files: list[tuple[str, int]], file_schema: pa.Schema, partition: dict[str, str], job_id: str,
               summary: dict, schema_mode: str) -> None:
        commit(self.uri, files, file_schema, partition, job_id, summary, schema_mode)
