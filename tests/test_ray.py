"""--engine ray on a real local Ray instance: the same table as the local engine, every row once,
resumed after a kill, committed with _SUCCESS last.

Most commands join one Ray instance (2 CPUs) that this module starts, with --ray-address, so
Ray starts once; the first test lets qa-batch start its own, as a user's first run does.
Which shards the actors answered is counted across processes through QA_BATCH_TRACE
(pipeline/faults.py): each actor appends `shard_started a-b` and `shard_written a-b`.
"""

from __future__ import annotations

import datetime as dt
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
    # the files kept are the shards the trace says were written, plus at most one an actor renamed into place
    # and was killed before tracing it (the rename is synced first): never a shard that was not started
    on_disk = {parse_shard_name(n) for n in shard_files(tmp_path / "out.partial" / "files")}
    assert set(traced(first)["shard_written"]) <= on_disk <= set(traced(first)["shard_started"])

    report = tmp_path / "report.json"
    r = run([*cmd, "--report", str(report)], QA_BATCH_TRACE=str(second))
    assert r.returncode == 0, r.stderr
    assert "resumed an interrupted run" in r.stderr
    assert_same_answers(pq.read_table(out).sort_by("id"), small["reference"].sort_by("id"))  # as if never killed
    written_before, run2 = on_disk, traced(second)
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

    # README: an object-store publish removes the older output's files that the new one does not hold
    # (shards of 8 rows now: none of the older file names is written again)
    r = run_cli(*[a if a != "12" else "8" for a in cmd], "--overwrite", env=s3["env"])
    assert r.returncode == 0, r.stderr
    assert listed("nightly/ray-out") == ["_SUCCESS", "part-000000000000-000000000008.parquet",
                                         "part-000000000008-000000000016.parquet",
                                         "part-000000000016-000000000024.parquet"]
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


# ---- README promises about --engine ray that no test held (issue 26) ----

def rows_of(ranges) -> list[int]:
    return sorted(r for a, b in ranges for r in range(a, b))


def json_events(stderr: str) -> list[dict]:
    """The --log-format json events on stderr (Ray's own lines, not JSON, left out)."""
    events = []
    for line in stderr.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return [e for e in events if isinstance(e, dict) and "event" in e]


def kill_after_two_shards(small, out, cluster, trace, *extra) -> list[tuple[int, int]]:
    """A driver SIGKILLed after two shards; returns the row ranges of the shard files it left,
    once the cluster has ended its actors (nothing writes after that)."""
    r = run(small_command(small, out, cluster, *extra), QA_BATCH_CRASH_AT="ray_shard_done:2",
            QA_BATCH_TRACE=str(trace))
    assert r.returncode == -signal.SIGKILL, r.stderr
    wait_until_no_actor_is_alive()
    kept = [parse_shard_name(n) for n in shard_files(out.parent / f"{out.name}.partial" / "files")]
    # each shard traced as written is a file; a file may lack its line (an actor killed between
    # moving its file into place, syncing the folder, and tracing it)
    assert set(traced(trace)["shard_written"]) <= set(kept) <= set(traced(trace)["shard_started"])
    assert len(kept) >= 2
    return kept


