"""--table-format iceberg on a real Iceberg SQL catalog (SQLite), as pyiceberg users configure it
(PYICEBERG_CATALOG__<NAME>__* in the environment): nightly partitions replaced idempotently."""

from __future__ import annotations

import json
import os

import pytest

from conftest import FAST, run_cli

pytest.importorskip("pyiceberg")

def catalog_env(tmp_path) -> dict:
    (tmp_path / "warehouse").mkdir(exist_ok=True)
    return {"PYICEBERG_CATALOG__LOCAL__URI": f"sqlite:///{tmp_path}/catalog.db",
            "PYICEBERG_CATALOG__LOCAL__WAREHOUSE": f"file://{tmp_path}/warehouse"}


def nightly(nights, env, night, date, *extra, crash=None):
    return run_cli("run", nights["inputs"][night], "-o", "nightly.answers", "--catalog", "local", "--model",
                   nights["model"], "--table-format", "iceberg", "--partition", f"date={date}", *FAST, *extra,
                   env={**env, **({"QA_BATCH_CRASH_AT": crash} if crash else {})})


def table(env):
    """The table as an analyst's pyiceberg session opens it (the same catalog, given by its properties)."""
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog("local", uri=env["PYICEBERG_CATALOG__LOCAL__URI"],
                           warehouse=env["PYICEBERG_CATALOG__LOCAL__WAREHOUSE"])
    return catalog.load_table("nightly.answers")


def rows_by_date(env) -> dict[str, int]:
    import polars as pl

    df = pl.from_arrow(table(env).scan().to_arrow())
    return dict(df.group_by("date").len().iter_rows()) if df.height else {}


def jobs(env) -> list[str]:
    return sorted({s.summary.additional_properties.get("qa-batch.job-id") for s in table(env).snapshots()})


def test_each_night_is_in_the_table_once_however_often_it_runs(nights, tmp_path):
    env = catalog_env(tmp_path)
    for night, date in (("monday", "2026-12-01"), ("tuesday", "2026-12-01"), ("monday", "2026-12-02")):
        r = nightly(nights, env, night, date)
        assert r.returncode == 0, r.stderr
    assert rows_by_date(env) == {"2026-12-01": 6, "2026-12-02": 4}
    assert len(jobs(env)) == 3
    # as an analyst reads it: DuckDB over the table's scan (its iceberg extension downloads on first use)
    import duckdb

    current = table(env).scan().to_arrow()  # noqa: F841 (read by name below)
    assert dict(duckdb.sql("select date, count(*) from current group by date").fetchall()) == \
        {"2026-12-01": 6, "2026-12-02": 4}
    summary = json.loads(table(env).current_snapshot().summary.additional_properties["qa-batch.summary"])
    assert summary["rows"] == 4 and summary["output"] == "nightly.answers"
    assert not os.path.exists(tmp_path / "warehouse" / ".qa-batch" / "nightly.answers.partial")


@pytest.mark.slow
def test_a_kill_at_any_point_of_the_commit_leaves_the_old_partition_or_the_new_and_the_rerun_the_new(
        nights, tmp_path):
    """One night rerun again and again, each rerun killed at another point of its commit, then rerun
    (the nights alternate, 4 and 6 rows, so the partition's size says whose answers it holds)."""
    env = catalog_env(tmp_path)
    assert nightly(nights, env, "monday", "2026-12-01").returncode == 0
    held, runs = ("monday", 4), 1
    for point in ("renaming:1", "table_committing:1", "table_committed:1", "cleaning_up:1"):
        night, rows = ("tuesday", 6) if held[0] == "monday" else ("monday", 4)
        r = nightly(nights, env, night, "2026-12-01", crash=point)
        assert r.returncode == -9, point
        committed = point in ("table_committed:1", "cleaning_up:1")
        assert rows_by_date(env) == {"2026-12-01": rows if committed else held[1]}, point  # never both or neither
        r = nightly(nights, env, night, "2026-12-01")
        assert r.returncode == 0, r.stderr
        runs += 1
        assert rows_by_date(env) == {"2026-12-01": rows}, point
        assert len(jobs(env)) == runs, f"{point}: the rerun committed the job a second time"
        held = (night, rows)


def test_a_run_of_another_schema_is_refused_unless_merged(nights, tmp_path):
    env = catalog_env(tmp_path)
    assert nightly(nights, env, "monday", "2026-12-01").returncode == 0
    r = nightly(nights, env, "tuesday", "2026-12-02", "--top-k", "2")
    assert r.returncode == 2 and "new column answers" in r.stderr and "--schema-mode merge" in r.stderr
    r = nightly(nights, env, "tuesday", "2026-12-02", "--top-k", "2", "--schema-mode", "merge")
    assert r.returncode == 0, r.stderr
    assert rows_by_date(env) == {"2026-12-01": 4, "2026-12-02": 6}
    import pyarrow.compute as pc

    t = table(env).scan().to_arrow()
    assert t.filter(pc.equal(t["date"], "2026-12-01"))["answers"].null_count == 4


