"""The local engine: wires read -> chunk -> batch -> infer -> decode -> merge -> write.

Two threads overlap the work. A producer thread reads windows of rows, tokenizes them
and pads batches (the Rust tokenizer releases the GIL, so this runs beside the model);
the calling thread runs the model and the span search, keeps up to two batches in flight
on CUDA so the GPU never waits for a copy, merges finished windows and writes them.
A bounded queue between the two keeps memory flat however large the input is.
"""

from __future__ import annotations

import collections
import datetime as dt
import glob
import json
import os
import queue
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import pyarrow as pa
import torch
from tqdm import tqdm

from . import __version__, calibrate, faults, onnx_backend, storage
from .batch import HostBatch, collate, plan_batches
from .chunk import ChunkSet, Chunker
from .config import RunConfig
from .errors import Interrupted, UsageError
from .infer import Predictor
from .merge import RowAnswer, WindowSpans, merge_window
from .model import LoadedModel, load_model
from .questions import plan_questions
from .read import InputPlan, RowBatch, plan_inputs, read_windows
from .resume import Opened, WorkDir, input_fingerprint, work_dir_for
from .wide import Pivot
from .wording import plural
from .write import answers_table, output_schema, read_metadata

CPU_BATCH_SIZE = 4  # per CPU worker: small batches stay in cache and win (BENCHMARKS.md)
CUDA_BATCH_SIZE = 256


@dataclass
class RunSummary:
    """What a run did; printed as one line, written by --report, stored in the output."""

    output: str
    rows: int = 0
    chunks: int = 0
    answered: int = 0
    null: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    rows_per_s: float = 0.0
    chunks_per_s: float = 0.0
    padding_efficiency: float = 1.0  # real tokens / padded tokens fed to the model
    oom_splits: int = 0
    resumed_from_row: int = 0  # rows earlier, interrupted runs had answered (with gaps: not a row number)
    rows_this_run: int = 0  # rows answered by this run (the rest came from earlier parts)
    chunks_this_run: int = 0  # and their chunks, answers, nulls and errors
    answered_this_run: int = 0
    null_this_run: int = 0
    errors_this_run: int = 0
    peak_rss_mb: float = 0.0  # the process's peak resident memory, model included
    model_rss_mb: float = 0.0  # resident memory once the model was loaded, before any row
    device: str = ""
    dtype: str = ""
    started_at: str = ""
    finished_at: str = ""
    stage_seconds: dict = field(default_factory=dict)
    bottleneck: str = ""  # the stage that set the pace (see bottleneck())

    def line(self) -> str:
        """This run's counts, time and rates, on which device; after a resume, the totals too."""
        def counts(rows: int, answered: int, null: int, errors: int, chunks: int) -> str:
            return (f"{plural(rows, 'row')} ({answered} answered, {null} null, {plural(errors, 'error')}), "
                    f"{plural(chunks, 'chunk')}")

        this_run = counts(self.rows_this_run, self.answered_this_run, self.null_this_run, self.errors_this_run,
                          self.chunks_this_run)
        on = f" on {self.device}" if self.device else ""
        text = (f"qa-batch: {this_run} in {self.elapsed_s:.1f} s{on}: "
                f"{self.rows_per_s:.1f} rows/s, {self.chunks_per_s:.1f} chunks/s")
        if self.resumed_from_row:
            text += (f"; with the {plural(self.resumed_from_row, 'row')} answered before, "
                     f"{counts(self.rows, self.answered, self.null, self.errors, self.chunks)} in all")
        return f"{text} -> {self.output}"

    def set_counts(self, total: dict, this_run: dict) -> None:
        """The counts over every part of the output, and over the rows this run answered
        (each a dict with rows, chunks, answered and errors)."""
        self.rows, self.chunks, self.answered, self.errors = (total[k] for k in _COUNTS)
        self.null = self.rows - self.answered - self.errors
        self.rows_this_run, self.chunks_this_run, self.answered_this_run, self.errors_this_run = (
            this_run[k] for k in _COUNTS)
        self.null_this_run = self.rows_this_run - self.answered_this_run - self.errors_this_run

    def as_dict(self) -> dict:
        return asdict(self)


