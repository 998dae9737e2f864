"""--table-format delta on a real Delta table (delta-rs): nightly partitions replaced idempotently.

Every run is the CLI as a subprocess; the table is read back as an analyst would, with polars
(`read_delta`) and DuckDB (over the table's Arrow dataset: DuckDB's own delta extension is
downloaded on first use, which this offline machine cannot do).
"""

from __future__ import annotations

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FAST, run_cli

deltalake = pytest.importorskip("deltalake")

def nightly(nights, table, night: str, date: str, *extra, env=None):
    return run_cli("run", nights["inputs"][night], "-o", table, "--model", nights["model"], "--table-format", "delta",
                   "--partition", f"date={date}", *FAST, *extra, env=env)


def rows_by_date(table) -> dict[str, int]:
    import polars as pl

    df = pl.read_delta(str(table))
    return dict(df.group_by("date").len().iter_rows()) if df.height else {}


def commits(table) -> list[str]:
    return [h["qa_batch.job_id"] for h in deltalake.DeltaTable(str(table)).history() if "qa_batch.job_id" in h]


def test_each_night_is_in_the_table_once_however_often_it_runs(nights, tmp_path):
    table = tmp_path / "answers"
    for night, date in (("monday", "2026-12-01"), ("tuesday", "2026-12-01"), ("monday", "2026-12-02")):
        r = nightly(nights, table, night, date)
        assert r.returncode == 0, r.stderr
    assert rows_by_date(table) == {"2026-12-01": 6, "2026-12-02": 4}
    assert len(commits(table)) == 3 and len(set(commits(table))) == 3  # a commit per run, each its job id
    assert not os.path.exists(str(table) + ".partial")
    # as an analyst reads it: DuckDB over the table's current files
    import duckdb

    dataset = deltalake.DeltaTable(str(table)).to_pyarrow_dataset()  # noqa: F841 (read by name below)
    counts = dict(duckdb.sql("select date, count(*) from dataset group by date").fetchall())
    assert counts == {"2026-12-01": 6, "2026-12-02": 4}
    # the summary of the run is in its commit, and the data file holds the usual metadata
    history = deltalake.DeltaTable(str(table)).history()
    summary = json.loads(history[0]["qa_batch.summary"])
    assert summary["rows"] == 4 and summary["output"] == str(table)
    files = deltalake.DeltaTable(str(table)).file_uris()
    meta = json.loads(pq.read_metadata(files[0]).metadata[b"qa_batch"])
    assert meta["options"]["table_format"] == "delta" and meta["job_id"] in commits(table)


POINTS = ["renaming:1", "table_committing:1", "table_committed:1", "cleaning_up:1"]  # every state of the commit


@pytest.mark.slow
def test_a_kill_at_any_point_of_the_commit_leaves_the_old_partition_or_the_new_and_the_rerun_the_new(
        nights, tmp_path):
    """One night rerun again and again, each rerun killed at another point of its commit, then rerun:
    the nights alternate (4 and 6 rows), so the partition's size says whose answers it holds."""
    table = tmp_path / "answers"
    assert nightly(nights, table, "monday", "2026-12-01").returncode == 0  # the night's first run: 4 rows
    held, runs = ("monday", 4), 1
    for point in POINTS:
        night, rows = ("tuesday", 6) if held[0] == "monday" else ("monday", 4)
        r = nightly(nights, table, night, "2026-12-01", env={"QA_BATCH_CRASH_AT": point})
        assert r.returncode == -9, point
        committed = point in ("table_committed:1", "cleaning_up:1")
        assert rows_by_date(table) == {"2026-12-01": rows if committed else held[1]}, point  # never both or neither
        r = nightly(nights, table, night, "2026-12-01", "--report", tmp_path / "report.json")
        assert r.returncode == 0, r.stderr
        runs += 1
        assert rows_by_date(table) == {"2026-12-01": rows}, point
        assert len(commits(table)) == runs, f"{point}: the rerun committed the job a second time"
        assert not os.path.exists(str(table) + ".partial")
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["rows"] == rows and report["output"] == str(table)
        held = (night, rows)


def test_a_run_of_another_schema_is_refused_unless_merged(nights, tmp_path):
    table = tmp_path / "answers"
    assert nightly(nights, table, "monday", "2026-12-01").returncode == 0
    r = nightly(nights, table, "tuesday", "2026-12-02", "--top-k", "2")
    assert r.returncode == 2
    assert "new column answers" in r.stderr and "--schema-mode merge" in r.stderr
    assert rows_by_date(table) == {"2026-12-01": 4}
    r = nightly(nights, table, "tuesday", "2026-12-02", "--top-k", "2", "--schema-mode", "merge")
    assert r.returncode == 0, r.stderr
    import polars as pl

    df = pl.read_delta(str(table))
    assert dict(df.group_by("date").len().iter_rows()) == {"2026-12-01": 4, "2026-12-02": 6}
    assert df.filter(pl.col("date") == "2026-12-01")["answers"].null_count() == 4
    assert df.filter(pl.col("date") == "2026-12-02")["answers"].null_count() == 0
    # a column the run lacks is a difference merge does not paper over
    r = nightly(nights, table, "tuesday", "2026-12-03")
    assert r.returncode == 2 and "column answers of the table is not in this run's output" in r.stderr