def test_a_bad_table_name_or_catalog_is_refused_before_any_model_work(nights, tmp_path):
    env = catalog_env(tmp_path)
    r = run_cli("run", nights["inputs"]["monday"], "-o", "answers", "--catalog", "local", "--model", tmp_path / "none",
                "--table-format", "iceberg", env=env)
    assert r.returncode == 2 and "name the table as NAMESPACE.TABLE" in r.stderr
    r = run_cli("run", nights["inputs"]["monday"], "-o", "a.b", "--catalog", "nowhere", "--model", tmp_path / "none",
                "--table-format", "iceberg", env=env)
    assert r.returncode == 2 and "--catalog nowhere" in r.stderr


@pytest.mark.slow
def test_the_nightly_tables_recipe_holds_each_night_once_in_both_tables(nights, tmp_path):
    """jobs/tables/nightly-tables.sh: the same night twice, then the next night, into a Delta table and
    an Iceberg table: each night's answers are in each table once."""
    import subprocess
    import sys

    pytest.importorskip("deltalake")
    import polars as pl

    from conftest import ROOT

    env = {**os.environ, **catalog_env(tmp_path), "HF_HUB_OFFLINE": "1", "QA_BATCH": f"{sys.executable} -m jobs.cli",
           "QA_BATCH_MODEL": nights["model"], "DELTA_TABLE": str(tmp_path / "delta-answers"),
           "ICEBERG_TABLE": "nightly.answers", "ICEBERG_CATALOG": "local", "QA_BATCH_OPTIONS": " ".join(FAST)}
    script = os.path.join(ROOT, "jobs", "tables", "nightly-tables.sh")
    for night, date in (("monday", "2026-12-01"), ("tuesday", "2026-12-01"), ("monday", "2026-12-02")):
        r = subprocess.run(["bash", script, nights["inputs"][night], date], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    want = {"2026-12-01": 6, "2026-12-02": 4}
    delta = pl.read_delta(str(tmp_path / "delta-answers"))
    assert dict(delta.group_by("date").len().iter_rows()) == want
    assert rows_by_date(catalog_env(tmp_path)) == want


@pytest.mark.slow
def test_ray_commits_its_shards_to_the_table_once(nights, tmp_path):
    """--engine ray: the shard files (partition columns included) registered in one commit; the same
    night again replaces them."""
    pytest.importorskip("ray")
    env = catalog_env(tmp_path)
    ray = ("--engine", "ray", "--num-gpus", "0", "--rows-per-batch", "2")
    for night in ("monday", "tuesday"):
        r = nightly(nights, env, night, "2026-12-01", *ray)
        assert r.returncode == 0, r.stderr
    assert rows_by_date(env) == {"2026-12-01": 6} and len(jobs(env)) == 2
    assert len(table(env).inspect.files()) == 3  # the three shards of the second run


def test_an_iceberg_table_on_s3(nights, s3, tmp_path):
    """A SQL catalog whose warehouse is on the local S3 server: the same night twice, once in the table."""
    endpoint = s3["env"]["AWS_ENDPOINT_URL_S3"]
    s3["fs"].create_dir("tables")  # a bucket of its own: other tests list the "nightly" bucket
    env = {**s3["env"], "PYICEBERG_CATALOG__LOCAL__URI": f"sqlite:///{tmp_path}/catalog.db",
           "PYICEBERG_CATALOG__LOCAL__WAREHOUSE": "s3://tables/warehouse",
           "PYICEBERG_CATALOG__LOCAL__S3__ENDPOINT": endpoint, "PYICEBERG_CATALOG__LOCAL__S3__ACCESS_KEY_ID": "test",
           "PYICEBERG_CATALOG__LOCAL__S3__SECRET_ACCESS_KEY": "test", "PYICEBERG_CATALOG__LOCAL__S3__REGION": "us-east-1"}
    for night in ("monday", "tuesday"):
        r = nightly(nights, env, night, "2026-12-01")
        assert r.returncode == 0, r.stderr
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog("local", uri=env["PYICEBERG_CATALOG__LOCAL__URI"], warehouse="s3://tables/warehouse",
                           **{"s3.endpoint": endpoint, "s3.access-key-id": "test", "s3.secret-access-key": "test",
                              "s3.region": "us-east-1"})
    t = catalog.load_table("nightly.answers")
    assert t.scan().to_arrow().num_rows == 6 and t.location().startswith("s3://tables/warehouse")