_COUNTS = ("rows", "chunks", "answered", "errors")


@dataclass
class _WindowStart:
    rows: RowBatch
    chunks: ChunkSet
    n_batches: int


_DONE = object()


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError):  # not Linux
        return 0.0


def default_output(inputs: tuple[str, ...], files: tuple[str, ...]) -> str:
    """<stem>.answers.parquet beside the first input (beside, not inside, a directory)."""
    first = inputs[0]
    if storage.is_dir(first):
        return storage.with_suffix(first.rstrip("/") if storage.is_uri(first) else os.path.normpath(first),
                                   ".answers.parquet")
    path = first if storage.is_file(first) else files[0]
    stem = storage.basename(path).removesuffix(".parquet")
    return storage.join(storage.parent(path), stem + ".answers.parquet")


def check_options(c: RunConfig) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise UsageError(msg)

    need(c.max_seq_len >= 8, f"--max-seq-len {c.max_seq_len}: must be at least 8")
    need(0 <= c.doc_stride < c.max_seq_len, f"--doc-stride {c.doc_stride}: must be >= 0 and below --max-seq-len ({c.max_seq_len})")
    need(c.max_answer_len >= 1, f"--max-answer-len {c.max_answer_len}: must be at least 1")
    need(c.top_k >= 1, f"--top-k {c.top_k}: must be at least 1")
    need(c.max_question_len >= 1, f"--max-question-len {c.max_question_len}: must be at least 1")
    need(c.batch_size is None or c.batch_size >= 1, f"--batch-size {c.batch_size}: must be at least 1")
    need(c.max_batch_tokens is None or c.max_batch_tokens >= 1, "--max-batch-tokens must be at least 1")
    need(c.limit is None or c.limit >= 0, f"--limit {c.limit}: must be >= 0")
    need(c.rows_per_window >= 1, "--rows-per-window must be at least 1")
    need(c.cpu_workers is None or c.cpu_workers >= 1, "--cpu-workers must be at least 1")
    onnx_backend.check_options(c)  # --backend: known, on the CPU, installed
    if c.calibration:
        check_calibration(c, calibrate.load(c.calibration))


def check_calibration(c: RunConfig, cal: calibrate.Calibration, loaded: LoadedModel | None = None) -> None:
    """Before the model is loaded (loaded=None), what the options tell; after, model and dtype too."""
    where = f"--calibration {c.calibration}"
    if c.null_threshold != 0.0:
        raise UsageError(f"{where} sets the null threshold (its null bias): drop --null-threshold")
    if c.allow_null and cal.null_bias is None:
        raise UsageError(f"{where} was fitted on rows without unanswerable questions and gives no null answers: "
                         "drop --allow-null, or fit it on a sample with unanswerable questions")
    from .model import content_hash

    options = {k: v for k, v in c.answer_options().items() if k != "dtype" or v != "auto"}
    if loaded is not None:
        options["dtype"] = loaded.dtype_name
        model = loaded.identity
    elif os.path.isdir(c.model):
        model = {"id": c.model, "revision": content_hash(c.model)}
    else:
        model = None  # a hub id: checked once loaded, when its revision is known
    differences = cal.mismatches(model, options)
    if differences and not c.force_calibration:
        raise UsageError(f"{where} was fitted for another run: " + "; ".join(differences) +
                         ". Fit one for this model and these options (qa-batch eval --fit-calibration), or "
                         "pass --force-calibration to apply it anyway")
    if differences and loaded is not None:
        import logging

        logging.getLogger("qa_batch").warning("applying %s fitted for another run (--force-calibration): %s",
                                              where, "; ".join(differences))


