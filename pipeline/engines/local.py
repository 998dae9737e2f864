"""The local engine, start to end: plan the job, load the model, answer the rows, assemble.

    job.py     plan: options, inputs, output, the work directory of parts
    models/checkpoint.py   load the checkpoint on its device
    chain.py   chunk -> batch -> infer -> decode -> merge, set up for this model
    loop.py    the threads that run them over every window, writing parts
    job.py     assemble the parts into the output; report.py: the summary

With several devices (--devices, or every visible GPU) workers.py runs one process per
device instead; --engine ray runs the same stages in Ray actors (ray_engine.py).
"""

from __future__ import annotations

import collections
import resource
import sys
import threading
import time

import torch
from tqdm import tqdm

from ..config import RunConfig
from ..errors import Interrupted
from ..models import onnx_backend
from ..models.checkpoint import LoadedModel, devices_for, load_model
from .chain import Stages
from .job import Job, check_max_seq_len
from .loop import answer_ranges
from .report import Progress, RunSummary, bottleneck, current_rss_mb, padding_efficiency
from .workers import run_on_devices


def run(config: RunConfig, loaded: LoadedModel | None = None,
        stop_requested: threading.Event | None = None) -> RunSummary:
    """Answer every row of the inputs and write the output; raise QaBatchError on failure.

    Finished windows are kept as parts in `<output>.partial/`, so rerunning the same
    command after a failure or an interruption goes on where it stopped. Setting
    `stop_requested` stops the run after the batches in flight (raises Interrupted).
    With several devices (--devices, or every visible GPU) one worker process runs per
    device (workers.py).
    """
    job = Job.plan_for(config)
    config = job.config  # --backend auto decided
    job.check_output()
    devices = config.devices or devices_for(onnx_backend.device_spec(config, config.device))
    if loaded is None and len(devices) > 1:
        return run_on_devices(job, devices, stop_requested)

    t_load = time.perf_counter()
    loaded = loaded or load_model(config.model, devices[0], config.dtype, config.quantize)
    loaded = onnx_backend.prepared(loaded, config)  # exported or taken from the cache: load time too
    t_load = time.perf_counter() - t_load
    model_rss_mb = current_rss_mb()
    check_max_seq_len(config, loaded.max_positions)
    cores = torch.get_num_threads()  # what torch would use: on the CPU, one worker per core
    stages_ = Stages.build(config, loaded, config.cpu_workers or cores, job.calibration)  # pool starts on first use
    metadata = job.metadata(loaded.identity, str(loaded.device), loaded.dtype_name)
    todo = job.open_parts(loaded.identity, loaded.device.type, loaded.dtype_name, stages_.batch_size,
                          stages_.max_batch_tokens)
    if todo is None:
        stages_.predictor.close()
        return job.already_done()
    done_before = job.plan.count(job.total_rows - sum(end - start for start, end in todo))
    predictor = stages_.predictor
    progress = Progress(stages=collections.Counter(load_model=t_load))
    bar = tqdm(total=job.total_rows, initial=done_before.rows, unit="row", dynamic_ncols=True,
               disable=config.quiet or not sys.stderr.isatty())
    try:
        chunks = [0]

        def chunks_done(n: int) -> None:  # a bar that moves on long passages too (rows finish per window)
            chunks[0] += n
            bar.set_postfix_str(f"{chunks[0]} chunks", refresh=True)

        answer_ranges(stages_, job.target(), todo, progress, bar.update, stop_requested, on_batch=chunks_done)
    except Interrupted as e:
        raise Interrupted(done_before + e.done, e.work_dir) from None
    finally:
        bar.close()
        predictor.close()

    summary = RunSummary(output=job.output, backend=job.config.backend, device=metadata["device"], dtype=metadata["dtype"],
                         started_at=job.started_at, model_rss_mb=model_rss_mb, resumed_from_row=done_before.answers,
                         questions_per_row=job.plan.questions_per_row)
    summary.padding_efficiency = padding_efficiency(progress)
    summary.oom_splits = predictor.stats.oom_splits
    summary.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summary.stage_seconds = {k: round(v, 3) for k, v in sorted(progress.stages.items())}
    summary.bottleneck = bottleneck(summary.stage_seconds)
    return job.finish(summary, metadata, progress)