@pytest.mark.slow  # a run signalled or killed, then rerun: the long runs' step
def test_sigint_cancels_the_ray_job_keeps_its_shards_and_exits_130(small, cluster, tmp_path):
    """README, Signals: the first SIGINT cancels the Ray job (the shards already written stay) and
    qa-batch exits with 130 telling you to rerun."""
    out = tmp_path / "out"
    proc = subprocess.Popen(small_command(small, out, cluster, "--cpu-workers", "1"), cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    files = tmp_path / "out.partial" / "files"
    deadline = time.time() + 240
    while proc.poll() is None and not shard_files(files) and time.time() < deadline:  # a shard is written
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before a signal could be sent"
    proc.send_signal(signal.SIGINT)  # to the driver only
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGINT: cancelling the Ray job, keeping its finished shards" in err  # qa-batch's handler, not Ray's
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert 1 <= len(shard_files(files)) < 6 and not out.exists()


# The driver held in its stop (after the first signal cancelled the job, before it lets Ray go),
# with a file to say it is there: the second signal surely lands while the stop is under way.
HOLD_THE_STOP = """
import os, runpy, sys, time
sys.path.insert(0, os.getcwd())
from pipeline.engines import ray_engine
from pipeline.errors import Interrupted

exit_ = ray_engine.RayConnection.__exit__

def held(self, exc_type, exc, tb):
    if exc_type is not None and issubclass(exc_type, Interrupted):
        open(os.environ["STOPPING_MARKER"], "w").close()
        end = time.monotonic() + 60
        while time.monotonic() < end:
            time.sleep(0.05)
    return exit_(self, exc_type, exc, tb)

ray_engine.RayConnection.__exit__ = held
sys.argv[0] = "qa-batch"
runpy.run_module("jobs.cli", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow  # a run signalled or killed, then rerun: the long runs' step
def test_a_second_sigint_exits_a_ray_run_at_once(small, cluster, tmp_path):
    """README, Signals: a second SIGINT, while the first one's stop is under way, exits at once (130)."""
    out, marker, wrapper = tmp_path / "out", tmp_path / "stopping", tmp_path / "hold_the_stop.py"
    wrapper.write_text(HOLD_THE_STOP)
    cmd = [sys.executable, str(wrapper), *small_command(small, out, cluster, "--cpu-workers", "1")[3:]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "STOPPING_MARKER": str(marker)},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    files = tmp_path / "out.partial" / "files"
    deadline = time.time() + 240
    while proc.poll() is None and not shard_files(files) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before a signal could be sent"
    proc.send_signal(signal.SIGINT)
    while proc.poll() is None and not marker.exists() and time.time() < deadline:  # the job is being cancelled
        time.sleep(0.05)
    assert marker.exists(), proc.communicate(timeout=60)[1]
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the second SIGINT did not end the run: {proc.communicate()[1]}")
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 20, err  # at once, not after the held stop's 60 s
    assert "SIGINT: cancelling the Ray job" in err
    assert "interrupted after" not in err, err  # left before the stop's own end
    assert shard_files(files) and not out.exists()


@pytest.mark.slow  # a run signalled or killed, then rerun: the long runs' step
def test_restart_discards_the_earlier_shards_and_answers_every_row_again(small, cluster, tmp_path):
    """README, Resume: `--restart` discards the staged shards."""
    out, first, second, report = tmp_path / "out", tmp_path / "first.trace", tmp_path / "second.trace", \
        tmp_path / "report.json"
    kept = kill_after_two_shards(small, out, cluster, first)
    r = run(small_command(small, out, cluster, "--restart", "--report", str(report)), QA_BATCH_TRACE=str(second))
    assert r.returncode == 0, r.stderr
    assert "resumed" not in r.stderr and "answered before" not in r.stderr
    assert rows_of(traced(second)["shard_started"]) == list(range(24))  # every row once, the kept ones again
    assert set(kept) <= set(traced(second)["shard_written"])
    rep = json.loads(report.read_text())
    assert rep["rows_this_run"] == rep["rows"] == 24 and rep["resumed_from_row"] == 0
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["rows_this_run"] == 24 and success["resumed_from_row"] == 0
    assert_same_answers(pq.read_table(out).sort_by("id"), small["reference"].sort_by("id"))
    assert sorted(os.listdir(tmp_path)) == ["first.trace", "out", "report.json", "second.trace"]


@pytest.mark.slow  # a run signalled or killed, then rerun: the long runs' step
def test_a_resume_on_another_number_of_actors_answers_only_the_missing_rows(small, cluster, tmp_path):
    """README, Resume: a rerun answers only the rows no shard file holds, on any number of actors
    (shards of different sizes fit together; no row is answered twice); the output is that of an
    uninterrupted run."""
    out, first, second, report = tmp_path / "out", tmp_path / "first.trace", tmp_path / "second.trace", \
        tmp_path / "report.json"
    # 2 actors, shards of 4 rows (one window each); the driver SIGKILLed once two shards are written.
    # Each window waits 3 s before it is read (QA_BATCH_PAUSE_AT, in the actors), so that the four
    # shards left are not all written before the cluster ends the dead driver's actors.
    proc = subprocess.Popen(small_command(small, out, cluster, "--cpu-workers", "2"), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "QA_BATCH_TRACE": str(first),
                                 "QA_BATCH_PAUSE_AT": "read:3"})
    deadline = time.time() + 240
    while proc.poll() is None and len(traced(first)["shard_written"]) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before two shards were written: {proc.communicate()[1]}"
    proc.kill()
    proc.communicate(timeout=60)
    wait_until_no_actor_is_alive()  # nothing writes after this
    kept = [parse_shard_name(n) for n in shard_files(tmp_path / "out.partial" / "files")]
    assert set(traced(first)["shard_written"]) <= set(kept) <= set(traced(first)["shard_started"])
    before = rows_of(kept)
    assert 8 <= len(before) < 24, "every shard was written before the kill: nothing left to resume"
    # 1 actor of 2 threads, shards of up to 8 rows (the last option given wins)
    r = run(small_command(small, out, cluster, "--cpu-workers", "1", "--rows-per-batch", "8", "--log-format", "json",
                          "--report", str(report)), QA_BATCH_TRACE=str(second))
    assert r.returncode == 0, r.stderr
    plan = [e for e in json_events(r.stderr) if e["event"] == "ray_plan"]
    assert len(plan) == 1 and plan[0]["actors"] == 1 and plan[0]["threads_each"] == 2 and plan[0]["fixed"]
    assert plan[0]["rows_done_before"] == len(before) and plan[0]["rows_to_answer"] == 24 - len(before)
    missing = sorted(set(range(24)) - set(before))
    assert rows_of(traced(second)["shard_started"]) == missing  # only the rows no shard held, each once
    assert rows_of([*kept, *traced(second)["shard_written"]]) == list(range(24))
    assert [parse_shard_name(n) for n in shard_files(out)] == sorted([*kept, *traced(second)["shard_written"]])
    rep = json.loads(report.read_text())
    assert rep["resumed_from_row"] == len(before) and rep["rows_this_run"] == 24 - len(before)
    assert_same_answers(pq.read_table(out).sort_by("id"), small["reference"].sort_by("id"))


