"""The Ray engine: the same stages as the local engine, run by Ray Data actors.

    shards of rows -> map_batches(RayAnswerer actors) -> write_parquet(output directory)

Each actor loads the model once (in __init__) and answers whole windows of
`--rows-per-window` rows with `Stages.answer_window`, the code the local engine runs. The
dataset's items are shards, row ranges of `--rows-per-batch` rows in whole windows, rather
than rows read by ray.data.read_parquet: an actor reads its shard itself (from the row
group holding its first row, through storage.py, so s3:// works on every node), rows keep
their global row numbers, and the windows, hence the batches and the answers, are
exactly those of a local run. The output is a directory of Parquet files (one per shard)
with the local engine's schema and metadata; their union is the local output's table.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time

from . import __version__, faults, storage
from .config import RunConfig
from .engine import RunSummary, Stages, _reported, check_options, default_output
from .errors import RuntimeFailure, UsageError
from .model import load_model
from .resume import work_dir_for
from .read import InputPlan, plan_inputs, read_windows
from .workers import balanced_shard_rows, split_ranges
from .write import count_answers, output_schema


class RayAnswerer:
    """A Ray Data actor: one model, many windows."""

    def __init__(self, config: RunConfig, plan: InputPlan, metadata: dict, threads: int):
        import torch

        torch.set_num_threads(threads)
        import ray

        device = "cuda" if ray.get_gpu_ids() else ("cpu" if config.device == "auto" else config.device)
        self.config, self.plan = config, plan
        loaded = load_model(config.model, device, config.dtype, config.quantize)
        self.stages = Stages.build(config, loaded, cpu_workers=threads)  # CPU: one thread per worker
        # each file's metadata: the driver's (version, options, start) and this actor's model and device
        metadata = {**metadata, "model": loaded.identity, "device": str(loaded.device), "dtype": loaded.dtype_name}
        self.schema = output_schema(plan, config.top_k).with_metadata({b"qa_batch": json.dumps(metadata).encode()})

    def __call__(self, batch: dict):
        import pyarrow as pa

        tables = []
        for start, end in zip(batch["start"], batch["end"]):
            for rows in read_windows(self.plan, self.config.rows_per_window, int(end), int(start)):
                faults.once("ray_window")
                tables.append(self.stages.answer_window(rows, self.schema, self.plan.id_col))
        return pa.concat_tables(tables)


def default_output_dir(inputs: tuple[str, ...], files: tuple[str, ...]) -> str:
    out = default_output(inputs, files)
    return out.replace(".answers.parquet", ".answers", 1)


def run_ray(config: RunConfig) -> RunSummary:
    """Answer every row on a Ray cluster (or a local Ray instance) into an output directory."""
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray Data: pip install 'qa-batch[ray]'") from None
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    check_options(config)
    plan = plan_inputs(config.inputs, config.passage_col, config.question_col, config.id_col, config.keep_columns)
    output = config.output or default_output_dir(config.inputs, plan.files)
    if config.devices:
        raise UsageError("--devices is for the local engine; with --engine ray, --num-gpus sets the GPU actors")
    if config.rows_per_batch is not None and config.rows_per_batch < 1:
        raise UsageError(f"--rows-per-batch {config.rows_per_batch}: must be at least 1")
    if storage.exists(output) and not config.overwrite:
        raise UsageError(f"output {output} exists: pass --overwrite to replace it, or choose another path with -o")
    staging = work_dir_for(output)  # the files are written here, then moved into place at the end
    storage.delete(staging)  # left by a failed Ray run: Ray runs start over rather than resume
    total = plan.total_rows if config.limit is None else min(config.limit, plan.total_rows)
    metadata = {"qa_batch_version": __version__, "engine": "ray", "options": config.as_dict(),
                "started_at": started_at}

    gpu = config.num_gpus > 0
    actors = config.num_gpus if gpu else (config.cpu_workers or 1)
    cpus = config.num_cpus_per_worker or (1.0 if gpu else 0.5)  # fractional: leave room for Ray's own tasks
    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k.startswith(("QA_BATCH_", "HF_"))}
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, runtime_env={"env_vars": env} if env else None)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    whole = [(0, total)] if total else []
    items = [{"start": a, "end": b} for a, b in split_ranges(
        whole, config.rows_per_window, config.rows_per_batch or balanced_shard_rows(whole, actors))]
    try:
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            RayAnswerer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus, num_gpus=1 if gpu else 0,
            fn_constructor_kwargs={"config": config, "plan": plan, "metadata": metadata,
                                   "threads": max(1, int(cpus))})  # Ray Data restarts lost actors, redoes their windows
        fs, path = storage.locate(staging)
        ds.write_parquet(path, filesystem=fs)
    except Exception as e:  # Ray wraps worker errors in its own types
        raise RuntimeFailure(f"the Ray job failed: {e}; the previous output, if any, is untouched") from None
    c = count_answers(storage.read_table(staging, columns=["answer", "error", "chunks"]))
    storage.delete(output)  # --overwrite: yesterday's answers are replaced only now
    storage.move_tree(staging, output)
    elapsed = time.perf_counter() - started
    summary = RunSummary(
        output=output, elapsed_s=round(elapsed, 3),
        rows_per_s=round(c["rows"] / elapsed, 2), chunks_per_s=round(c["chunks"] / elapsed, 2),
        started_at=started_at, device="ray",
        finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    summary.set_counts(c, c)  # no resume: this run answered every row
    return _reported(summary, config)
