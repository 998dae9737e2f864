"""Several devices on one machine: one worker process per device, no cluster needed.

    parent: plan the job, start workers  ->  workers load the model, report "ready"
    parent: check the work directory, queue shards of windows  ->  workers answer them
            (loop.answer_ranges, each window a part in <output>.partial/)
    parent: progress bar and summary from the workers' messages, then assembles the output

Shards are contiguous runs of whole windows, several per worker so that a faster device
takes more of them; each is read from the row group that holds its first row. A window's
answers depend only on its rows, so the output equals a one-device run's. A worker that
dies fails the run (exit 3) with its finished windows kept: rerunning the command answers
only the windows no part holds, on however many devices are given then.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import resource
import signal
import sys
import threading
import time

from tqdm import tqdm

from ..errors import Interrupted, QaBatchError, RuntimeFailure, UsageError
from ..models.checkpoint import load_model, resolve_devices
from .chain import Stages
from .job import Job, check_max_seq_len
from .loop import answer_ranges
from .report import Progress, RunSummary, bottleneck, current_rss_mb, padding_efficiency
from .shards import balanced_shard_rows, split_ranges


def _worker(job: Job, key: str, device: str, threads: int, tasks, results, stop, parent_pid: int) -> None:
    """One device: load the model, then answer shards from `tasks` until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; Ctrl-C reaches the whole group

    def watch_parent():  # a parent killed outright leaves no one to assemble: stop early
        while not stop.is_set():
            if os.getppid() != parent_pid:
                stop.set()
            time.sleep(0.5)

    threading.Thread(target=watch_parent, daemon=True).start()
    progress = Progress()
    try:
        import torch

        torch.set_num_threads(threads)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        t0 = time.perf_counter()
        loaded = load_model(job.config.model, device, job.config.dtype, job.config.quantize)
        progress.stages["load_model"] += time.perf_counter() - t0
        stages = Stages.build(job.config, loaded, threads, job.calibration)
        results.put(("ready", key, {
            "model": loaded.identity, "device_type": loaded.device.type, "dtype": loaded.dtype_name,
            "batch_size": stages.batch_size, "max_batch_tokens": stages.max_batch_tokens,
            "max_positions": loaded.max_positions, "model_rss_mb": current_rss_mb(),
        }))
        try:
            answer_ranges(stages, job.target(), iter(tasks.get, None), progress,
                          lambda n: results.put(("rows", key, n)), stop)
        finally:
            stages.predictor.close()
        results.put(("done", key, {"progress": progress.as_dict(), "oom_splits": stages.predictor.stats.oom_splits,
                                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    except Interrupted:
        results.put(("interrupted", key, {"progress": progress.as_dict()}))
    except QaBatchError as e:
        results.put(("error", key, {"kind": type(e).__name__, "message": e.message}))
    except BaseException as e:  # anything else is a failure of this worker; the parent ends the run
        results.put(("error", key, {"kind": "RuntimeFailure", "message": f"{type(e).__name__}: {e}"}))


def _threads_per_worker(devices: tuple[str, ...], cpu_workers: int | None) -> int:
    cores = cpu_workers or os.cpu_count() or 1
    return max(1, cores // len(devices))


def run_on_devices(job: Job, devices: tuple[str, ...], stop_requested=None) -> RunSummary:
    """Answer the job with one worker process per device; the parent assembles the output."""
    config = job.config
    # fails here, before any process starts, on a device that is not there; 'cuda' becomes 'cuda:0'
    named, devices = devices, resolve_devices(devices)
    if len({d.split(":")[0] for d in devices}) > 1:
        raise UsageError(f"--devices {','.join(named)}: mix of CPU and GPU; answers would differ between them")

    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    tasks, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    threads = _threads_per_worker(devices, config.cpu_workers)
    # A device named twice gets two workers (cpu,cpu; or cuda:0,cuda:0, two model copies on one GPU).
    keys = [f"{d}#{i}" if devices.count(d) > 1 else d for i, d in enumerate(devices)]
    procs = {key: ctx.Process(target=_worker, name=f"qa-batch-{key}", daemon=True,
                              args=(job, key, d, threads, tasks, results, stop, os.getpid()))
             for key, d in zip(keys, devices)}
    for p in procs.values():
        p.start()

    workers = _Workers(procs, tasks, results, stop, stop_requested)
    bar = None
    try:
        ready = workers.wait_ready()
        if not ready:  # stopped (a signal) before any worker was ready
            raise Interrupted(job.plan.count(0), job.parts.path)
        first = next(iter(ready.values()))
        for d, r in ready.items():
            for key in ("model", "dtype", "batch_size", "max_batch_tokens"):
                if r[key] != first[key]:
                    raise UsageError(f"device {d} would run with {key} {r[key]!r}, the others with {first[key]!r}: "
                                     "give --batch-size/--dtype explicitly or use devices of one kind")
        check_max_seq_len(config, first["max_positions"])
        todo = job.open_parts(first["model"], first["device_type"], first["dtype"], first["batch_size"],
                              first["max_batch_tokens"])
        if todo is None:  # this job's output is in place: only the clean-up was left
            return job.already_done()
        done_before = job.plan.count(job.total_rows - sum(end - start for start, end in todo))
        for shard in split_ranges(todo, config.rows_per_window, balanced_shard_rows(todo, len(procs))):
            tasks.put(shard)
        for _ in procs:
            tasks.put(None)
        bar = tqdm(total=job.total_rows, initial=done_before.rows, unit="row", dynamic_ncols=True,
                   disable=config.quiet or not sys.stderr.isatty())
        finals = workers.wait_done(bar.update)
    finally:
        if bar is not None:
            bar.close()
        workers.shut_down()

    progress = Progress()
    for f in finals.values():
        progress.add(f["progress"])
    if workers.interrupted:
        raise Interrupted(done_before + job.plan.count_answers(progress.rows), job.parts.path)
    metadata = job.metadata(first["model"], ",".join(devices), first["dtype"])
    summary = RunSummary(output=job.output, backend=job.config.backend, device=metadata["device"], dtype=first["dtype"],
                         started_at=job.started_at, resumed_from_row=done_before.answers,
                         model_rss_mb=max(r["model_rss_mb"] for r in ready.values()),
                         questions_per_row=job.plan.questions_per_row)
    summary.padding_efficiency = padding_efficiency(progress)
    summary.oom_splits = sum(f.get("oom_splits", 0) for f in finals.values())
    summary.peak_rss_mb = round(max(f.get("peak_rss_mb", 0.0) for f in finals.values()), 1)  # per process
    summary.stage_seconds = {k: round(v, 3) for k, v in sorted(progress.stages.items())}  # summed over workers
    summary.bottleneck = bottleneck(summary.stage_seconds)
    return job.finish(summary, metadata, progress)


class _Workers:
    """The parent's view of its workers: their messages, and whether they are still alive."""

    def __init__(self, procs: dict, tasks, results, stop, stop_requested):
        self.procs, self.tasks, self.results = procs, tasks, results
        self.stop, self.stop_requested = stop, stop_requested
        self.interrupted = False
        self.finished: dict[str, dict] = {}

    def _messages(self):
        """Messages as they come; checks for a stop request and for workers that died."""
        exited_at: dict[str, float] = {}
        while True:
            if self.stop_requested is not None and self.stop_requested.is_set() and not self.stop.is_set():
                self.stop.set()  # workers finish their batches in flight and keep whole windows
            try:
                yield self.results.get(timeout=0.2)
                continue
            except queue.Empty:
                pass
            for key, p in self.procs.items():
                if key in self.finished or p.exitcode is None:
                    continue
                # a clean exit's last message is already in the pipe; give it a moment
                if p.exitcode != 0 or time.monotonic() - exited_at.setdefault(key, time.monotonic()) > 5:
                    if self.stop_requested is not None and self.stop_requested.is_set():
                        self.interrupted = True
                        self.finished[key] = {"progress": Progress().as_dict()}
                        continue
                    raise RuntimeFailure(
                        f"the worker for {key} died (exit code {p.exitcode}); the windows finished so far are "
                        "kept: rerun the same command to resume")

    def wait_ready(self) -> dict[str, dict]:
        ready: dict[str, dict] = {}
        for kind, key, body in self._messages():
            self._raise_on_error(kind, key, body)
            if kind == "ready":
                ready[key] = body
            if len(ready) + len(self.finished) == len(self.procs):
                return ready
        raise AssertionError("unreachable")

    def wait_done(self, on_rows) -> dict[str, dict]:
        for kind, key, body in self._messages():
            self._raise_on_error(kind, key, body)
            if kind == "rows":
                on_rows(body)
            elif kind in ("done", "interrupted"):
                self.interrupted |= kind == "interrupted"
                self.finished[key] = body
            if len(self.finished) == len(self.procs):
                return self.finished
        raise AssertionError("unreachable")

    def _raise_on_error(self, kind: str, key: str, body: dict) -> None:
        if kind == "error":
            error = UsageError if body["kind"] == "UsageError" else RuntimeFailure
            raise error(f"{key}: {body['message']}")

    def shut_down(self) -> None:
        self.stop.set()
        for _ in self.procs:  # wakes workers still waiting for a shard
            self.tasks.put(None)
        self.tasks.cancel_join_thread()  # shards nobody took must not keep this process alive
        for p in self.procs.values():
            p.join(timeout=30)
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