def questions_metadata(plan: InputPlan) -> dict:
    """The question list every row was asked, as the output's metadata holds it (nothing without one)."""
    return {"questions": plan.questions.as_dict()} if plan.questions is not None else {}


def calibration_metadata(c: RunConfig) -> dict:
    """What an output's metadata says about the calibration applied (nothing without one)."""
    return {"calibration": calibrate.load(c.calibration).describe(c.calibration)} if c.calibration else {}


def check_output(path: str, plan: InputPlan, overwrite: bool) -> None:
    if not storage.is_uri(path):  # object stores have no folders to check
        directory = storage.parent(path)
        if not os.path.isdir(directory):
            raise UsageError(f"output directory {directory} does not exist")
        if not os.access(directory, os.W_OK):
            raise UsageError(f"output directory {directory} is not writable")
    try:
        if storage.is_dir(path):
            raise UsageError(f"output {path} is a directory: give a file path with -o")
        if any(storage.identity(f) == storage.identity(path) for f in plan.files):
            raise UsageError(f"output {path} is also an input: choose another path with -o")
        if storage.exists(path) and not overwrite:
            raise UsageError(f"output {path} exists: pass --overwrite to replace it, or choose another path with -o")
    except OSError as e:
        raise UsageError(f"output {path} cannot be checked: {e}") from None


def check_apart_from_inputs(output: str, inputs: tuple[str, ...], files: tuple[str, ...]) -> None:
    """Refuse an output that is an input, holds one (--overwrite would delete it), or lies inside
    an input directory (the next run would read the answers as input). Both engines."""
    for f in files:
        if storage.within(f, output):
            what = "is also an input" if storage.within(output, f) else f"contains the input {f}"
            raise UsageError(f"output {output} {what}: choose another path with -o")
    for spec in inputs:
        if not glob.has_magic(spec) and storage.within(output, spec) and storage.is_dir(spec):
            raise UsageError(f"output {output} lies inside the input directory {spec}, so the next run would "
                             "read the answers as input: choose a path outside it with -o")


@dataclass
class Stages:
    """The chunk -> batch -> infer -> merge stages set up for one model and one run's options.

    The local engine pipelines them over threads; `answer_window` runs them in order on one
    window, which is what each Ray actor does (ray_engine.py). Same stages, same answers.
    """

    config: RunConfig
    loaded: LoadedModel
    chunker: Chunker
    predictor: Predictor
    batch_size: int
    max_batch_tokens: int
    chunk_k: int  # spans kept per chunk: top_k, at least 2 for the runner-up (each span has one owner chunk)
    calibration: calibrate.Calibration | None = None  # --calibration: null bias and calibrated confidence

    @classmethod
    def build(cls, config: RunConfig, loaded: LoadedModel, cpu_workers: int = 1) -> "Stages":
        loaded = onnx_backend.prepared(loaded, config)  # --backend onnxruntime: its session replaces the model
        cal = calibrate.load(config.calibration) if config.calibration else None
        if cal is not None:
            check_calibration(config, cal, loaded)
        on_cuda = loaded.device.type == "cuda"
        batch_size = config.batch_size or (CUDA_BATCH_SIZE if on_cuda else CPU_BATCH_SIZE)
        chunk_k = max(config.top_k, 2)
        return cls(
            config=config, loaded=loaded,
            chunker=Chunker(loaded.tokenizer, config.max_seq_len, config.doc_stride,
                            config.max_question_len if config.truncate_question else None),
            predictor=Predictor(loaded.model, loaded.device, config.max_answer_len, chunk_k,
                                workers=1 if on_cuda else cpu_workers),
            batch_size=batch_size,
            max_batch_tokens=config.max_batch_tokens or batch_size * config.max_seq_len,
            chunk_k=chunk_k,
            calibration=cal,
        )

    @property
    def on_cuda(self) -> bool:
        return self.loaded.device.type == "cuda"

    def batch_plan(self, chunks: ChunkSet) -> list:
        """Which chunks of a window each batch takes, longest first."""
        return plan_batches(chunks.lengths, self.batch_size, self.max_batch_tokens)

    def collate(self, chunks: ChunkSet, index) -> HostBatch:
        """One planned batch, padded on the host."""
        tok = self.loaded.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        pad_left = getattr(tok, "padding_side", "right") == "left"
        return collate(chunks, index, self.loaded.input_names, pad_id, pad_left,
                       pad_multiple=8 if self.on_cuda else 1, pin=self.on_cuda)

    def batches(self, chunks: ChunkSet):
        """Padded host batches of a window's chunks, longest first (each padded when taken)."""
        for index in self.batch_plan(chunks):
            yield self.collate(chunks, index)

    def merge(self, rows: RowBatch, chunks: ChunkSet, spans: WindowSpans) -> list[RowAnswer]:
        c, cal = self.config, self.calibration
        if cal is None:
            return merge_window(rows.passages, chunks, spans, c.top_k, c.allow_null, c.null_threshold)
        # the calibration's null bias is the null threshold; then its confidence replaces the softmax share
        answers = merge_window(rows.passages, chunks, spans, c.top_k, cal.null_bias is not None,
                               cal.null_bias or 0.0)
        return calibrate.apply_to_answers(cal, answers)

    def answer_window(self, rows: RowBatch, schema: pa.Schema, id_col: str | None) -> pa.Table:
        """All stages, in order, for one window of rows: its output table."""
        chunks = self.chunker(rows.passages, rows.questions)
        spans = WindowSpans.empty(len(chunks), self.chunk_k)
        for hb in self.batches(chunks):
            spans.store(hb, self.predictor.collect(self.predictor.submit(hb)), chunks)
        return answers_table(schema, rows, self.merge(rows, chunks, spans), self.config.top_k, id_col)