def test_without_a_partition_runs_append(nights, tmp_path):
    table = tmp_path / "answers"
    for night in ("monday", "tuesday"):
        r = run_cli("run", nights["inputs"][night], "-o", table, "--model", nights["model"], "--table-format",
                    "delta", *FAST)
        assert r.returncode == 0, r.stderr
    import polars as pl

    assert pl.read_delta(str(table)).height == 10


@pytest.mark.parametrize("options, match", [
    (dict(table_format="delta", partition=("date",)), "expected KEY=VALUE"),
    (dict(partition=("date=2026-12-01",)), "--partition needs a table: add --table-format delta or iceberg"),
    (dict(table_format="delta", overwrite=True), "--overwrite does not apply to a Delta table"),
    (dict(table_format="delta", partition=("question=x",)), "the output has a column 'question' of its own"),
    (dict(table_format="orc"), "expected parquet, delta or iceberg"),
])
def test_bad_table_options_are_refused_before_any_model_work(nights, tmp_path, options, match):
    from pipeline.config import RunConfig
    from pipeline.engines.job import Job
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(match)):
        job = Job.plan_for(RunConfig(inputs=(nights["inputs"]["monday"],), output=str(tmp_path / "t"),
                                     model=str(tmp_path / "no-model"), **options))
        job.check_output()


def test_the_cli_exits_2_on_a_bad_table_option(nights, tmp_path):
    r = run_cli("run", nights["inputs"]["monday"], "-o", tmp_path / "t", "--model", tmp_path / "no-model",
                "--table-format", "delta", "--overwrite")
    assert r.returncode == 2 and "--overwrite does not apply to a Delta table" in r.stderr


def test_a_folder_that_is_not_a_delta_table_is_refused(nights, tmp_path):
    folder = tmp_path / "answers"
    folder.mkdir()
    (folder / "mine.txt").write_text("not a table")
    r = nightly(nights, folder, "monday", "2026-12-01")
    assert r.returncode == 2 and "is not a Delta table" in r.stderr
    assert os.listdir(folder) == ["mine.txt"]


def test_a_table_partitioned_otherwise_is_refused(nights, tmp_path):
    table = tmp_path / "answers"
    assert nightly(nights, table, "monday", "2026-12-01").returncode == 0
    r = run_cli("run", nights["inputs"]["monday"], "-o", table, "--model", nights["model"], "--table-format", "delta",
                "--partition", "day=1", *FAST)
    assert r.returncode == 2 and "is partitioned by date, this run by day" in r.stderr


def test_documents_go_to_a_table_too(nights, tmp_path):
    table = tmp_path / "answers"
    src = tmp_path / "pages.parquet"
    pq.write_table(pa.table({"doc": ["a", "b", "a"], "passage": ["one two", "three four", "five six"]}), src)
    r = run_cli("run", src, "-o", table, "--model", nights["model"], "--table-format", "delta", "--partition",
                "date=2026-12-01", "--document-col", "doc", "--question", "which?", *FAST)
    assert r.returncode == 0, r.stderr
    import polars as pl

    df = pl.read_delta(str(table)).sort("doc")
    assert df["doc"].to_list() == ["a", "b"] and df["passages"].to_list() == [2, 1]


@pytest.mark.slow
def test_ray_commits_its_shards_to_the_table_once(nights, tmp_path, point="publishing:1"):
    """--engine ray: the shard files become the table's data files in one commit; killed while
    copying them in or after the commit, the rerun leaves the partition in the table once."""
    pytest.importorskip("ray")
    table = tmp_path / "answers"
    ray = ("--engine", "ray", "--num-gpus", "0", "--rows-per-batch", "2")
    assert nightly(nights, table, "monday", "2026-12-01").returncode == 0
    r = nightly(nights, table, "tuesday", "2026-12-01", *ray, env={"QA_BATCH_CRASH_AT": point})
    assert r.returncode == -9
    assert rows_by_date(table) == {"2026-12-01": 6 if point == "table_committed:1" else 4}
    r = nightly(nights, table, "tuesday", "2026-12-01", *ray)
    assert r.returncode == 0, r.stderr
    assert rows_by_date(table) == {"2026-12-01": 6} and len(commits(table)) == 2
    added = [f for f in deltalake.DeltaTable(str(table)).file_uris() if "2026-12-01" in f]
    assert len(added) == 3  # three shards of 2 rows, registered as they were written
    assert not os.path.exists(str(table) + ".partial")


def test_a_delta_table_on_s3(nights, s3):
    """The same nightly partition twice into a table on the local S3 server: once in the table."""
    s3["fs"].create_dir("tables")  # a bucket of its own: other tests list the "nightly" bucket
    table = "s3://tables/delta-answers"
    for night in ("monday", "tuesday"):
        r = nightly(nights, table, night, "2026-12-01", env=s3["env"])
        assert r.returncode == 0, r.stderr
    options = {"endpoint_url": s3["env"]["AWS_ENDPOINT_URL_S3"], "allow_http": "true", "aws_access_key_id": "test",
               "aws_secret_access_key": "test", "aws_region": "us-east-1"}
    dt = deltalake.DeltaTable(table, storage_options=options)
    assert dt.to_pyarrow_table().num_rows == 6 and len(commits_of(dt)) == 2


def commits_of(dt) -> list[str]:
    return [h["qa_batch.job_id"] for h in dt.history() if "qa_batch.job_id" in h]
