"""The Ray engine: the local engine's stages, run by a pool of Ray Data actors.

    driver: plan shards from the footers -> map_batches(RayAnswerer actors) -> shard results
    actors: read a shard, answer it window by window, write its file into the staging directory
    driver: check every row is there -> write _SUCCESS -> publish the output (commit.py)

Each actor loads the model once (in __init__) and answers whole windows of
`--rows-per-window` rows with the local engine's loop (loop.answer_ranges: tokenizing, the
model on every worker thread, merging, all overlapped). The
dataset's items are shards, row ranges in whole windows (shards.py), rather than rows read
by ray.data.read_parquet: an actor reads its shard itself (from the row group holding its
first row, through storage.py, so s3:// works on every node), rows keep their global row
numbers, and the windows, hence the batches and the answers, are exactly those of a local
run. Each shard becomes one Parquet file named by its row range, written whole (under a
hidden name, then moved) into `<output>.partial/files/`; Ray Data carries only shard
descriptions in and a few counts out, and runs no read or write tasks of its own, so the
actors may hold every CPU.

Resume: `<output>.partial/manifest.json` names the job (resume.py compares it); a rerun
answers only the rows no shard file holds, whatever the shard size was. Commit: when every
row is there, the driver checks the row count, writes `files/_SUCCESS` and publishes
`files/` as the output (commit.py). Stop (SIGINT/SIGTERM): the driver stops waiting,
shuts its Ray job down (finished shards stay) and raises Interrupted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime as dt
import json
import logging
import os
import queue
import re
import resource
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import pyarrow as pa
from tqdm import tqdm

from .. import __version__, faults, storage
from ..config import RunConfig
from ..counts import Count
from ..errors import Interrupted, QaBatchError, RuntimeFailure, UsageError
from ..models import onnx_backend
from ..models.checkpoint import load_model, model_identity
from ..quality import calibrate
from ..stages.read import InputPlan, open_parquet
from ..stages.shape import OutputShape
from ..stages.write import METADATA_KEY
from . import commit
from .chain import CPU_BATCH_SIZE, CUDA_BATCH_SIZE, Stages
from .job import Job, answer_identity, default_output, questions_metadata, versions
from .loop import Target, answer_ranges
from .report import COUNTS, Progress, RunSummary, bottleneck, write_report
from .resume import MANIFEST, input_fingerprint, output_job_id, readable
from .shards import Range, balanced_shard_rows, parse_shard_name, shard_name, split_ranges, tile

FILES = "files"  # <output>.partial/files/: what becomes the output
PAIRS = "pairs"  # <output>.partial/pairs/: with documents, the shards of pairs that files/ is reduced from
_SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # nodes find tokens where the hub client looks, not from us
# default cores per CPU actor (at most the smallest node's): since actors run the local engine's loop,
# one actor of 2 worker threads answers as fast as 2 actors of one (0.97-1.13x, BENCHMARKS.md#scaling)
# with one model copy instead of two; 4 keeps several actors, hence shards in parallel, on big nodes
CORES_PER_CPU_ACTOR = 4
_COUNTS = COUNTS


@dataclass(frozen=True)
class ActorPlan:
    """The actor pool, decided from the cluster's resources and the options."""

    gpu: bool  # one GPU per actor
    actors: int  # started at once: as many as the cluster holds now, or as many as asked for
    fixed: bool  # asked for (--num-gpus N, --cpu-workers N): the pool does not grow
    cpus: float  # CPUs reserved per actor
    threads: int  # CPU actors: worker threads (each one core); GPU actors: 1
    cluster_cpus: float
    cluster_gpus: float