@dataclass
class Job:
    """A run as planned before any model work: inputs, output, the parts kept so far, schema."""

    config: RunConfig
    plan: InputPlan
    output: str
    parts: WorkDir
    schema: pa.Schema
    total_rows: int  # input rows to answer (with a question list, each gives one answer per question)
    started: float  # perf_counter at the start
    started_at: str
    pivot: Pivot | None = None  # --wide: the output's shape; parts stay long

    @classmethod
    def plan_for(cls, config: RunConfig) -> "Job":
        started = time.perf_counter()
        started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        check_options(config)
        questions = plan_questions(config)
        plan = plan_inputs(config.inputs, config.passage_col, config.question_col, config.id_col,
                           config.keep_columns, questions)
        output = config.output or default_output(config.inputs, plan.files)
        check_apart_from_inputs(output, config.inputs, plan.files)
        total = plan.total_rows if config.limit is None else min(config.limit, plan.total_rows)
        schema = output_schema(plan, config.top_k)
        return cls(config, plan, output, WorkDir(work_dir_for(output)), schema, total, started, started_at,
                   Pivot.build(schema, questions) if config.wide else None)

    def check_output(self) -> None:
        """Before any model work: the output path is usable (an output this job wrote may stay)."""
        check_output(self.output, self.plan, self.config.overwrite or self.parts.wrote(self.output))

    def metadata(self, model: dict, device: str, dtype: str) -> dict:
        return {"qa_batch_version": __version__, "model": model, "options": self.config.as_dict(),
                "device": device, "dtype": dtype, "started_at": self.started_at,
                **calibration_metadata(self.config), **questions_metadata(self.plan)}

    def open_parts(self, model: dict, device_type: str, dtype: str, batch_size: int,
                   max_batch_tokens: int) -> list[tuple[int, int]]:
        """Create or check the work directory; return the row ranges still to answer.

        None when this job's output is already in place (a run killed while cleaning up):
        `already_done` then gives its summary."""
        c = self.config
        opened = self.parts.open({
            "inputs": input_fingerprint(self.plan),
            "model": model,
            # what changes answers, batching included (it moves floating-point rounding)
            "options": {**c.answer_options(), "device": device_type, "dtype": dtype, "batch_size": batch_size,
                        "max_batch_tokens": max_batch_tokens, "rows_per_window": c.rows_per_window},
            "schema": self.schema.to_string(),
        }, c.restart, self.output)
        if opened is Opened.FINISHED:
            return None
        if opened is Opened.NEW and storage.exists(self.output) and not c.overwrite:
            # leftovers of another, finished job were cleared: its output is not ours to replace
            raise UsageError(f"output {self.output} exists: pass --overwrite to replace it, "
                             "or choose another path with -o")
        return self.parts.todo(self.total_rows, c.rows_per_window)

    def already_done(self) -> RunSummary:
        """The summary stored in this job's output; the work directory's leftovers removed."""
        self.parts.remove()
        return _reported(RunSummary(**{**read_metadata(self.output)["summary"], "output": self.output}),
                         self.config)

    def finish(self, summary: RunSummary, metadata: dict, this_run: Progress) -> RunSummary:
        """Assemble the parts into the output; the summary counts every part and this run's rows,
        its rates are this run's."""
        elapsed = time.perf_counter() - self.started
        summary.elapsed_s = round(elapsed, 3)
        summary.rows_per_s = round(this_run.rows / elapsed, 2) if elapsed else 0.0
        summary.chunks_per_s = round(this_run.chunks / elapsed, 2) if elapsed else 0.0
        summary.finished_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()

        def final_metadata(counts: dict) -> bytes:
            summary.set_counts(counts, this_run.as_dict())  # counts: every part, earlier runs' too
            return json.dumps({**metadata, "job_id": self.parts.job_id, "finished_at": summary.finished_at,
                               "summary": summary.as_dict()}).encode()

        self.parts.assemble(self.output, self.schema, final_metadata, self.pivot)
        summary.stage_seconds["assemble"] = round(time.perf_counter() - t0, 3)
        return _reported(summary, self.config)


