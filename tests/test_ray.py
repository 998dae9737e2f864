"""--engine ray on a real local Ray instance: the same table as the local engine, every row once,
resumed after a kill, committed with _SUCCESS last.

Most commands join one Ray instance (2 CPUs) that this module starts, with --ray-address, so
Ray starts once; the first test lets qa-batch start its own, as a user's first run does.
Which shards the actors answered is counted across processes through QA_BATCH_TRACE
(pipeline/faults.py): each actor appends `shard_started a-b` and `shard_written a-b`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SAMPLE, assert_same_answers, run_cli
from pipeline.engines.shards import parse_shard_name
from pipeline.stages.write import read_metadata

pytest.importorskip("ray.data")

OPTIONS = ["--rows-per-window", "8", "--max-seq-len", "128", "--doc-stride", "32", "--top-k", "2"]
SMALL = ["--rows-per-window", "4", "--rows-per-batch", "4", "--max-seq-len", "128", "--doc-stride", "32"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ray")
    src = pq.read_table(SAMPLE).drop_columns(["id"])  # no id column: rows are numbered
    for i in range(3):
        pq.write_table(src.slice(15 * i, 15), base / f"part-{i}.parquet", row_group_size=4)
    return base


@pytest.fixture(scope="module")
def local(inputs, bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-local") / "local.parquet"
    r = run_cli("run", inputs, "-o", out, "--model", bert_dir, *OPTIONS)
    assert r.returncode == 0, r.stderr
    return pq.read_table(out)


@pytest.fixture(scope="module")
def small(tmp_path_factory, bert_dir):
    """24 short and middling rows in two files, and the local engine's answers: for the kill tests."""
    base = tmp_path_factory.mktemp("ray-small")
    src = pq.read_table(SAMPLE)
    rows = [*range(0, 3), *range(12, 21), *range(33, 45)]  # the long articles left out: quick to answer
    table = src.take(rows)
    (base / "in").mkdir()
    pq.write_table(table.slice(0, 10), base / "in" / "a.parquet", row_group_size=3)
    pq.write_table(table.slice(10), base / "in" / "b.parquet", row_group_size=5)
    r = run_cli("run", base / "in", "-o", base / "local.parquet", "--model", bert_dir, *SMALL)
    assert r.returncode == 0, r.stderr
    return {"input": base / "in", "reference": pq.read_table(base / "local.parquet"), "model": bert_dir}


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance with 2 CPUs for the module; commands join it with --ray-address."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ["--ray-address", ray.get_runtime_context().gcs_address]
    ray.shutdown()


def wait_until_no_actor_is_alive(timeout: float = 60) -> None:
    """Until the cluster (the module's, which this process joined) has no live qa-batch actor
    ('MapWorker(MapBatches(RayAnswerer))'; Ray Data's own detached helpers stay)."""
    from ray._private import state  # the GCS's table of actors (the state API needs the dashboard)

    deadline = time.monotonic() + timeout
    while alive := [(a["ActorClassName"], a["State"]) for a in state.actors().values()
                    if a["State"] != "DEAD" and "RayAnswerer" in a["ActorClassName"]]:  # not Ray Data's own
        assert time.monotonic() < deadline, f"the dead driver's actors were not ended: {alive}"
        time.sleep(0.1)


def shard_files(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if parse_shard_name(n)) if os.path.isdir(directory) else []


def traced(path) -> dict[str, list[tuple[int, int]]]:
    """What the actors recorded: shard_started / shard_written -> row ranges."""
    out: dict[str, list[tuple[int, int]]] = {"shard_started": [], "shard_written": []}
    if os.path.exists(path):
        for line in open(path).read().splitlines():
            event, detail = line.split()
            if event in out:  # success_written names a folder, not rows
                a, b = detail.split("-")
                out[event].append((int(a), int(b)))
    return out


