"""--lineage: OpenLineage events through the real client and its file transport, as its users
configure it (OPENLINEAGE__TRANSPORT__* in the environment)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import FAST, ROOT, SAMPLE, run_cli

pytest.importorskip("openlineage.client")

def transport(path) -> dict:
    return {"OPENLINEAGE__TRANSPORT__TYPE": "file", "OPENLINEAGE__TRANSPORT__LOG_FILE_PATH": str(path),
            "OPENLINEAGE__TRANSPORT__APPEND": "true", "OPENLINEAGE_NAMESPACE": "nightly"}


def events(path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp("lineage")
    src = base / "in.parquet"
    pq.write_table(pq.read_table(SAMPLE).select(["id", "passage", "question"]).slice(0, 6), src)
    return src


def test_a_run_emits_start_then_complete_naming_what_it_read_and_wrote(small, bert_dir, tmp_path):
    log, out = tmp_path / "events.jsonl", tmp_path / "answers.parquet"
    r = run_cli("run", small, "-o", out, "--model", bert_dir, "--lineage", *FAST, env=transport(log))
    assert r.returncode == 0, r.stderr
    start, complete = events(log)
    assert [start["eventType"], complete["eventType"]] == ["START", "COMPLETE"]
    assert start["run"]["runId"] == complete["run"]["runId"]
    assert start["job"] == complete["job"] and start["job"]["namespace"] == "nightly"
    assert start["job"]["name"] == "qa-batch.answers"
    assert start["job"]["facets"]["jobType"]["processingType"] == "BATCH"
    assert [(d["namespace"], d["name"]) for d in complete["inputs"]] == [("file", str(small))]
    assert [(d["namespace"], d["name"]) for d in complete["outputs"]] == [("file", str(out))]
    assert complete["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == 6 == pq.read_metadata(out).num_rows
    facet = complete["run"]["facets"]["qa_batch"]
    assert facet["model"] == bert_dir and facet["options"]["max_seq_len"] == 48 and facet["summary"]["rows"] == 6
    assert complete["run"]["facets"]["processing_engine"]["name"] == "qa-batch"


def test_a_refused_run_emits_fail_with_the_message(small, bert_dir, tmp_path):
    log = tmp_path / "events.jsonl"
    r = run_cli("run", small, "-o", tmp_path / "o.parquet", "--model", bert_dir, "--lineage", "--top-k", "0",
                env=transport(log))
    assert r.returncode == 2
    start, fail = events(log)
    assert [start["eventType"], fail["eventType"]] == ["START", "FAIL"]
    assert "--top-k 0: must be at least 1" in fail["run"]["facets"]["errorMessage"]["message"]


def test_a_signal_emits_abort(small, bert_dir, tmp_path):
    log, out = tmp_path / "events.jsonl", tmp_path / "answers.parquet"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **transport(log), "QA_BATCH_PAUSE_AT": "read:1"}  # a second per window
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(small), "-o", str(out), "--model", bert_dir,
                             "--lineage", *FAST, "--rows-per-window", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    work = str(out) + ".partial"
    deadline = time.time() + 120
    while not (os.path.isdir(work) and any(n.startswith("part-") for n in os.listdir(work))):
        assert proc.poll() is None and time.time() < deadline, "no part was written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert [e["eventType"] for e in events(log)] == ["START", "ABORT"]


def test_a_delta_table_is_named_as_the_output(small, bert_dir, tmp_path):
    pytest.importorskip("deltalake")
    log, table = tmp_path / "events.jsonl", tmp_path / "answers"
    r = run_cli("run", small, "-o", table, "--model", bert_dir, "--lineage", "--table-format", "delta",
                "--partition", "date=2026-12-01", *FAST, env=transport(log))
    assert r.returncode == 0, r.stderr
    complete = events(log)[-1]
    assert complete["eventType"] == "COMPLETE"
    assert [(d["namespace"], d["name"]) for d in complete["outputs"]] == [("file", str(table))]


def test_dataset_names_follow_the_openlineage_conventions():
    from pipeline.engines.lineage import dataset_name

    assert dataset_name("s3://bucket/exports/day=1/") == ("s3://bucket", "exports/day=1/")
    assert dataset_name("gs://b/x.parquet") == ("gs://b", "x.parquet")
    assert dataset_name("hdfs://nn:8020/data/x") == ("hdfs://nn:8020", "/data/x")
    assert dataset_name("rel/x.parquet") == ("file", os.path.abspath("rel/x.parquet"))
