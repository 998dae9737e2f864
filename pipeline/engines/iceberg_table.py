"""--table-format iceberg: the output is an Apache Iceberg table in a catalog (pyiceberg), and a
run's answers become one of its data files in one commit.

    -o nightly.answers --catalog local        the table `answers` of namespace `nightly`, in the
                                              catalog `local` as pyiceberg configures it
                                              (.pyiceberg.yaml, or PYICEBERG_CATALOG__LOCAL__URI=...)
    <warehouse>/.qa-batch/nightly.answers.partial/    the work directory of parts (resume.py)
    <table location>/data/date=.../part-<job id>-00000.parquet    this run's answers, registered

The table is created by the first run (identity-partitioned by the --partition keys). The
commit is one catalog transaction: with --partition it deletes that partition and registers
the new file (`add_files`: no row is rewritten), so a reader sees the old partition or the new
one; without, it only registers. Every snapshot of the commit carries `qa-batch.job-id` (and the
run summary), so a rerun after a kill at any point knows whether its job committed.
"""

from __future__ import annotations

import json
import os
import warnings

import pyarrow as pa

from .. import faults, storage
from ..errors import RuntimeFailure, UsageError
from .tables import schema_difference, table_schema

JOB_ID = "qa-batch.job-id"
SUMMARY = "qa-batch.summary"


def _catalog(name: str):
    try:
        from pyiceberg.catalog import load_catalog
    except ImportError:
        raise UsageError("--table-format iceberg needs pyiceberg: pip install 'qa-batch[iceberg]' (in a checkout: "
                         "pip install -e '.[iceberg]')") from None
    try:
        return load_catalog(name)
    except Exception as e:  # noqa: BLE001 - pyiceberg raises many kinds for a missing or broken catalog
        raise UsageError(f"--catalog {name}: {e}. Configure it as pyiceberg does: ~/.pyiceberg.yaml, or "
                         f"PYICEBERG_CATALOG__{name.upper()}__URI (and __WAREHOUSE) in the environment") from None


def identifier(output: str) -> tuple[str, str]:
    """-o namespace.table -> (namespace, table)."""
    namespace, dot, table = output.rpartition(".")
    if not dot or not namespace or not table or "/" in output:
        raise UsageError(f"-o {output}: with --table-format iceberg, name the table as NAMESPACE.TABLE "
                         "(e.g. -o nightly.answers) in the catalog given by --catalog")
    return namespace, table


def _load(catalog, output: str):
    from pyiceberg.exceptions import NoSuchTableError

    try:
        return catalog.load_table(identifier(output))
    except NoSuchTableError:
        return None


def work_dir(catalog_name: str, output: str) -> str:
    """Where the parts wait: beside the table's data (the catalog's warehouse, or the table's location)."""
    catalog = _catalog(catalog_name)
    base = catalog.properties.get("warehouse")  # the same place before and after the table exists
    if not base:
        table = _load(catalog, output)
        base = table.location() if table is not None else None
    if not base:
        raise UsageError(f"--catalog {catalog_name} names no warehouse and the table {output} does not exist yet: "
                         "set the catalog's warehouse (PYICEBERG_CATALOG__<NAME>__WAREHOUSE)")
    base = base.removeprefix("file://")
    return storage.join(base, ".qa-batch", f"{output}.partial")


def _arrow(table) -> pa.Schema:
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    return schema_to_pyarrow(table.schema())


def check_table(catalog_name: str, output: str, file_schema: pa.Schema, partition: dict[str, str],
                schema_mode: str) -> None:
    """Before any model work: the table is absent (created by the commit) or has this run's
    partition keys and schema (with --schema-mode merge, one the run adds columns to)."""
    run = table_schema(file_schema, partition)
    identifier(output)
    table = _load(_catalog(catalog_name), output)
    if table is None:
        return
    have = [table.schema().find_field(f.source_id).name for f in table.spec().fields]
    if have != list(partition):
        raise UsageError(f"the Iceberg table {output} is partitioned by {', '.join(have) or 'none'}, this run by "
                         f"{', '.join(partition) or 'none'}: give --partition for exactly its partition columns")
    differences = schema_difference(_arrow(table), run)
    if differences and (schema_mode != "merge" or any(not d.startswith("new column") for d in differences)):
        raise UsageError(f"the Iceberg table {output} has another schema than this run's output: "
                         + "; ".join(differences) + ". Rerun with the options that made the table"
                         + (", or pass --schema-mode merge to add the new columns" if schema_mode != "merge" else
                            " (--schema-mode merge adds new columns only)"))


