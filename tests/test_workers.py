"""Several devices on one machine (--devices): worker processes, same output as one process.

CI has no GPU, so the workers run on CPU devices (--devices cpu,cpu): the same processes,
queues, shards, parts and assembly as one worker per GPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SAMPLE, assert_same_answers, run_cli
from pipeline.engines.resume import WorkDir
from pipeline.engines.workers import balanced_shard_rows, split_ranges

OPTIONS = ["--rows-per-window", "4", "--max-seq-len", "128", "--doc-stride", "32", "--top-k", "2"]


@pytest.mark.parametrize("ranges,window,rows", [
    ([(0, 45)], 4, 10), ([(0, 45)], 4, 1), ([(0, 8), (16, 23)], 4, 8), ([(4, 100)], 4, 1000), ([], 4, 3),
])
def test_shards_cover_every_row_once_on_window_boundaries(ranges, window, rows):
    shards = split_ranges(ranges, window, rows)
    covered = [r for a, b in shards for r in range(a, b)]
    assert covered == [r for a, b in ranges for r in range(a, b)]  # every row once, in order
    for a, b in shards:
        assert a % window == 0 and (b % window == 0 or any(b == end for _, end in ranges))
        assert b - a <= max(rows, window) + window - 1


def test_balanced_shards_give_each_worker_several():
    assert balanced_shard_rows([(0, 1000)], 2) == 125
    assert len(split_ranges([(0, 1000)], 10, balanced_shard_rows([(0, 1000)], 2))) == 8


def test_todo_lists_the_windows_no_part_holds(tmp_path):
    import pyarrow as pa

    work = WorkDir(str(tmp_path / "w"))
    os.makedirs(work.path)
    for first in (0, 8, 12):
        pq.write_table(pa.table({"row": [first]}), os.path.join(work.path, f"part-{first:012d}.parquet"))
    assert work.todo(total_rows=22, rows_per_window=4) == [(4, 8), (16, 22)]


@pytest.fixture(scope="module")
def job(tmp_path_factory, checkpoints):
    base = tmp_path_factory.mktemp("workers")
    inp = base / "in.parquet"
    pq.write_table(pq.read_table(SAMPLE), inp, row_group_size=7)  # shards start inside row groups
    ref = base / "reference.parquet"
    r = run_cli("run", inp, "-o", ref, "--model", checkpoints["bert"], "--device", "cpu", *OPTIONS)
    assert r.returncode == 0, r.stderr
    return {"input": inp, "reference": pq.read_table(ref), "model": checkpoints["bert"]}


def test_two_cpu_workers_write_the_one_process_output(job, tmp_path):
    out, report = tmp_path / "out.parquet", tmp_path / "report.json"
    r = run_cli("run", job["input"], "-o", out, "--model", job["model"], "--devices", "cpu,cpu",
                "--report", report, *OPTIONS)
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(out), job["reference"])
    summary = json.loads(report.read_text())
    assert summary["device"] == "cpu,cpu" and summary["rows"] == summary["rows_this_run"] == 45
    assert not os.path.exists(str(out) + ".partial")


def test_a_worker_killed_mid_run_fails_the_run_and_the_rerun_resumes(job, tmp_path):
    out, report = tmp_path / "out.parquet", tmp_path / "report.json"
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(job["input"]), "-o", str(out), "--model", job["model"],
           *OPTIONS, "--devices", "cpu,cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # every worker SIGKILLs itself at its 3rd written part
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**env, "QA_BATCH_CRASH_AT": "part_written:3"})
    assert r.returncode == 3, r.stderr
    assert "died" in r.stderr and "rerun the same command to resume" in r.stderr
    assert not out.exists()
    kept = WorkDir(str(out) + ".partial").parts()
    assert 0 < len(kept) < 12
    kept_rows = sum(pq.read_metadata(path).num_rows for _, path in kept)
    # resume on one worker: it answers only the missing windows, wherever they are
    r = subprocess.run([*cmd[:-1], "cpu", "--report", str(report)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(out), job["reference"])
    summary = json.loads(report.read_text())
    assert summary["resumed_from_row"] == kept_rows and summary["rows_this_run"] == 45 - kept_rows


def test_a_device_that_is_not_there_is_refused_before_any_work(job, tmp_path):
    r = run_cli("run", job["input"], "-o", tmp_path / "o.parquet", "--model", job["model"], "--devices", "cpu,cuda:7")
    assert r.returncode == 2
    assert "cuda:7" in r.stderr


def test_sigterm_stops_every_worker_and_the_rerun_resumes(job, tmp_path):
    out = tmp_path / "out.parquet"
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(job["input"]), "-o", str(out), "--model", job["model"],
           *OPTIONS, "--devices", "cpu,cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    work = WorkDir(str(out) + ".partial")
    deadline = time.time() + 120
    while proc.poll() is None and not (work.exists and work.parts()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the parent only, as a scheduler does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "rerun the same command to resume" in err
    assert not out.exists()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(out), job["reference"])


def test_auto_and_cuda_mean_every_visible_gpu(monkeypatch):
    import torch

    from pipeline.models.checkpoint import devices_for

    # No GPU here: pretend CUDA reports three, to check the choice the engine makes from it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert devices_for("auto") == devices_for("cuda") == ("cuda:0", "cuda:1", "cuda:2")
    assert devices_for("cuda:1") == ("cuda:1",) and devices_for("cpu") == ("cpu",)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices_for("auto") == ("auto",)


def test_ctrl_c_reaches_every_process_and_the_rerun_resumes(job, tmp_path):
    out = tmp_path / "out.parquet"
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(job["input"]), "-o", str(out), "--model", job["model"],
           *OPTIONS, "--devices", "cpu,cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, like a terminal's job
    work = WorkDir(str(out) + ".partial")
    deadline = time.time() + 120
    while proc.poll() is None and not (work.exists and work.parts()) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the parent and both workers get it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "rerun the same command to resume" in err
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(out), job["reference"])
