"""Resume after a crash, signals, and failures while writing: nothing lost, nothing twice.

Each test runs qa-batch as a subprocess, stops it (a real SIGKILL at a chosen point via
QA_BATCH_CRASH_AT, or SIGINT/SIGTERM), reruns the same command and compares the output
with an uninterrupted run row for row.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SAMPLE, assert_same_answers, run_cli

OPTIONS = ["--rows-per-window", "4", "--max-seq-len", "128", "--doc-stride", "32", "--top-k", "2"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, checkpoints):
    """An input of several windows and the output of an uninterrupted run."""
    base = tmp_path_factory.mktemp("resume")
    src = pq.read_table(SAMPLE)
    inp = base / "in.parquet"
    pq.write_table(src, inp, row_group_size=7)  # windows and row groups do not line up
    ref = base / "reference.parquet"
    r = run_cli("run", inp, "-o", ref, "--model", checkpoints["bert"], *OPTIONS)
    assert r.returncode == 0, r.stderr
    return {"input": inp, "reference": pq.read_table(ref), "model": checkpoints["bert"]}


def command(job, out, *extra, input=None):
    return [sys.executable, "-m", "jobs.cli", "run", str(input or job["input"]), "-o", str(out),
            "--model", job["model"], *OPTIONS, *extra]


def env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def rows_in_parts(out) -> int:
    work = str(out) + ".partial"
    if not os.path.isdir(work):
        return 0
    return sum(pq.read_metadata(os.path.join(work, n)).num_rows for n in os.listdir(work)
               if n.startswith("part-") and n.endswith(".parquet"))


def rerun_and_compare(job, out, tmp_path, *extra, finished=False):
    """Rerun the same command: it must resume (answer exactly the rows no part held), or, when
    the killed run had `finished` (its output in place), only clean up."""
    before = rows_in_parts(out)
    report = tmp_path / "report.json"
    r = subprocess.run(command(job, out, *extra, "--report", str(report)), capture_output=True, text=True, env=env(),
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(out), job["reference"])  # every row once, in order, same answers
    assert not os.path.exists(str(out) + ".partial")
    rep = json.loads(report.read_text())
    total = job["reference"].num_rows
    assert rep["rows"] == total
    if finished:  # only the clean-up was left: the stored summary, nothing answered
        assert "resumed" not in r.stderr
        return 0
    assert rep["resumed_from_row"] == before
    assert rep["rows_this_run"] == total - before  # no finished row answered again, none lost
    assert ("resumed an interrupted run" in r.stderr) == (before > 0), r.stderr
    return before


@pytest.mark.parametrize("point", ["read:2", "read:7", "batch:1", "batch:40", "part_written:1", "part_written:5",
                                   "assembling:3", "renaming:1", "cleaning_up:1"])
def test_sigkill_anywhere_then_resume(job, tmp_path, point):
    out = tmp_path / "out.parquet"
    r = subprocess.run(command(job, out), capture_output=True, text=True, env=env(QA_BATCH_CRASH_AT=point), cwd=ROOT)
    assert r.returncode == -signal.SIGKILL, r.stderr
    if point != "cleaning_up:1":
        assert not out.exists()  # never a partial output at the final path
    kept = rerun_and_compare(job, out, tmp_path, finished=point == "cleaning_up:1")
    if point.startswith(("part_written:5", "assembling", "renaming")):
        assert kept > 0  # parts were kept, and the rerun resumed from them


def wait_for_parts(out, n, proc, timeout=60):
    """Until n parts are written; the test fails (never signals anyway) if they are not in time."""
    deadline = time.monotonic() + timeout
    while rows_in_parts(out) < n * 4:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{n} parts were not written within {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_keeps_parts_and_resumes(job, tmp_path, sig, code):
    out = tmp_path / "out.parquet"
    proc = subprocess.Popen(command(job, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(), cwd=ROOT)
    wait_for_parts(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "rerun the same command to resume" in err
    assert not out.exists()
    assert rows_in_parts(out) >= 8
    assert rerun_and_compare(job, out, tmp_path) > 0


def test_second_signal_exits_at_once_and_resume_still_works(job, tmp_path):
    out = tmp_path / "out.parquet"
    # the stop pauses (QA_BATCH_PAUSE_AT=stopping), so the second signal surely lands during it: two
    # signals sent back to back can be delivered as one
    proc = subprocess.Popen(command(job, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(QA_BATCH_PAUSE_AT="stopping"), cwd=ROOT)
    wait_for_parts(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    first = proc.stderr.readline()
    while "SIGINT: finishing the batches in flight" not in first:  # the first signal was handled
        assert first, "the process ended before it handled the first signal"
        first = proc.stderr.readline()
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - started < 20  # at once, not after the pause
    # at once: the second signal leaves before the run's own 'interrupted after N rows' (a normal
    # stop after the first signal would print it, with the same exit code)
    assert "interrupted after" not in err, err
    assert not out.exists()
    rerun_and_compare(job, out, tmp_path)


def test_a_different_job_is_refused_until_restart(job, tmp_path):
    inp = tmp_path / "in.parquet"
    inp.write_bytes(job["input"].read_bytes())
    out = tmp_path / "out.parquet"
    r = subprocess.run(command(job, out, input=inp), capture_output=True, text=True,
                       env=env(QA_BATCH_CRASH_AT="part_written:3"), cwd=ROOT)
    assert r.returncode == -signal.SIGKILL
    assert rows_in_parts(out) == 8
    # another answer-changing option
    r = run_cli("run", inp, "-o", out, "--model", job["model"], *OPTIONS, "--max-answer-len", "5")
    assert r.returncode == 2
    assert "option max_answer_len differs: 30 then, 5 now" in r.stderr and "--restart" in r.stderr
    # a changed input
    os.utime(inp, ns=(time.time_ns(), time.time_ns() + 10**9))
    r = run_cli("run", inp, "-o", out, "--model", job["model"], *OPTIONS)
    assert r.returncode == 2 and "changed since the interrupted run" in r.stderr
    assert rows_in_parts(out) == 8  # refused, not discarded
    r = run_cli("run", inp, "-o", out, "--model", job["model"], *OPTIONS, "--restart", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["rows_this_run"] == job["reference"].num_rows
    assert_same_answers(pq.read_table(out), job["reference"])


def _limit_file_size(max_bytes):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def test_a_full_disk_fails_with_exit_3_and_keeps_the_previous_output(job, tmp_path):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"yesterday's answers")
    r = subprocess.run(command(job, out, "--overwrite"), capture_output=True, text=True, env=env(), cwd=ROOT,
                       preexec_fn=_limit_file_size(6_000))
    assert r.returncode == 3, r.stderr
    assert "could not write" in r.stderr and "rerun the same command to resume" in r.stderr
    assert out.read_bytes() == b"yesterday's answers"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    rerun_and_compare(job, out, tmp_path, "--overwrite")  # resumes from the parts the full disk left


def test_killed_before_the_move_with_an_older_output_present_gives_the_new_output(job, tmp_path):
    """Regression: the old `assembled` marker made the rerun keep yesterday's output and exit 0."""
    out = tmp_path / "out.parquet"
    yesterday = tmp_path / "yesterday.parquet"
    r = run_cli("run", job["input"], "-o", yesterday, "--model", job["model"], *OPTIONS, "--limit", "5")
    assert r.returncode == 0, r.stderr
    out.write_bytes(yesterday.read_bytes())  # a real qa-batch output of another job
    r = subprocess.run(command(job, out, "--overwrite"), capture_output=True, text=True,
                       env=env(QA_BATCH_CRASH_AT="renaming:1"), cwd=ROOT)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert pq.read_table(out).num_rows == 5  # the move never happened: yesterday's output is intact
    r = subprocess.run(command(job, out, "--overwrite"), capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(out), job["reference"])
    assert not os.path.exists(str(out) + ".partial")


