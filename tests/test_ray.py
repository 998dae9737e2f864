"""--engine ray on a real local Ray instance: the same table as the local engine, every row once."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE, run_cli
from pipeline.write import read_metadata

pytest.importorskip("ray.data")

OPTIONS = ["--rows-per-window", "8", "--max-seq-len", "128", "--doc-stride", "32", "--top-k", "2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ray")
    src = pq.read_table(SAMPLE).drop_columns(["id"])  # no id column: rows are numbered
    for i in range(3):
        pq.write_table(src.slice(15 * i, 15), base / f"part-{i}.parquet", row_group_size=4)
    return base


def local_table(inputs, bert_dir, tmp_path):
    out = tmp_path / "local.parquet"
    r = run_cli("run", inputs, "-o", out, "--model", bert_dir, *OPTIONS)
    assert r.returncode == 0, r.stderr
    return pq.read_table(out)


def test_ray_engine_equals_the_local_engine(inputs, bert_dir, tmp_path):
    out = tmp_path / "ray-out"
    r = run_cli("run", inputs, "-o", out, "--model", bert_dir, "--engine", "ray", "--cpu-workers", "2",
                "--rows-per-batch", "16", *OPTIONS)
    assert r.returncode == 0, r.stderr
    assert "45 rows" in r.stderr
    assert len([n for n in os.listdir(out) if n.endswith(".parquet")]) == 3  # 16 rows (2 windows) per task
    ray_table = pq.read_table(out).sort_by("row")
    local = local_table(inputs, bert_dir, tmp_path)
    assert ray_table["row"].to_pylist() == list(range(45))  # every row once, numbered over all inputs
    assert ray_table.select(local.column_names).equals(local)
    meta = read_metadata(os.path.join(out, sorted(os.listdir(out))[0]))
    assert meta["engine"] == "ray" and meta["model"]["revision"].startswith("sha256:") and meta["device"] == "cpu"
    assert not os.path.exists(str(out) + ".partial")


def test_a_killed_worker_loses_and_repeats_no_row(inputs, bert_dir, tmp_path):
    out = tmp_path / "ray-out"
    marker = tmp_path / "killed-once"
    r = run_cli("run", inputs, "-o", out, "--model", bert_dir, "--engine", "ray", "--cpu-workers", "2", *OPTIONS,
                env={"QA_BATCH_CRASH_ONCE": f"ray_window:{marker}"})
    assert r.returncode == 0, r.stderr
    assert marker.exists()  # a worker did die mid-run
    table = pq.read_table(out).sort_by("row")
    assert table["row"].to_pylist() == list(range(45))
    assert table.select(["row", "answer", "answer_start"]).equals(
        local_table(inputs, bert_dir, tmp_path).select(["row", "answer", "answer_start"]))


def test_ray_reads_and_writes_s3(inputs, bert_dir, tmp_path, s3):
    for name in sorted(os.listdir(inputs)):
        s3["fs"].create_dir("nightly/ray-in")
        pq.write_table(pq.read_table(inputs / name), f"nightly/ray-in/{name}", filesystem=s3["fs"])
    r = run_cli("run", "s3://nightly/ray-in/", "-o", "s3://nightly/ray-out", "--model", bert_dir, "--engine", "ray",
                "--cpu-workers", "2", *OPTIONS, env=s3["env"])
    assert r.returncode == 0, r.stderr
    table = pq.read_table("nightly/ray-out", filesystem=s3["fs"]).sort_by("row")
    local = local_table(inputs, bert_dir, tmp_path)
    assert table.select(local.column_names).equals(local)


def test_without_ray_the_ray_engine_says_which_extra_to_install(bert_dir, tmp_path):
    hidden = tmp_path / "no-ray" / "ray"  # shadows the installed package, as if it were not there
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    r = run_cli("run", SAMPLE, "-o", tmp_path / "out", "--model", bert_dir, "--engine", "ray",
                env={"PYTHONPATH": str(tmp_path / "no-ray")})
    assert r.returncode == 2, r.stderr
    assert "pip install 'qa-batch[ray]'" in r.stderr
    assert not (tmp_path / "out").exists()