def plan_actors(nodes: list[dict], num_gpus: int | None, cpu_actors: int | None,
                cpus_per_actor: float | None) -> ActorPlan:
    """How many actors, and what each holds, from each alive node's resources ({"CPU": 16.0, ...}).

    GPU actors (num_gpus None and the cluster has GPUs, or num_gpus > 0): one per GPU, each
    with `cpus_per_actor` CPUs (default 1). CPU actors: `cpus_per_actor` cores each (default
    CORES_PER_CPU_ACTOR, at most the smallest node's CPUs, so that an actor fits on
    every node; with --cpu-workers N, the cluster's CPUs shared out among N), as many as
    the nodes hold. Ray Data runs no tasks beside the actors here (they read and write
    their shards themselves), so the actors may hold every CPU.
    """
    cpus = [float(n.get("CPU", 0.0)) for n in nodes]
    gpus = [float(n.get("GPU", 0.0)) for n in nodes]
    total_cpus, total_gpus = sum(cpus), sum(gpus)
    gpu = num_gpus > 0 if num_gpus is not None else total_gpus >= 1
    if gpu:
        each = 1.0 if cpus_per_actor is None else cpus_per_actor
        threads = 1
        fits = sum(min(int(g), int(c // each)) if each > 0 else int(g) for c, g in zip(cpus, gpus))
        wanted = num_gpus
    else:
        usable = [c for c in cpus if c >= 1]
        if cpus_per_actor is not None:
            each = cpus_per_actor
        elif cpu_actors is not None:
            each = float(max(1, min(int(total_cpus // cpu_actors), int(max(usable, default=1)))))
        else:
            each = float(max(1, min(CORES_PER_CPU_ACTOR, int(min(usable, default=1)))))
        threads = max(1, int(each))
        fits = sum(int(c // each) for c in cpus)
        wanted = cpu_actors
    actors = wanted if wanted is not None else max(1, fits)
    return ActorPlan(gpu=gpu, actors=actors, fixed=wanted is not None, cpus=each, threads=threads,
                     cluster_cpus=total_cpus, cluster_gpus=total_gpus)


@dataclass(frozen=True)
class RayPlan:
    """What the driver prints before any work: the actor pool and the shards."""

    actors: int
    max_actors: int  # the autoscaling pool grows to this as nodes join
    fixed: bool  # asked for: the pool does not grow
    gpus_each: int
    cpus_each: float
    threads_each: int
    cluster_cpus: float
    cluster_gpus: float
    shards: int  # to answer in this run
    rows_per_shard: int
    rows_to_answer: int
    rows_done_before: int  # held by the shard files of earlier, interrupted runs

    def line(self) -> str:
        kind = "GPU" if self.gpus_each else "CPU"
        each = (f"1 GPU and {self.cpus_each:g} CPU each" if self.gpus_each else
                f"{self.cpus_each:g} CPU, {self.threads_each} worker thread{'s' * (self.threads_each != 1)} each")
        grow = (", fixed" if self.fixed else
                f", up to {self.max_actors} as the cluster grows" if self.max_actors > self.actors else "")
        before = f" ({self.rows_done_before} answered before)" if self.rows_done_before else ""
        return (f"Ray plan: {self.actors} {kind} actor{'s' * (self.actors != 1)} ({each}{grow}) on a cluster of "
                f"{self.cluster_cpus:g} CPUs and {self.cluster_gpus:g} GPUs; {self.shards} shard"
                f"{'s' * (self.shards != 1)} of up to {self.rows_per_shard} rows, {self.rows_to_answer} rows to "
                f"answer{before}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class RayAnswerer:
    """A Ray Data actor: one model, many shards; each shard's answers become one file."""

    def __init__(self, config: RunConfig, plan: InputPlan, metadata: dict, threads: int, files: str,
                 model: dict, shape: OutputShape, calibration: calibrate.Calibration | None = None):
        import ray
        import torch

        torch.set_num_threads(threads)
        self.config, self.plan, self.files = config, plan, files
        loaded = load_model(config.model, "cuda" if ray.get_gpu_ids() else "cpu", config.dtype, config.quantize)
        self.mismatch = None if loaded.identity == model else (
            f"{socket.gethostname()} loaded {config.model} as {loaded.identity}, the driver planned the job with "
            f"{model}: every node needs the same model")
        self.stages = Stages.build(config, loaded, threads, calibration)  # CPU: one thread per worker
        # each file's metadata: the driver's (version, options, job) and this actor's model and device
        self.metadata = {**metadata, "model": loaded.identity, "device": str(loaded.device),
                         "dtype": loaded.dtype_name}
        self.shape = shape  # the driver's Job.file_shape: with Iceberg, the partition columns too
        self.oom_splits = 0  # the predictor's count when the last shard was reported

    def __call__(self, batch: dict) -> dict:
        if self.mismatch:
            raise RuntimeFailure(self.mismatch)
        out: dict[str, list] = {k: [] for k in ("start", "end", *_COUNTS, "oom_splits", "stages", "peak_rss_mb")}
        for start, end in zip(batch["start"], batch["end"]):
            start, end = int(start), int(end)
            faults.record("shard_started", f"{start}-{end}")
            tables: list[pa.Table] = []

            def keep(first_row: int, table: pa.Table) -> None:  # windows come in input order
                faults.once("ray_window")
                tables.append(table)

            # the local engine's loop: tokenizing, the model and merging overlap, every worker thread busy
            target = Target(self.config, self.plan, self.shape, keep, self.files)
            progress = Progress()
            answer_ranges(self.stages, target, [(start, end)], progress, lambda n: None)
            table = pa.concat_tables(tables) if tables else self.shape.window_schema.empty_table()
            counts = self.shape.count(table)  # counted as the windows' tables: rows are pairs
            # a shard is written in the output's form; with documents as its pairs (reduced by the driver)
            write_shard(self.files, start, end, table if self.shape.grouped else self.shape.output_table(table),
                        {**self.metadata, "shard": {"start": start, "end": end, **counts}})
            faults.record("shard_written", f"{start}-{end}")
            splits = self.stages.predictor.stats.oom_splits
            out["oom_splits"].append(splits - self.oom_splits)  # this shard's
            self.oom_splits = splits
            out["stages"].append(json.dumps(dict(progress.stages)))  # seconds per stage, summed by the driver
            out["peak_rss_mb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            out["start"].append(start)
            out["end"].append(end)
            for k in _COUNTS:
                out[k].append(counts[k])
        return out


def write_shard(files: str, start: int, end: int, table, metadata: dict) -> None:
    """One shard's file, written whole: under a hidden name (readers skip it), then moved."""
    import pyarrow.parquet as pq

    path = storage.join(files, shard_name(start, end))
    tmp = storage.join(files, f".{shard_name(start, end)}.inprogress")
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    try:
        fs, inner = storage.locate(tmp)
        pq.write_table(table, inner, compression="zstd", filesystem=fs)
        storage.sync(tmp)
        storage.move(tmp, path)
    except OSError as e:
        raise RuntimeFailure(f"could not write {path}: {e.strerror or e}. The finished shards are kept: fix the "
                             "cause (disk space, permissions) and rerun the same command to resume") from None


def default_output_dir(inputs: tuple[str, ...], files: tuple[str, ...]) -> str:
    out = default_output(inputs, files)
    return out.replace(".answers.parquet", ".answers", 1)


class Staged(Enum):
    """Where earlier runs of this job left its staging directory (read by `open_staging`)."""

    TO_ANSWER = "to answer"  # rows may be missing: answer them, check, write _SUCCESS, publish
    COMMITTED = "committed"  # files/_SUCCESS is this job's: killed while publishing
    PUBLISHED = "published"  # the output is this job's: killed while cleaning up


@dataclass(frozen=True)
class RayJob:
    """A Ray run as planned before any work: the local engine's Job and the staging layout."""

    job: Job
    num_gpus: int | None  # asked for; None: auto
    model: dict  # the identity every actor must load
    files: str  # <output>.partial/files/: what becomes the output

    @property
    def config(self) -> RunConfig:
        return self.job.config

    @property
    def shards(self) -> str:
        """Where actors write their shards: files/ itself, or with documents pairs/ (reduced into files/)."""
        return storage.join(self.job.parts.path, PAIRS) if self.job.shape.grouped else self.files


def run_ray(config: RunConfig, stop_requested: threading.Event | None = None,
            on_plan: Callable[[RayPlan], None] | None = None) -> RunSummary:
    """Answer every row on a Ray cluster (or a local Ray instance) into an output directory.

    plan (no Ray yet) -> start Ray -> run the shards left -> check every row is there and
    write _SUCCESS -> commit (publish). A rerun of an interrupted run answers only the rows
    no shard file holds; setting `stop_requested` cancels the Ray job, keeps the finished
    shards and raises Interrupted. `on_plan` is told the actor pool and the shards first.
    """
    ray = _import_ray()
    rj = plan(config)
    try:
        with RayConnection(ray, config.ray_address) as cluster:
            actors = plan_actors(cluster.nodes(), rj.num_gpus, config.cpu_workers, config.num_cpus_per_worker)
            _check_gpus(rj, actors)
            staged = open_staging(rj, actors)
            if staged is Staged.PUBLISHED:  # killed after publishing, before the clean-up
                if rj.job.table is None:
                    commit.clean_up(rj.job.output)
                    stored = commit.read_success(rj.job.output)
                else:  # the summary the job's commit recorded
                    stored = rj.job.table.summary_of(rj.job.parts.job_id)
                storage.delete(rj.job.parts.path)
                return write_report(_summary_from(stored, rj.job.output), config)
            if staged is Staged.TO_ANSWER:
                metadata, this_run, before = answer(rj, cluster, actors, stop_requested, on_plan)
                cluster.release()  # the actors' resources go back to the cluster before the commit
                check(rj, actors, metadata, this_run, before)
        return publish(rj)
    except OSError as e:  # the driver's own reads and writes of the staging directory
        raise RuntimeFailure(f"{e.strerror or e} ({getattr(e, 'filename', None) or rj.job.parts.path}). "
                             + shards_kept(rj.shards, "fix the cause and rerun the same command")) from None


def shards_kept(files: str, then: str) -> str:
    """How a failure message ends: where the finished shards wait for the rerun, or that there are
    none yet (a failure before the first shard, such as a cluster that cannot be reached, must not
    name a folder that does not exist)."""
    try:
        done = storage.is_dir(files) and any(parse_shard_name(storage.basename(f)) is not None
                                             for f in storage.list_files(files))
    except OSError:
        done = False
    if done:
        return f"The finished shards are kept in {files}: {then} to resume"
    return f"No shard was finished: {then}"


def _import_ray():
    # Ray's calls from a thread that outlives ray.shutdown() (Ray Data's, when the job is
    # cancelled) must not start a new local instance: no automatic ray.init.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray Data: pip install 'ray[data]' (in a qa-batch checkout: pip install -e '.[ray]')") from None
    return ray


def plan(config: RunConfig) -> RayJob:
    """Everything checked before Ray starts: options, inputs, output (the local engine's Job)."""
    config = onnx_backend.resolved(config)  # --backend auto decided on the driver: actors run what it names
    num_gpus = _check_ray_options(config)
    if os.path.isdir(config.model):  # actors start in other folders, on other nodes
        config = dataclasses.replace(config, model=os.path.abspath(config.model))
    job = Job.plan_for(config, default_output_dir)  # actors get its calibration: the file may be on this node only
    files = storage.join(job.parts.path, FILES)
    if job.table is not None:  # a table: its schema and partitioning checked, it may exist
        job.check_output()
        return RayJob(job, num_gpus, model_identity(config.model), files)
    if not storage.is_uri(job.output):  # object stores have no folders to check
        parent = storage.parent(job.output)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise UsageError(f"output directory {parent} does not exist or is not writable")
    _refuse_existing_output(job.output, job.parts.path, files, config)
    return RayJob(job, num_gpus, model_identity(config.model), files)


def _check_gpus(rj: RayJob, actors: ActorPlan) -> None:
    if actors.gpu and not actors.cluster_gpus and rj.config.ray_address is None:
        raise UsageError(f"--num-gpus {rj.num_gpus}: this machine has no GPU Ray can use; use --num-gpus 0 "
                         "(CPU actors), or --ray-address to join a cluster with GPUs")


def open_staging(rj: RayJob, actors: ActorPlan) -> Staged:
    """Create or check the staging directory (resume.py compares the manifests)."""
    job = rj.job
    c = rj.config
    job.parts.open_for(_manifest(c, job.plan, rj.model, actors.gpu, job.file_schema, job.calibration),
                       job.output, c.restart, c.overwrite or job.table is not None,
                       job.table.committed if job.table is not None else None)
    if _published(rj):
        return Staged.PUBLISHED
    if (commit.read_success(rj.files) or {}).get("job_id") == job.parts.job_id:
        return Staged.COMMITTED
    return Staged.TO_ANSWER


def answer(rj: RayJob, cluster: "RayConnection", actors: ActorPlan, stop_requested: threading.Event | None,
           on_plan: Callable[[RayPlan], None] | None) -> tuple[dict, dict, Count]:
    """Answer the rows no shard file holds; return the files' metadata, this run's counts and
    what earlier runs had answered. Finished shards are files by now."""
    job, config = rj.job, rj.config
    metadata = {"qa_batch_version": __version__, "versions": versions(config), "engine": "ray",
                "options": config.as_dict(),
                "started_at": job.started_at, "job_id": job.parts.job_id,
                **calibrate.calibration_metadata(config, job.calibration), **questions_metadata(job.plan)}
    todo = _shards_left(rj.shards, job.total_rows)
    before = job.plan.count(job.total_rows - _rows(todo))
    shard_rows = config.rows_per_batch or balanced_shard_rows(todo, actors.actors)
    shards = split_ranges(todo, config.rows_per_window, shard_rows)
    if not actors.fixed and len(shards) < actors.actors:  # an actor without a shard would only load the model
        actors = dataclasses.replace(actors, actors=max(1, len(shards)))
    max_actors = actors.actors if actors.fixed else max(actors.actors, len(shards))
    if on_plan is not None:
        on_plan(RayPlan(actors=actors.actors, max_actors=max_actors, fixed=actors.fixed, gpus_each=int(actors.gpu),
                        cpus_each=actors.cpus, threads_each=actors.threads, cluster_cpus=actors.cluster_cpus,
                        cluster_gpus=actors.cluster_gpus, shards=len(shards),
                        rows_per_shard=max((b - a for a, b in shards), default=0), rows_to_answer=_rows(todo),
                        rows_done_before=before.rows))
    if not shards:
        return metadata, dict.fromkeys(_COUNTS, 0), before
    try:
        this_run = _answer_shards(cluster, shards, actors, max_actors, rj, metadata, before, stop_requested)
    except Interrupted:  # the rows kept are those in shard files, some not yet reported
        kept = _rows(tile(list(_shard_files(rj.shards)), job.total_rows)[0])
        raise Interrupted(job.plan.count(kept), job.parts.path) from None
    return metadata, this_run, before


def check(rj: RayJob, actors: ActorPlan, metadata: dict, this_run: dict, before: Count) -> None:
    """Every row in exactly one shard file, as its name says; then the run's summary in _SUCCESS."""
    job, config = rj.job, rj.config
    shape = job.file_shape
    if job.total_rows == 0:  # no rows: one empty file, so that readers still get the schema
        write_shard(rj.shards, 0, 0, (shape.window_schema if shape.grouped else shape.schema).empty_table(),
                    {**metadata, "model": rj.model, "shard": {"start": 0, "end": 0, **dict.fromkeys(_COUNTS, 0)}})
    counts = _check_rows(rj.shards, job.total_rows, job.plan.count(1), wide=config.wide and not shape.grouped)
    if shape.grouped:
        counts.update(_reduce(rj, shape, metadata))
    elapsed = time.perf_counter() - job.started
    summary = RunSummary(output=job.output, backend=job.config.backend, device="ray:" + ("cuda" if actors.gpu else "cpu"),
                         dtype=_dtype_name(config, actors.gpu), started_at=job.started_at,
                         resumed_from_row=before.answers, elapsed_s=round(elapsed, 3),
                         questions_per_row=job.plan.questions_per_row,
                         rows_per_s=round(this_run["rows"] / elapsed, 2) if elapsed else 0.0,
                         chunks_per_s=round(this_run["chunks"] / elapsed, 2) if elapsed else 0.0,
                         finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    summary.set_counts(counts, this_run)
    summary.oom_splits = this_run.get("oom_splits", 0)
    summary.peak_rss_mb = round(this_run.get("peak_rss_mb", 0.0), 1)  # the largest actor's, model included
    summary.stage_seconds = {k: round(v, 3) for k, v in sorted(this_run.get("stages", {}).items())}  # summed
    summary.bottleneck = bottleneck(summary.stage_seconds)
    commit.write_success(rj.files, {**summary.as_dict(), "job_id": job.parts.job_id, "qa_batch_version": __version__})


def _published(rj: RayJob) -> bool:
    """Is the output this job's: its _SUCCESS, or its commit in the table?"""
    job = rj.job
    if job.table is not None:
        return job.table.committed(job.parts.job_id)
    return (commit.read_success(job.output) or {}).get("job_id") == job.parts.job_id


def publish_to_table(rj: RayJob, staged: dict) -> None:
    """The checked shard files, in row order, placed in the table and registered in one commit
    (tables.py); repeatable until the commit lands. Files are copied, never rows."""
    job = rj.job
    shards = [path for _, path in sorted(_shard_files(rj.files).items())]
    job.table.commit([(path, open_parquet(path).metadata.num_rows) for path in shards], job.file_schema,
                     job.partition, job.parts.job_id, staged, rj.config.schema_mode)


def publish(rj: RayJob) -> RunSummary:
    """The committed files become the output (commit.py), or a table's commit; the staging directory goes."""
    job = rj.job
    staged = commit.read_success(rj.files)
    try:
        if job.table is not None:
            publish_to_table(rj, staged)
        else:
            commit.publish(rj.files, job.output)
    except OSError as e:
        raise RuntimeFailure(f"could not publish {job.output}: {e.strerror or e}. The finished shards are kept in "
                             f"{rj.files}: fix the cause and rerun the same command to finish") from None
    faults.point("published")
    storage.delete(job.parts.path)
    return write_report(_summary_from(staged, job.output), rj.config)


class RayConnection:
    """The driver's connection to Ray: started or joined on enter, ended once, on exit or earlier
    by `release`; only when this process made it (a caller's own ray.init is left alone). Ended
    by a failure or a stop, it ends quietly: the cluster then ends the job's actors."""

    def __init__(self, ray, address: str | None):
        self.ray, self.address = ray, address
        self.owned = not ray.is_initialized()
        self.waiting: list[threading.Thread] = []  # Ray Data's result threads, joined when ended early

    def __enter__(self) -> "RayConnection":
        if self.owned:
            _init(self.ray, self.address)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(quietly=exc_type is not None)

    def nodes(self) -> list[dict]:
        return [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]

    def release(self, quietly: bool = False) -> None:
        if not (self.owned and self.ray.is_initialized()):
            return
        if not quietly:
            self.ray.shutdown()
            return
        # Ray Data's threads still wait on the connection (a cancelled job): they fail, and what
        # they would log about it is not news
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False  # in case ray was imported before RAY_ENABLE_AUTO_CONNECT=0
        logging.disable(logging.CRITICAL)
        try:
            self.ray.shutdown()
            for thread in self.waiting:
                thread.join(timeout=10)
        finally:
            logging.disable(logging.NOTSET)


def _init(ray, address: str | None) -> None:
    """Start a local Ray instance or join a cluster, keeping the caller's SIGINT/SIGTERM handlers
    (ray.init installs its own: SIGTERM would exit at once with code 15)."""
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    # settings for the actors (offline mode, cache, test hooks); never a credential: a runtime_env
    # is stored in the cluster's job table, visible in its dashboard
    env = {k: v for k, v in os.environ.items() if k.startswith(("QA_BATCH_", "HF_")) and k not in _SECRETS}
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             runtime_env={"env_vars": env} if env else None)
    for s, handler in handlers.items():
        if handler is not None:
            signal.signal(s, handler)


def _check_ray_options(config: RunConfig) -> int | None:
    """The GPUs asked for (None: auto), after refusing options that do not apply to Ray."""
    if config.devices:
        raise UsageError("--devices is for the local engine; with --engine ray, --num-gpus sets the GPU actors")
    if config.rows_per_batch is not None and config.rows_per_batch < 1:
        raise UsageError(f"--rows-per-batch {config.rows_per_batch}: must be at least 1")
    if config.num_gpus is not None and config.num_gpus < 0:
        raise UsageError(f"--num-gpus {config.num_gpus}: must be auto or at least 0")
    if config.num_cpus_per_worker is not None and config.num_cpus_per_worker <= 0:
        raise UsageError(f"--num-cpus-per-worker {config.num_cpus_per_worker}: must be above 0")
    if config.device == "cpu" or config.backend in onnx_backend.EXPORTED:  # exported models run on the CPU
        if config.num_gpus:
            what = "--device cpu" if config.device == "cpu" else f"--backend {config.backend} (CPU only)"
            raise UsageError(f"{what} with --num-gpus {config.num_gpus}: choose one")
        return 0
    if config.device not in ("auto", "cuda"):
        raise UsageError(f"--device {config.device}: with --engine ray, Ray assigns the GPUs; "
                         "use --num-gpus (auto, N, or 0 for CPU actors)")
    return config.num_gpus


def _refuse_existing_output(output: str, staging: str, files: str, config: RunConfig) -> None:
    """An existing output needs --overwrite, unless it is this job's own (a run killed while publishing)."""
    if config.overwrite or not storage.exists(output):
        return
    if not config.restart:
        try:
            job_id = json.loads(storage.read_bytes(storage.join(staging, MANIFEST))).get("job_id")
        except (OSError, ValueError):
            job_id = None
        if job_id and job_id in (output_job_id(output), (commit.read_success(files) or {}).get("job_id")):
            return
    raise UsageError(f"output {output} exists: pass --overwrite to replace it, or choose another path with -o")


def _dtype_name(config: RunConfig, gpu: bool) -> str:
    import torch

    from ..models.checkpoint import resolve_dtype

    return str(resolve_dtype(config.dtype, torch.device("cuda" if gpu else "cpu"))).removeprefix("torch.")


def _manifest(config: RunConfig, plan: InputPlan, model: dict, gpu: bool, schema,
              calibration: calibrate.Calibration | None) -> dict:
    """What identifies the job, as the local engine's manifest does (resume.py compares them)."""
    batch_size = config.batch_size or (CUDA_BATCH_SIZE if gpu else CPU_BATCH_SIZE)
    return {
        "inputs": input_fingerprint(plan),
        "model": model,
        # what changes answers, batching included (it moves floating-point rounding); not the shard size
        "options": {**answer_identity(config, calibration), "engine": "ray", "device": "cuda" if gpu else "cpu",
                    "dtype": _dtype_name(config, gpu), "batch_size": batch_size,
                    "max_batch_tokens": config.max_batch_tokens or batch_size * config.max_seq_len,
                    "rows_per_window": config.rows_per_window},
        "schema": schema.to_string(),
        "versions": versions(config),
    }


def _rows(ranges: list[Range]) -> int:
    return sum(b - a for a, b in ranges)


def _shard_files(files: str) -> dict[Range, str]:
    """The shard files present, by row range; leftovers of writes cut short are deleted."""
    found: dict[Range, str] = {}
    if not storage.is_dir(files):
        return found
    for f in storage.list_files(files):
        name = storage.basename(f)
        if name.endswith(".inprogress"):
            storage.delete_file(f)
        elif (r := parse_shard_name(name)) is not None:
            found[r] = f
    return found


def _shards_left(files: str, total: int) -> list[Range]:
    """The row ranges no shard file holds; files that repeat rows another holds, or that cannot
    be read (cut short by a power loss), are deleted."""
    storage.make_dirs(files)
    found = _shard_files(files)
    for r, path in list(found.items()):
        if not readable(path):
            storage.delete_file(path)
            del found[r]
    _, redundant, missing = tile(list(found), total)
    for r in redundant:
        storage.delete_file(found[r])
    return missing


def _check_rows(files: str, total: int, per_row: Count, wide: bool = False) -> dict:
    """Before the commit: every row in exactly one shard file, each file's row count as its name
    says (from the footers). Returns the counts over all files; RuntimeFailure (exit 3) if not.
    With a question list a shard of n input rows holds n x questions answers, in as many rows
    (or in n rows with --wide); `per_row` is what one input row gives."""
    found = _shard_files(files)
    if found and faults.lose("ray_commit", found[min(found)]):  # tests: a shard file that went missing
        found = _shard_files(files)
    kept, redundant, missing = tile(list(found), total)
    for r in redundant:
        storage.delete_file(found[r])
    if missing:
        gaps = ", ".join(f"[{a}, {b})" for a, b in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise RuntimeFailure(
            f"{_rows(missing)} of the {total} planned rows have no shard file in {files} (rows {gaps}); "
            f"the {len(kept)} finished shards are kept: rerun the same command to answer the missing rows")
    if total == 0:
        kept = [(0, 0)]

    def footer(r: Range) -> tuple[Range, int, dict]:
        try:
            meta = open_parquet(found[r]).metadata
        except pa.ArrowInvalid:  # cut short (a power loss): answered again by the rerun
            storage.delete_file(found[r])
            raise RuntimeFailure(f"{found[r]} could not be read and was deleted: rerun the same command to "
                                 "answer its rows again") from None
        return r, meta.num_rows, json.loads((meta.metadata or {}).get(METADATA_KEY, b"{}")).get("shard", {})

    counts = dict.fromkeys(_COUNTS, 0)
    with concurrent.futures.ThreadPoolExecutor(16 if storage.is_uri(files) else 1) as pool:
        for (a, b), n, shard in pool.map(footer, kept):
            expected = (b - a) * (1 if wide else per_row.answers)
            if n != expected or shard.get("rows") != (b - a) * per_row.answers:
                raise RuntimeFailure(f"{found[(a, b)]} holds {n} rows where its name says {expected}: delete it "
                                     "and rerun the same command to answer its rows again")
            for k in _COUNTS:
                counts[k] += shard.get(k, 0)
    return counts


def _reduce(rj: RayJob, shape: OutputShape, metadata: dict) -> dict:
    """With documents: the shards of pairs, in row order, reduced by document into files/ (one file,
    streamed: memory holds the documents' best candidates, not the pairs). Returns their counts."""
    import pyarrow.parquet as pq

    found = _shard_files(rj.shards)
    kept = tile(list(found), rj.job.total_rows)[0] if rj.job.total_rows else [(0, 0)]
    name = shard_name(0, rj.job.total_rows)
    path, tmp = storage.join(rj.files, name), storage.join(rj.files, f".{name}.inprogress")
    counts: dict = {}
    storage.make_dirs(rj.files)
    meta = {**metadata, "model": rj.model, "shard": {"start": 0, "end": rj.job.total_rows}}
    try:
        fs, inner = storage.locate(tmp)
        with pq.ParquetWriter(inner, shape.schema, compression="zstd", filesystem=fs) as writer:
            for table in shape.assemble((storage.read_table(found[r], schema=shape.window_schema) for r in kept),
                                        counts):
                writer.write_table(table)
            writer.add_key_value_metadata({METADATA_KEY: json.dumps(meta).encode()})
        storage.sync(tmp)
        storage.move(tmp, path)
    except OSError as e:
        raise RuntimeFailure(f"could not write {path}: {e.strerror or e}. The finished shards are kept in "
                             f"{rj.shards}: fix the cause and rerun the same command to finish") from None
    return counts


def _summary_from(success: dict, output: str) -> RunSummary:
    return RunSummary.from_dict({**success, "output": output})


def _pool(ray, actors: ActorPlan, max_actors: int):
    """A fixed pool, or one that starts with what the cluster holds and grows as nodes join."""
    if actors.fixed:
        return ray.data.ActorPoolStrategy(size=actors.actors)
    try:
        return ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors, initial_size=actors.actors)
    except TypeError:  # Ray before initial_size
        return ray.data.ActorPoolStrategy(min_size=actors.actors, max_size=max_actors)


_END = object()


def _answer_shards(cluster: RayConnection, shards: list[Range], actors: ActorPlan, max_actors: int, rj: RayJob,
                   metadata: dict, before: Count, stop_requested: threading.Event | None) -> dict:
    """Run the shards on the actor pool; return this run's counts. Finished shards are files by now.

    Stopped or failed, the job is cancelled by ending the Ray connection (RayConnection's exit,
    when this process made it): the cluster then ends the job's actors; their finished shards are kept."""
    ray, config, plan, files = cluster.ray, rj.config, rj.job.plan, rj.shards
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": ours show
    if not storage.is_uri(files):
        files = os.path.abspath(files)
    if not any(storage.is_uri(f) for f in plan.files):
        plan = dataclasses.replace(plan, files=tuple(os.path.abspath(f) for f in plan.files))
    ds = ray.data.from_items([{"start": a, "end": b} for a, b in shards], override_num_blocks=len(shards)).map_batches(
        RayAnswerer, batch_size=1, compute=_pool(ray, actors, max_actors), num_cpus=actors.cpus,
        num_gpus=1 if actors.gpu else 0,
        fn_constructor_kwargs={"config": config, "plan": plan, "metadata": metadata, "threads": actors.threads,
                               "files": files, "model": rj.model, "shape": rj.job.file_shape,
                               "calibration": rj.job.calibration})  # Ray Data restarts lost actors, redoes their shards
    results: queue.Queue = queue.Queue()

    def consume() -> None:  # its own thread, so that the driver can stop waiting at any time
        try:
            for row in ds.iter_rows():
                results.put(row)
            results.put(_END)
        except BaseException as e:  # handed to the driver thread
            results.put(e)

    consumer = threading.Thread(target=consume, name="qa-batch-ray-results", daemon=True)
    consumer.start()
    cluster.waiting.append(consumer)
    this_run = collections.Counter({k: 0 for k in _COUNTS})
    this_run_stages: collections.Counter = collections.Counter()
    bar = tqdm(total=rj.job.total_rows, initial=before.rows, unit="row", dynamic_ncols=True,
               disable=config.quiet or not sys.stderr.isatty())
    try:
        while True:
            if stop_requested is not None and stop_requested.is_set():
                raise Interrupted(before + plan.count_answers(this_run["rows"]), rj.job.parts.path)
            try:
                item = results.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is _END:
                return {**this_run, "stages": dict(this_run_stages)}
            if isinstance(item, BaseException):
                raise _job_failure(item, files)
            this_run.update({k: int(item[k]) for k in (*_COUNTS, "oom_splits")})
            this_run_stages.update(json.loads(item["stages"]))
            this_run["peak_rss_mb"] = max(this_run.get("peak_rss_mb", 0), float(item["peak_rss_mb"]))
            bar.update(plan.count_answers(int(item["rows"])).rows)  # the bar counts input rows
            faults.point("ray_shard_done")
    finally:
        bar.close()


_OUR_ERROR = re.compile(r"^pipeline\.errors\.(UsageError|RuntimeFailure): (.+)$", re.M)
_ANY_ERROR = re.compile(r"^([\w.]*\w(?:Error|Exception|Failure|Interrupt|Exit)): (.+)$", re.M)


def _job_failure(e: BaseException, files: str) -> QaBatchError:
    """What failed, from what Ray raised: an actor's error reaches the driver as a traceback in
    text (the exception object stays behind), so the first error line of it is the cause."""
    seen, cause = set(), e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, QaBatchError):
            return cause
        seen.add(id(cause))
        cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    ours = _OUR_ERROR.search(text)
    if ours:
        return (UsageError if ours.group(1) == "UsageError" else RuntimeFailure)(f"in a Ray actor: {ours.group(2)}")
    first = _ANY_ERROR.search(text)
    said = f"{first.group(1)}: {first.group(2)}" if first else (text.strip().splitlines() or [type(e).__name__])[0]
    return RuntimeFailure(f"the Ray job failed: {said}. " + shards_kept(files, "rerun the same command"))