@dataclass
class Progress:
    """What one process answered: counts, tokens and seconds per stage."""

    rows: int = 0
    chunks: int = 0
    answered: int = 0
    errors: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    stages: collections.Counter = field(default_factory=collections.Counter)

    def add(self, other: dict) -> None:
        for key in ("rows", "chunks", "answered", "errors", "real_tokens", "padded_tokens"):
            setattr(self, key, getattr(self, key) + other[key])
        self.stages.update(other["stages"])

    def as_dict(self) -> dict:
        return {**asdict(self), "stages": dict(self.stages)}


def answer_ranges(stages_: Stages, job: Job, ranges: Iterable[tuple[int, int]], progress: Progress,
                  on_window: Callable[[int], None], stop_requested=None) -> None:
    """Answer the rows of `ranges` ([start, end), whole windows) and write each window as a part.

    A producer thread reads, tokenizes and pads batches (the Rust tokenizer releases the GIL);
    this thread runs the model, merges finished windows and writes them. `ranges` may be a
    lazy iterator (worker processes take them from a queue). Setting `stop_requested`
    stops after the batches in flight; whole windows are kept, then Interrupted is raised.
    """
    config, plan, parts, predictor = job.config, job.plan, job.parts, stages_.predictor
    stages = progress.stages

    # ---- producer: read, chunk, batch (its own thread) ----
    work: queue.Queue = queue.Queue(maxsize=16)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                work.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            for start, end in ranges:
                windows = read_windows(plan, config.rows_per_window, end, start)
                while not stop.is_set():
                    t0 = time.perf_counter()
                    rows = next(windows, None)
                    if rows is None:
                        break
                    t1 = time.perf_counter()
                    faults.point("read")
                    chunks = stages_.chunker(rows.passages, rows.questions)
                    t2 = time.perf_counter()
                    planned = stages_.batch_plan(chunks)
                    stages["read"] += t1 - t0
                    stages["tokenize"] += t2 - t1
                    stages["batch"] += time.perf_counter() - t2
                    put(_WindowStart(rows, chunks, len(planned)))
                    for index in planned:  # padded one at a time: the queue bounds host memory, not the window
                        t3 = time.perf_counter()
                        hb = stages_.collate(chunks, index)
                        stages["batch"] += time.perf_counter() - t3
                        put(hb)
                        if stop.is_set():
                            return
                if stop.is_set():
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    producer = threading.Thread(target=produce, name="qa-batch-producer", daemon=True)

    # ---- consumer: infer, decode, merge, write (this thread) ----
    # Batches are submitted in order; `pending` holds those not yet collected, oldest first,
    # so windows complete in input order. A window is merged and written once all its
    # batches are collected.
    open_windows: collections.deque = collections.deque()  # [_WindowStart, WindowSpans, batches left]
    pending: collections.deque = collections.deque()  # (window entry, HostBatch, handle)
    max_in_flight = 2 if stages_.on_cuda else 2 * predictor.workers

    def collect_oldest() -> None:
        entry, hb, handle = pending.popleft()
        t0 = time.perf_counter()
        host = predictor.collect(handle)
        stages["infer_wait"] += time.perf_counter() - t0
        window, spans = entry[0], entry[1]
        spans.store(hb, host, window.chunks)
        entry[2] -= 1
        faults.point("batch")

    def finish_complete_windows(all_submitted: bool) -> None:
        # the newest window may still get batches unless everything has been submitted
        while open_windows and open_windows[0][2] == 0 and (len(open_windows) > 1 or all_submitted):
            window, spans, _ = open_windows.popleft()
            t0 = time.perf_counter()
            answers = stages_.merge(window.rows, window.chunks, spans)
            t1 = time.perf_counter()
            parts.write_part(window.rows.first_row,
                             answers_table(job.schema, window.rows, answers, config.top_k, plan.id_col))
            stages["merge"] += t1 - t0
            stages["write"] += time.perf_counter() - t1
            progress.rows += len(answers)
            progress.chunks += len(window.chunks)
            progress.errors += sum(a.error is not None for a in answers)
            progress.answered += sum(a.answer is not None for a in answers)
            on_window(window.rows.input_rows)

    try:
        producer.start()
        while True:
            if stop_requested is not None and stop_requested.is_set():
                stop.set()  # no new work; finish the batches in flight and keep whole windows
                while pending:
                    collect_oldest()
                finish_complete_windows(all_submitted=False)
                raise Interrupted(progress.rows, parts.path)
            t0 = time.perf_counter()
            try:
                item = work.get(timeout=0.2)
            except queue.Empty:
                stages["wait_for_input"] += time.perf_counter() - t0
                continue
            stages["wait_for_input"] += time.perf_counter() - t0
            if isinstance(item, BaseException):
                raise item
            if item is _DONE:
                while pending:
                    collect_oldest()
                finish_complete_windows(all_submitted=True)
                break
            if isinstance(item, _WindowStart):
                open_windows.append([item, WindowSpans.empty(len(item.chunks), stages_.chunk_k), item.n_batches])
                finish_complete_windows(all_submitted=False)
                continue
            t1 = time.perf_counter()
            handle = predictor.submit(item)
            stages["infer_launch"] += time.perf_counter() - t1
            progress.real_tokens += item.real_tokens
            progress.padded_tokens += item.padded_tokens
            pending.append((open_windows[-1], item, handle))
            while len(pending) > max_in_flight:
                collect_oldest()
            finish_complete_windows(all_submitted=False)
        producer.join()
    finally:
        stop.set()  # on failure: finished parts stay in the work directory for the next run


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
    job.check_output()
    devices = config.devices or devices_for(onnx_backend.device_spec(config, config.device))
    if loaded is None and len(devices) > 1:
        from .workers import run_on_devices
        return run_on_devices(job, devices, stop_requested)

    t_load = time.perf_counter()
    loaded = loaded or load_model(config.model, devices[0], config.dtype, config.quantize)
    loaded = onnx_backend.prepared(loaded, config)  # exported or taken from the cache: load time too
    t_load = time.perf_counter() - t_load
    model_rss_mb = _current_rss_mb()
    check_max_seq_len(config, loaded.max_positions)
    cores = torch.get_num_threads()  # what torch would use: on the CPU, one worker per core
    stages_ = Stages.build(config, loaded, config.cpu_workers or cores)  # pool starts on first use
    metadata = job.metadata(loaded.identity, str(loaded.device), loaded.dtype_name)
    todo = job.open_parts(loaded.identity, loaded.device.type, loaded.dtype_name, stages_.batch_size,
                          stages_.max_batch_tokens)
    if todo is None:
        stages_.predictor.close()
        return job.already_done()
    done_before = job.total_rows - sum(end - start for start, end in todo)  # input rows (the bar's unit)
    answered_before = done_before * job.plan.answers_per_row  # output rows, long form (the summary's)
    predictor = stages_.predictor
    progress = Progress(stages=collections.Counter(load_model=t_load))
    bar = tqdm(total=job.total_rows, initial=done_before, unit="row", dynamic_ncols=True,
               disable=config.quiet or not sys.stderr.isatty())
    try:
        answer_ranges(stages_, job, todo, progress, bar.update, stop_requested)
    except Interrupted as e:
        raise Interrupted(answered_before + e.rows_done, e.work_dir) from None
    finally:
        bar.close()
        predictor.close()

    summary = RunSummary(output=job.output, device=metadata["device"], dtype=metadata["dtype"],
                         started_at=job.started_at, model_rss_mb=model_rss_mb, resumed_from_row=answered_before)
    summary.padding_efficiency = padding_efficiency(progress)
    summary.oom_splits = predictor.stats.oom_splits
    summary.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summary.stage_seconds = {k: round(v, 3) for k, v in sorted(progress.stages.items())}
    summary.bottleneck = bottleneck(summary.stage_seconds)
    return job.finish(summary, metadata, progress)