def small_command(small, out, cluster, *extra):
    return [sys.executable, "-m", "jobs.cli", "run", str(small["input"]), "-o", str(out), "--model", small["model"],
            "--engine", "ray", *cluster, *SMALL, *extra]


def run(cmd, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_ray_engine_equals_the_local_engine_and_commits_with_success_last(inputs, bert_dir, local, tmp_path):
    out = tmp_path / "ray-out"
    trace = tmp_path / "trace"
    r = run_cli("run", inputs, "-o", out, "--model", bert_dir, "--engine", "ray", "--cpu-workers", "2",
                "--rows-per-batch", "16", *OPTIONS, env={"QA_BATCH_TRACE": str(trace)})
    assert r.returncode == 0, r.stderr
    assert "45 rows" in r.stderr
    assert "Ray plan: 2 CPU actors (" in r.stderr and ", fixed) on a cluster of" in r.stderr  # --cpu-workers 2
    names = shard_files(out)
    assert names == ["part-000000000000-000000000016.parquet", "part-000000000016-000000000032.parquet",
                     "part-000000000032-000000000045.parquet"]  # 16 rows (2 windows) per shard, named by rows
    assert sorted(os.listdir(out)) == ["_SUCCESS", *names]
    ray_table = pq.read_table(out).sort_by("row")
    assert ray_table["row"].to_pylist() == list(range(45))  # every row once, numbered over all inputs
    assert_same_answers(ray_table.select(local.column_names), local)
    meta = read_metadata(os.path.join(out, names[0]))
    assert meta["engine"] == "ray" and meta["model"]["revision"].startswith("sha256:") and meta["device"] == "cpu"
    assert meta["shard"] == {"start": 0, "end": 16, "rows": 16, "chunks": sum(local["chunks"].to_pylist()[:16]),
                             "answered": 16, "errors": 0}
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["rows"] == success["rows_this_run"] == 45 and success["job_id"] == meta["job_id"]
    # issue 22: the actors' stage seconds, bottleneck and peak memory reach the summary
    assert success["peak_rss_mb"] > 100 and success["bottleneck"] in ("model", "read", "tokenize", "batch",
                                                                       "merge", "write")
    assert success["stage_seconds"]["infer_wait"] + success["stage_seconds"]["infer_launch"] > 0
    events = [line.split()[0] for line in trace.read_text().splitlines()]  # one file, appended in order
    assert events.count("shard_written") == 3 and events[-1] == "success_written"  # _SUCCESS after every shard
    assert sorted(os.listdir(tmp_path)) == ["ray-out", "trace"]  # no staging directory left


def test_a_killed_driver_resumes_and_answers_no_shard_twice(small, cluster, tmp_path):
    out, first, second = tmp_path / "out", tmp_path / "first.trace", tmp_path / "second.trace"
    cmd = small_command(small, out, cluster)
    r = run(cmd, QA_BATCH_CRASH_AT="ray_shard_done:2", QA_BATCH_TRACE=str(first))  # SIGKILL after 2 shards
    assert r.returncode == -signal.SIGKILL, r.stderr
    # by default, all of the cluster: its 2 CPUs as one actor running two worker threads
    assert ("Ray plan: 1 CPU actor (2 CPU, 2 worker threads each, up to 6 as the cluster grows) on a cluster of "
            "2 CPUs and 0 GPUs; 6 shards of up to 4 rows, 24 rows to answer") in r.stderr
    assert not out.exists()
    kept = shard_files(tmp_path / "out.partial" / "files")
    assert len(kept) >= 2
    wait_until_no_actor_is_alive()  # the cluster ends a dead driver's actors: nothing may write after this
    assert [parse_shard_name(n) for n in shard_files(tmp_path / "out.partial" / "files")] == \
        sorted(traced(first)["shard_written"])

    report = tmp_path / "report.json"
    r = run([*cmd, "--report", str(report)], QA_BATCH_TRACE=str(second))
    assert r.returncode == 0, r.stderr
    assert "resumed an interrupted run" in r.stderr
    assert_same_answers(pq.read_table(out).sort_by("id"), small["reference"].sort_by("id"))  # as if never killed
    written_before, run2 = set(traced(first)["shard_written"]), traced(second)
    assert not written_before & set(run2["shard_started"])  # no finished shard answered again
    rows = sorted(r for a, b in [*written_before, *run2["shard_written"]] for r in range(a, b))
    assert rows == list(range(24))  # every row written once over the two runs
    rep = json.loads(report.read_text())
    assert rep["rows"] == 24 and rep["resumed_from_row"] == sum(b - a for a, b in written_before)
    assert rep["rows_this_run"] == 24 - rep["resumed_from_row"]
    assert not (tmp_path / "out.partial").exists()


def test_sigterm_cancels_keeps_shards_and_the_older_output_then_resumes(small, cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # yesterday's output, replaced only when today's is whole
    (out / "part-000000000000-000000000999.parquet").write_bytes(b"old")
    (out / "_SUCCESS").write_text('{"old": true}')
    cmd = small_command(small, out, cluster, "--overwrite", "--cpu-workers", "1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    files = tmp_path / "out.partial" / "files"
    deadline = time.time() + 240
    while proc.poll() is None and not shard_files(files) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the driver only, as a scheduler does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert 1 <= len(shard_files(files)) < 6
    assert json.loads((out / "_SUCCESS").read_text()) == {"old": True}  # the older output untouched

    # killed while publishing: between renaming the older output aside and the new one in
    r = run(cmd, QA_BATCH_CRASH_AT="publishing:1")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists()
    r = run(cmd)  # only the publishing is left to do
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["_SUCCESS", *shard_files(out)] and len(shard_files(out)) == 6
    assert_same_answers(pq.read_table(out).sort_by("id"), small["reference"].sort_by("id"))
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_the_rows_are_counted_before_the_commit(small, cluster, tmp_path):
    out, trace = tmp_path / "out", tmp_path / "trace"
    cmd = small_command(small, out, cluster)
    r = run(cmd, QA_BATCH_LOSE_AT="ray_commit")  # the first shard's file goes missing before the commit
    assert r.returncode == 3, r.stderr
    assert "4 of the 24 planned rows have no shard file" in r.stderr and "rows [0, 4)" in r.stderr
    assert not out.exists()  # no output, no _SUCCESS
    assert len(shard_files(tmp_path / "out.partial" / "files")) == 5  # the others kept
    r = run(small_command(small, out, cluster, "--max-answer-len", "5"))  # another job on the same output
    assert r.returncode == 2, r.stderr
    assert "option max_answer_len differs: 30 then, 5 now" in r.stderr and "--restart" in r.stderr
    assert len(shard_files(tmp_path / "out.partial" / "files")) == 5  # refused, not discarded
    r = run(cmd, QA_BATCH_TRACE=str(trace), QA_BATCH_CRASH_AT="published:1")  # killed before the clean-up
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert traced(trace)["shard_started"] == [(0, 4)]  # only the missing rows answered
    assert (out / "_SUCCESS").exists()
    r = run(cmd)  # this job's output is in place: the rerun only cleans up and reports it
    assert r.returncode == 0, r.stderr
    assert "24 rows" in r.stderr and not (tmp_path / "out.partial").exists()
    assert_same_answers(pq.read_table(out).sort_by("id"), small["reference"].sort_by("id"))


def test_an_empty_table_gives_one_empty_file_with_the_schema(small, cluster, tmp_path):
    pq.write_table(pa.table({c: pa.array([], pa.string()) for c in ("id", "passage", "question")}),
                   tmp_path / "empty.parquet")
    r = run([sys.executable, "-m", "jobs.cli", "run", str(tmp_path / "empty.parquet"), "-o",
            str(tmp_path / "out"), "--model", small["model"], "--engine", "ray", *cluster])
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["_SUCCESS", "part-000000000000-000000000000.parquet"]
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 0 and "answer" in table.column_names
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text())["rows"] == 0


@pytest.mark.parametrize("engine,given,output,extra,why", [
    ("ray", "exports", "exports/answers", [], "lies inside the input directory"),  # the next run would read it
    ("local", "exports", "exports/answers.parquet", [], "lies inside the input directory"),
    ("ray", "exports/day-1/in.parquet", "exports", ["--overwrite"], "contains the input"),  # would delete it
    ("local", "exports/day-1/in.parquet", "exports/day-1/in.parquet", ["--overwrite"], "is also an input"),
])
def test_an_output_over_the_inputs_is_refused(bert_dir, tmp_path, engine, given, output, extra, why):
    (tmp_path / "exports" / "day-1").mkdir(parents=True)
    pq.write_table(pq.read_table(SAMPLE).slice(0, 3), tmp_path / "exports" / "day-1" / "in.parquet")
    r = run_cli("run", tmp_path / given, "-o", tmp_path / output, "--model", bert_dir, "--engine", engine, *extra)
    assert r.returncode == 2, r.stderr
    assert f"output {tmp_path / output} {why}" in r.stderr and "choose" in r.stderr
    assert os.listdir(tmp_path / "exports" / "day-1") == ["in.parquet"]


def test_a_killed_actor_loses_and_repeats_no_row(small, cluster, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "killed-once"
    r = run(small_command(small, out, cluster), QA_BATCH_CRASH_ONCE=f"ray_window:{marker}")
    assert r.returncode == 0, r.stderr
    assert marker.exists()  # an actor did die mid-shard; Ray Data started another and redid the shard
    assert_same_answers(pq.read_table(out), small["reference"])


def test_ray_reads_and_writes_s3_and_publishes_again_after_a_kill(small, s3):
    # its own Ray instance: the actors find the S3 endpoint in the environment they inherit
    # (credentials too: qa-batch never ships them to a cluster)
    s3["fs"].create_dir("nightly/ray-in")
    for name in sorted(os.listdir(small["input"])):
        pq.write_table(pq.read_table(small["input"] / name), f"nightly/ray-in/{name}", filesystem=s3["fs"])
    cmd = ["run", "s3://nightly/ray-in/", "-o", "s3://nightly/ray-out", "--model", small["model"], "--engine", "ray",
           "--cpu-workers", "1", *SMALL, "--rows-per-batch", "12"]
    # killed while copying the files in (object stores cannot rename a directory): no _SUCCESS yet
    r = run_cli(*cmd, env={**s3["env"], "QA_BATCH_CRASH_AT": "publishing:1"})
    assert r.returncode == -signal.SIGKILL, r.stderr

    def listed(prefix):
        return sorted(f.base_name for f in s3["fs"].get_file_info(pafs.FileSelector(prefix, allow_not_found=True)))

    assert listed("nightly/ray-out") == ["part-000000000000-000000000012.parquet"]
    r = run_cli(*cmd, env=s3["env"])
    assert r.returncode == 0, r.stderr
    assert listed("nightly/ray-out") == ["_SUCCESS", "part-000000000000-000000000012.parquet",
                                         "part-000000000012-000000000024.parquet"]
    assert listed("nightly") == ["ray-in", "ray-out"]  # the staging directory removed
    assert_same_answers(pq.read_table("nightly/ray-out", filesystem=s3["fs"]), small["reference"])


def test_without_ray_the_ray_engine_says_which_extra_to_install(bert_dir, tmp_path):
    hidden = tmp_path / "no-ray" / "ray"  # shadows the installed package, as if it were not there
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    r = run_cli("run", SAMPLE, "-o", tmp_path / "out", "--model", bert_dir, "--engine", "ray",
                env={"PYTHONPATH": str(tmp_path / "no-ray")})
    assert r.returncode == 2, r.stderr
    assert "pip install 'ray[data]' (in a qa-batch checkout: pip install -e '.[ray]')" in r.stderr
    assert not (tmp_path / "out").exists()