# what a secret must not be: a value the test's own environment (hence the cluster's) cannot hold
SECRETS = {"HF_TOKEN": "hf_qa_batch_test_token", "HUGGING_FACE_HUB_TOKEN": "hf_qa_batch_test_token_2",
           "AWS_SECRET_ACCESS_KEY": "qa-batch-test-key"}
SETTINGS = {"HF_HUB_OFFLINE": "1", "HF_QA_BATCH_TEST": "shipped", "QA_BATCH_TEST_SETTING": "shipped"}

ACTOR_ENVIRONMENT = """
import json, os, sys
sys.path.insert(0, os.getcwd())
from pipeline.engines.ray_engine import RayConnection, _import_ray

ray = _import_ray()
with RayConnection(ray, sys.argv[1]):  # the driver's own connection: the job's runtime_env is made here
    @ray.remote(num_cpus=0)
    class Actor:
        def environment(self, names):
            return {k: os.environ.get(k) for k in names}

    print(json.dumps(ray.get(Actor.remote().environment.remote(sys.argv[2:]))))
"""


def test_hf_token_and_cloud_keys_are_not_shipped_to_the_actors(cluster, tmp_path):
    """README, The cluster: the driver passes its QA_BATCH_* and HF_* variables to the actors, never
    a credential (not HF_TOKEN, nor cloud keys). The actors run on the module's cluster, started
    without these variables: what they see came through the job's runtime_env."""
    assert not {k for k, v in SECRETS.items() if os.environ.get(k) == v}
    script = tmp_path / "actor_environment.py"
    script.write_text(ACTOR_ENVIRONMENT)
    r = run([sys.executable, str(script), cluster[1], *SECRETS, *SETTINGS], **SECRETS, **SETTINGS)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k: seen[k] for k in SETTINGS} == SETTINGS  # settings do reach the actors
    assert not {k for k, v in SECRETS.items() if seen[k] == v}, seen  # credentials do not


@pytest.fixture(scope="module")
def finished(small, cluster, tmp_path_factory):
    """One uninterrupted run of the small table, its JSON events, report and output: for the
    promises about what a finished Ray run says and leaves."""
    base = tmp_path_factory.mktemp("ray-finished")
    out, report = base / "out", base / "report.json"
    r = run(small_command(small, out, cluster, "--log-format", "json", "--report", str(report)))
    assert r.returncode == 0, r.stderr
    return {"out": out, "events": json_events(r.stderr), "report": json.loads(report.read_text())}