def committed(catalog_name: str, output: str, job_id: str | None) -> bool:
    if job_id is None:
        return False
    table = _load(_catalog(catalog_name), output)
    return table is not None and any((s.summary.additional_properties if s.summary else {}).get(JOB_ID) == job_id
                                     for s in table.snapshots())


def summary_of(catalog_name: str, output: str, job_id: str) -> dict:
    table = _load(_catalog(catalog_name), output)
    for s in table.snapshots() if table is not None else []:
        props = s.summary.additional_properties if s.summary else {}
        if props.get(JOB_ID) == job_id and SUMMARY in props:
            return json.loads(props[SUMMARY])
    raise RuntimeFailure(f"the Iceberg table {output} names job {job_id} as committed but no snapshot holds its summary")


def commit(catalog_name: str, output: str, paths: list[str], file_schema: pa.Schema, partition: dict[str, str],
           job_id: str, summary: dict, schema_mode: str) -> None:
    """Create the table on its first run, copy the files the run wrote (partition columns included)
    into its data folder, and register them in one transaction, replacing the partition."""
    from pyiceberg.expressions import And, EqualTo

    schema = table_schema(file_schema, partition)
    catalog = _catalog(catalog_name)
    namespace, _ = identifier(output)
    faults.point("table_committing")
    try:
        table = _load(catalog, output)
        if table is None:
            catalog.create_namespace_if_not_exists(namespace)
            table = catalog.create_table(identifier(output), schema=schema)
            if partition:
                with table.update_spec() as spec:
                    for key in partition:
                        spec.add_identity(key)
                table = catalog.load_table(identifier(output))
        elif schema_mode == "merge" and schema_difference(_arrow(table), schema):
            with table.update_schema() as update:
                update.union_by_name(schema)
            table = catalog.load_table(identifier(output))
        location = table.location().removeprefix("file://")
        uris = []
        for i, path in enumerate(paths):
            target = storage.join(location, "data", *(f"{k}={v}" for k, v in partition.items()),
                                  f"part-{job_id}-{i:05d}.parquet")
            storage.make_dirs(storage.parent(target))
            storage.copy(path, target)
            uris.append(target if storage.is_uri(target) else "file://" + os.path.abspath(target))
        properties = {JOB_ID: job_id, SUMMARY: json.dumps(summary, sort_keys=True)}
        with table.transaction() as tx, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Delete operation did not match any records")  # a first night
            if partition:
                conditions = [EqualTo(k, v) for k, v in partition.items()]
                where = conditions[0] if len(conditions) == 1 else And(*conditions)
                tx.delete(where, snapshot_properties=properties)
            tx.add_files(uris, snapshot_properties=properties, check_duplicate_files=False)
    except OSError as e:
        raise RuntimeFailure(f"could not commit to the Iceberg table {output}: {e}. The answers are kept: rerun the "
                             "same command to commit them") from None
    faults.point("table_committed")


class IcebergTarget:
    """--table-format iceberg as the engines use it (tables.TableTarget)."""

    partition_in_files = True  # add_files reads a file's partition from its columns

    def __init__(self, catalog: str, output: str):
        self.catalog, self.output = catalog, output

    def check(self, file_schema: pa.Schema, partition: dict[str, str], schema_mode: str) -> None:
        check_table(self.catalog, self.output, file_schema, partition, schema_mode)

    def committed(self, job_id: str | None) -> bool:
        return committed(self.catalog, self.output, job_id)

    def summary_of(self, job_id: str) -> dict:
        return summary_of(self.catalog, self.output, job_id)

    def assembly_path(self, work_dir: str, partition: dict[str, str], job_id: str) -> str:
        """In the work directory: the commit copies it into the table's data folder."""
        return storage.join(work_dir, "answers.parquet")

    def commit(self, files: list[tuple[str, int]], file_schema: pa.Schema, partition: dict[str, str], job_id: str,
               summary: dict, schema_mode: str) -> None:
        commit(self.catalog, self.output, [path for path, _ in files], file_schema, partition, job_id, summary,
               schema_mode)