def test_leftovers_of_a_finished_job_never_pass_for_the_next_job(job, tmp_path):
    """Regression: killed while cleaning up, the next night's run with new inputs answered nothing."""
    inp = tmp_path / "in.parquet"
    inp.write_bytes(job["input"].read_bytes())
    out = tmp_path / "out.parquet"
    r = subprocess.run(command(job, out, "--overwrite", input=inp), capture_output=True, text=True,
                       env=env(QA_BATCH_CRASH_AT="cleaning_up:1"), cwd=ROOT)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert_same_answers(pq.read_table(out), job["reference"])
    assert os.path.exists(str(out) + ".partial")
    # the next night: new rows in the same input file
    tonight = pq.read_table(job["input"]).slice(3, 9)
    pq.write_table(tonight, inp)
    r = subprocess.run(command(job, out, input=inp), capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 2 and "exists: pass --overwrite" in r.stderr  # yesterday's output is not ours
    r = subprocess.run(command(job, out, "--overwrite", input=inp), capture_output=True, text=True, env=env(),
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    got = pq.read_table(out)
    assert got["question"].to_pylist() == tonight["question"].to_pylist()
    assert got["answer"].to_pylist() == job["reference"]["answer"].to_pylist()[3:12]
    assert not os.path.exists(str(out) + ".partial")


def test_the_same_job_killed_while_cleaning_up_reports_its_own_summary(job, tmp_path):
    out = tmp_path / "out.parquet"
    r = subprocess.run(command(job, out), capture_output=True, text=True,
                       env=env(QA_BATCH_CRASH_AT="cleaning_up:1"), cwd=ROOT)
    assert r.returncode == -signal.SIGKILL
    # the clean-up died half way: parts gone, the manifest (deleted last) still there
    work = str(out) + ".partial"
    for name in os.listdir(work):
        if name != "manifest.json":
            os.remove(os.path.join(work, name))
    report = tmp_path / "report.json"
    r = subprocess.run(command(job, out, "--report", str(report)), capture_output=True, text=True, env=env(),
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr  # no "output exists": it is this job's own output
    assert json.loads(report.read_text())["rows"] == job["reference"].num_rows
    assert_same_answers(pq.read_table(out), job["reference"])
    assert not os.path.exists(work)


SUMMARY = re.compile(
    r"^qa-batch: (\d+) rows? \((\d+) answered, (\d+) null, (\d+) errors?\), (\d+) chunks? in ([\d.]+) s on (\S+): "
    r"([\d.]+) rows/s, ([\d.]+) chunks/s(?:; with the (\d+) rows? answered before, (\d+) rows? \((\d+) answered, "
    r"(\d+) null, (\d+) errors?\), (\d+) chunks? in all)? -> (.+)$", re.M)


def test_the_summary_line_after_a_resume_gives_this_runs_counts_and_rates_and_the_totals(job, tmp_path):
    out = tmp_path / "out.parquet"
    r = subprocess.run(command(job, out), capture_output=True, text=True,
                       env=env(QA_BATCH_CRASH_AT="part_written:3"), cwd=ROOT)
    assert r.returncode == -signal.SIGKILL, r.stderr

    report = tmp_path / "report.json"
    r = subprocess.run(command(job, out, "--report", str(report)), capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    ref, rep = job["reference"], json.loads(report.read_text())
    total_rows, total_chunks = ref.num_rows, sum(ref["chunks"].to_pylist())
    before_rows = rep["resumed_from_row"]  # one process answers windows in order: the first rows
    assert 0 < before_rows < total_rows
    before_chunks = sum(ref["chunks"].to_pylist()[:before_rows])
    assert (f"resumed an interrupted run: {before_rows} rows were answered before, {total_rows - before_rows} now"
            in r.stderr)
    lines = SUMMARY.findall(r.stderr)
    assert len(lines) == 1, r.stderr
    (rows, answered, null, errors, chunks, seconds, device, rows_per_s, chunks_per_s,
     before, all_rows, all_answered, all_null, all_errors, all_chunks, output) = lines[0]
    # this run: its own rows and chunks, over its own time
    assert int(rows) == total_rows - before_rows and int(chunks) == total_chunks - before_chunks
    assert int(answered) + int(null) + int(errors) == int(rows)
    assert device == "cpu" and output == str(out)
    assert float(seconds) == pytest.approx(rep["elapsed_s"], abs=0.05)
    assert float(rows_per_s) == pytest.approx(int(rows) / rep["elapsed_s"], abs=0.05 + 0.01 * float(rows_per_s))
    assert float(chunks_per_s) == pytest.approx(int(chunks) / rep["elapsed_s"], abs=0.05 + 0.01 * float(chunks_per_s))
    # then the totals over both runs
    assert int(before) == before_rows
    assert (int(all_rows), int(all_chunks)) == (total_rows, total_chunks)
    assert int(all_answered) == ref.num_rows - ref["answer"].null_count
    assert int(all_errors) == ref.num_rows - ref["error"].null_count
    assert int(all_answered) + int(all_null) + int(all_errors) == total_rows
    assert (rep["rows"], rep["chunks"], rep["rows_this_run"], rep["chunks_this_run"]) == (
        total_rows, total_chunks, int(rows), int(chunks))
    assert rep["answered_this_run"] + rep["null_this_run"] + rep["errors_this_run"] == int(rows)

    # an uninterrupted run's line has no totals part: this run is the whole
    r = subprocess.run(command(job, tmp_path / "again.parquet"), capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    (rows, *_, before, all_rows, _, _, _, _, _) = SUMMARY.findall(r.stderr)[0]
    assert int(rows) == total_rows and before == all_rows == ""
    assert "resumed" not in r.stderr and "CUDA" not in r.stderr


def test_runs_compare_exactly_but_for_score_noise():
    """The comparison behind every resume test: last-bit score noise passes; a lost, repeated
    or reordered row, another answer or another offset fails, naming the column and rows."""
    ref = pa.table({"id": ["a", "b"], "answer": ["Paris", "Rome"], "answer_start": [3, 9],
                    "score": pa.array([1.5, 2.25], pa.float32()),
                    "top": [[{"answer": "Paris", "score": 1.5}], [{"answer": "Rome", "score": 2.25}]]})
    noisy = ref.set_column(3, "score", pa.array([np.nextafter(np.float32(1.5), np.float32(2)), 2.25], pa.float32()))
    assert_same_answers(noisy, ref)
    for broken in (ref.take([1, 0]), ref.take([0]), ref.take([0, 0]),
                   ref.set_column(1, "answer", pa.array(["Paris", "Roma"])),
                   ref.set_column(2, "answer_start", pa.array([3, 10])),
                   ref.set_column(3, "score", pa.array([1.5, 2.5], pa.float32())),
                   ref.set_column(4, "top", pa.array([[{"answer": "Paris", "score": 1.5}],
                                                      [{"answer": "Rome", "score": 2.0}]]))):
        with pytest.raises(AssertionError):
            assert_same_answers(broken, ref)
    with pytest.raises(AssertionError, match=r"column 'answer': 1 rows differ, first \[1\]"):
        assert_same_answers(ref.set_column(1, "answer", pa.array(["Paris", "Roma"])), ref)