def devices_for(spec: str) -> tuple[str, ...]:
    """--device auto or cuda with several visible GPUs means all of them, one worker each."""
    if spec in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    return (spec,)


def check_max_seq_len(config: RunConfig, max_positions: int) -> None:
    if config.max_seq_len > max_positions:
        raise UsageError(
            f"--max-seq-len {config.max_seq_len} is above what {config.model} accepts "
            f"({max_positions} tokens): use --max-seq-len {max_positions} or less")


INPUT_STAGES = ("read", "tokenize", "batch")  # the producer thread
DEVICE_STAGES = ("infer_launch", "infer_wait", "merge", "write")  # the device loop, besides waiting for input


def bottleneck(stage_seconds: dict) -> str:
    """Which stage set the pace: the device loop's busiest stage, unless it spent more than
    a fifth of its time waiting for batches, then the producer's busiest stage."""
    loop = sum(stage_seconds.get(k, 0.0) for k in DEVICE_STAGES)
    waited = stage_seconds.get("wait_for_input", 0.0)
    if loop + waited <= 0:
        return ""
    if waited > 0.2 * (loop + waited):
        return max(INPUT_STAGES, key=lambda k: stage_seconds.get(k, 0.0))
    infer = stage_seconds.get("infer_launch", 0.0) + stage_seconds.get("infer_wait", 0.0)
    return max([("model", infer), ("merge", stage_seconds.get("merge", 0.0)),
                ("write", stage_seconds.get("write", 0.0))], key=lambda kv: kv[1])[0]


def padding_efficiency(progress: Progress) -> float:
    return round(progress.real_tokens / progress.padded_tokens, 4) if progress.padded_tokens else 1.0


def _reported(summary: RunSummary, config: RunConfig) -> RunSummary:
    if config.report:
        storage.write_bytes(config.report, json.dumps(summary.as_dict(), indent=2).encode())
    return summary