def test_the_ray_plan_event_holds_the_plan(finished):
    """README, Logs: with --log-format json the driver's plan is the `ray_plan` event, with its fields."""
    plans = [e for e in finished["events"] if e["event"] == "ray_plan"]
    assert len(plans) == 1
    plan = plans[0]
    assert plan["message"] == ("Ray plan: 1 CPU actor (2 CPU, 2 worker threads each, up to 6 as the cluster grows) "
                               "on a cluster of 2 CPUs and 0 GPUs; 6 shards of up to 4 rows, 24 rows to answer")
    assert plan["level"] == "info" and plan["time"]
    assert {k: plan[k] for k in ("actors", "max_actors", "fixed", "gpus_each", "cpus_each", "threads_each",
                                 "cluster_cpus", "cluster_gpus", "shards", "rows_per_shard", "rows_to_answer",
                                 "rows_done_before")} == {
        "actors": 1, "max_actors": 6, "fixed": False, "gpus_each": 0, "cpus_each": 2.0, "threads_each": 2,
        "cluster_cpus": 2.0, "cluster_gpus": 0.0, "shards": 6, "rows_per_shard": 4, "rows_to_answer": 24,
        "rows_done_before": 0}
    names = [e["event"] for e in finished["events"]]
    assert names.index("ray_plan") < names.index("run_finished")


def test_success_holds_the_run_summary_readme_lists(finished):
    """README, Commit and Readers: `_SUCCESS` is the run summary as JSON (what --report writes, with
    the job id): the rows, answered, null and errors, rows/s and the start and end times."""
    out = finished["out"]
    success = json.loads((out / "_SUCCESS").read_text())
    report = finished["report"]
    assert {k: v for k, v in success.items() if k not in ("job_id", "qa_batch_version")} == report
    table = pq.read_table(out)
    errors = sum(e is not None for e in table["error"].to_pylist())
    answered = sum(a is not None for a in table["answer"].to_pylist())
    assert success["rows"] == 24 and (success["answered"], success["errors"]) == (answered, errors)
    assert success["answered"] + success["null"] + success["errors"] == 24
    assert success["rows_per_s"] > 0
    started, ended = (dt.datetime.fromisoformat(success[k]) for k in ("started_at", "finished_at"))
    assert started.tzinfo is not None and started <= ended
    assert success["job_id"] == read_metadata(os.path.join(out, shard_files(out)[0]))["job_id"]
    assert success["output"] == str(out) and success["device"] == "ray:cpu"


def test_eval_reads_a_ray_output_folder_locally_and_on_s3(finished, s3, tmp_path):
    """README, Measuring quality: `eval` reads an --engine ray output directory (its _SUCCESS
    included), and s3:// paths: the same figures as for the one file it holds."""
    out = finished["out"]
    one_file = tmp_path / "answers.parquet"
    pq.write_table(pq.read_table(out), one_file)
    want = run_cli("eval", one_file, SAMPLE)
    assert want.returncode == 0, want.stderr
    assert "rows evaluated 24 (missing from answers: 21, missing from gold: 0)" in want.stdout
    r = run_cli("eval", out, SAMPLE)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.stdout
    s3["fs"].create_dir("nightly/eval-ray")
    for name in os.listdir(out):  # the folder as Ray publishes it on an object store, _SUCCESS included
        with s3["fs"].open_output_stream(f"nightly/eval-ray/{name}") as f:
            f.write((out / name).read_bytes())
    with s3["fs"].open_output_stream("nightly/eval-gold.parquet") as f, open(SAMPLE, "rb") as sample:
        f.write(sample.read())
    r = run_cli("eval", "s3://nightly/eval-ray", "s3://nightly/eval-gold.parquet", env=s3["env"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.stdout


def test_a_failure_names_the_shards_folder_only_when_shards_are_there(tmp_path):
    """The lifecycle machine found a failure to reach the cluster saying "the finished shards are
    kept in .../files", a folder that did not exist: the message names it only when it holds shards."""
    from pipeline.engines.ray_engine import shards_kept
    from pipeline.engines.shards import shard_name

    files = tmp_path / "out.partial" / "files"
    assert shards_kept(str(files), "rerun it") == "No shard was finished: rerun it"
    files.mkdir(parents=True)
    (files / (shard_name(0, 4) + ".inprogress")).write_bytes(b"")  # a write cut short is not a shard
    assert shards_kept(str(files), "rerun it") == "No shard was finished: rerun it"
    (files / shard_name(0, 4)).write_bytes(b"")
    assert shards_kept(str(files), "rerun it") == f"The finished shards are kept in {files}: rerun it to resume"
