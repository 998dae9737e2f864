"""The engines' threads: read -> chunk -> batch on a producer thread; infer -> decode on the
calling thread (the device loop); merge -> write on a writer thread.

A producer thread reads windows of rows, tokenizes them and pads batches (the Rust tokenizer
releases the GIL, so this runs beside the model); the calling thread runs the model and the
span search, keeps batches in flight (two on CUDA, so the GPU never waits for a copy; two per
worker thread on the CPU), and hands each window, once all its batches are back, to the
writer thread, which merges it and writes it (a part of the work directory, or a Ray shard's
table): the device is never idle while a window is merged or its part written, even to
s3://. Bounded queues between the three keep memory flat however large the input is. The
local engine, each --devices worker and each Ray actor run this same loop.

The protocol on that queue, item by item, in the order the producer puts them:

    WindowStart(rows, chunks, n)   a window opens; exactly n HostBatches of it follow (n may be 0)
    HostBatch                      a batch of the newest open window
    _DONE                          the last item: every window has been sent whole
    an exception                   the producer failed; the device loop raises it

On a stop the producer may end after any item without _DONE: the newest window may then have
fewer batches than it announced, and it is never complete. A window is complete when all n of
its batches have been collected; complete windows are merged and written oldest first, so the
parts are written in input order (`OpenWindows` keeps that bookkeeping).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import pyarrow as pa

from .. import faults
from ..config import RunConfig
from ..errors import Interrupted
from ..stages.batch import HostBatch
from ..stages.chunk import ChunkSet
from ..stages.merge import WindowSpans
from ..stages.read import InputPlan, RowBatch, read_windows
from ..stages.shape import OutputShape
from .chain import Stages
from .report import Progress


@dataclass(frozen=True)
class Target:
    """What the loop answers and where each finished window goes."""

    config: RunConfig
    plan: InputPlan
    shape: OutputShape  # a window's table, and how the output is made of them (stages/shape.py)
    write: Callable[[int, pa.Table], None]  # (the window's first row, its answers): a part, or a shard's piece
    where: str  # what an interrupted run names as keeping the finished windows


@dataclass
class WindowStart:
    """Sent by the producer before a window's batches: the window and how many batches follow."""

    rows: RowBatch
    chunks: ChunkSet
    n_batches: int


@dataclass
class WindowInFlight:
    """A window on the device loop: spans filled in batch by batch until none is left."""

    start: WindowStart
    spans: WindowSpans
    batches_left: int


@dataclass
class BatchInFlight:
    """A batch submitted to the predictor, not yet collected."""

    window: WindowInFlight
    batch: HostBatch
    handle: object  # Predictor.submit's handle


_DONE = object()  # the producer's last item


def produce(stages_: Stages, target: Target, ranges: Iterable[tuple[int, int]], stage_seconds: collections.Counter,
            put: Callable[[object], None], stop: threading.Event) -> None:
    """read -> chunk -> batch for every window of `ranges`; each item goes to `put`: a
    WindowStart, then its HostBatches (padded one at a time: the queue bounds host memory,
    not the window), and _DONE at the end. An exception is put too (the device loop raises it)."""
    config, plan = target.config, target.plan
    try:
        for start, end in ranges:
            windows = read_windows(plan, config.rows_per_window, end, start)
            while not stop.is_set():
                t0 = time.perf_counter()
                rows = next(windows, None)
                if rows is None:
                    break
                faults.pause("read")
                t1 = time.perf_counter()
                faults.point("read")
                chunks = stages_.chunker(rows.passages, rows.questions)
                t2 = time.perf_counter()
                planned = stages_.batch_plan(chunks)
                stage_seconds["read"] += t1 - t0
                stage_seconds["tokenize"] += t2 - t1
                stage_seconds["batch"] += time.perf_counter() - t2
                put(WindowStart(rows, chunks, len(planned)))
                for index in planned:
                    t3 = time.perf_counter()
                    hb = stages_.collate(chunks, index)
                    stage_seconds["batch"] += time.perf_counter() - t3
                    put(hb)
                    if stop.is_set():
                        return
            if stop.is_set():
                return
        put(_DONE)
    except BaseException as e:  # handed to the device loop, which re-raises it
        put(e)


class OpenWindows:
    """The windows on the device loop, oldest first: which one a batch belongs to, and which
    are complete (every announced batch collected) and may be written, in input order."""

    def __init__(self) -> None:
        self.windows: collections.deque[WindowInFlight] = collections.deque()

    def open(self, start: WindowStart, spans: WindowSpans) -> WindowInFlight:
        window = WindowInFlight(start, spans, start.n_batches)
        self.windows.append(window)
        return window

    def newest(self) -> WindowInFlight:
        """The window a batch coming from the producer belongs to."""
        if not self.windows or self.windows[-1].batches_left == 0:
            raise RuntimeError("a batch arrived that no open window announced")
        return self.windows[-1]

    def collected(self, window: WindowInFlight) -> None:
        if window.batches_left <= 0:
            raise RuntimeError("a window got more batches than it announced")
        window.batches_left -= 1

    def pop_complete(self) -> list[WindowInFlight]:
        """The complete windows at the front, in input order (a complete window behind an
        incomplete one waits for it)."""
        done = []
        while self.windows and self.windows[0].batches_left == 0:
            done.append(self.windows.popleft())
        return done

    def __len__(self) -> int:
        return len(self.windows)


class WindowWriter:
    """merge -> write on a thread of its own: windows, complete and in input order, are merged
    and written while the device loop runs the next batches. A failure is raised on the device
    loop's next hand-over or at close (the windows after it are dropped, as the run ends)."""

    def __init__(self, stages_: Stages, target: Target, progress: Progress, on_window: Callable[[int], None]):
        self.stages, self.target, self.progress, self.on_window = stages_, target, progress, on_window
        self.queue: queue.Queue = queue.Queue(maxsize=2)  # windows merged or written at a time: bounded memory
        self.failed: BaseException | None = None  # once set, later windows are dropped, never written
        self.reported = False
        self.thread = threading.Thread(target=self._run, name="qa-batch-writer", daemon=True)
        self.thread.start()

    def put(self, window: WindowInFlight) -> None:
        self.raise_failure()
        t0 = time.perf_counter()
        self.queue.put(window)
        self.progress.stages["wait_for_writer"] += time.perf_counter() - t0

    def close(self) -> None:
        """Write every window handed over, then end the thread; raise what failed."""
        t0 = time.perf_counter()
        self.stop()
        self.progress.stages["wait_for_writer"] += time.perf_counter() - t0
        self.raise_failure()

    def stop(self) -> None:
        """End the thread once the windows handed over are written (or dropped after a failure)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def raise_failure(self) -> None:
        if self.failed is not None and not self.reported:
            self.reported = True
            raise self.failed

    def _run(self) -> None:
        while (w := self.queue.get()) is not None:
            if self.failed is None:  # after a failure: take the rest unwritten, so that put() never blocks
                try:
                    self._write(w)
                except BaseException as e:  # handed to the device loop
                    self.failed = e

    def _write(self, w: WindowInFlight) -> None:
        seconds, shape = self.progress.stages, self.target.shape
        rows = w.start.rows
        t0 = time.perf_counter()
        table = shape.window_table(rows, self.stages.merge(rows, w.start.chunks, w.spans))
        t1 = time.perf_counter()
        self.target.write(rows.first_row, table)
        seconds["merge"] += t1 - t0
        seconds["write"] += time.perf_counter() - t1
        counts = shape.count(table)
        self.progress.rows += counts["rows"]
        self.progress.chunks += counts["chunks"]
        self.progress.errors += counts["errors"]
        self.progress.answered += counts["answered"]
        self.on_window(rows.input_rows)


class DeviceLoop:
    """infer -> decode, on the calling thread; complete windows go to the writer.

    Batches are submitted in order and collected oldest first, so windows complete in input
    order; a window goes to the writer once all its batches are collected.
    """

    def __init__(self, stages_: Stages, progress: Progress, writer: WindowWriter,
                 on_batch: Callable[[int], None] | None = None):
        self.stages, self.progress, self.writer, self.on_batch = stages_, progress, writer, on_batch
        self.seconds = progress.stages
        self.windows = OpenWindows()
        self.pending: collections.deque[BatchInFlight] = collections.deque()
        self.max_in_flight = 2 if stages_.on_cuda else 2 * stages_.predictor.workers

    def open_window(self, start: WindowStart) -> None:
        self.windows.open(start, WindowSpans.empty(len(start.chunks), self.stages.chunk_k))
        self.hand_over_complete_windows()  # a window of no batches is complete at once

    def submit(self, batch: HostBatch) -> None:
        window = self.windows.newest()
        t0 = time.perf_counter()
        handle = self.stages.predictor.submit(batch)
        self.seconds["infer_launch"] += time.perf_counter() - t0
        self.progress.real_tokens += batch.real_tokens
        self.progress.padded_tokens += batch.padded_tokens
        self.pending.append(BatchInFlight(window, batch, handle))
        while len(self.pending) > self.max_in_flight:
            self.collect_oldest()
        self.hand_over_complete_windows()

    def collect_oldest(self) -> None:
        done = self.pending.popleft()
        t0 = time.perf_counter()
        host = self.stages.predictor.collect(done.handle)
        self.seconds["infer_wait"] += time.perf_counter() - t0
        done.window.spans.store(done.batch, host, done.window.start.chunks)
        self.windows.collected(done.window)
        if self.on_batch is not None:  # progress inside a window: one long passage is many batches
            self.on_batch(len(done.batch.chunk_index))
        faults.point("batch")

    def drain(self) -> None:
        """Collect every batch in flight, hand over every complete window and wait until they are written."""
        while self.pending:
            self.collect_oldest()
        self.hand_over_complete_windows()
        self.writer.close()

    def hand_over_complete_windows(self) -> None:
        for w in self.windows.pop_complete():
            self.writer.put(w)


def answer_ranges(stages_: Stages, target: Target, ranges: Iterable[tuple[int, int]], progress: Progress,
                  on_window: Callable[[int], None], stop_requested=None,
                  on_batch: Callable[[int], None] | None = None) -> None:
    """Answer the rows of `ranges` ([start, end), whole windows); each window goes to `target.write`.

    A producer thread reads, tokenizes and pads batches (the Rust tokenizer releases the GIL);
    this thread runs the model; a writer thread merges finished windows and writes them.
    `ranges` may be a lazy iterator (worker processes take them from a queue). Setting
    `stop_requested` stops after the batches in flight; whole windows are kept, then
    Interrupted is raised.
    """
    work: queue.Queue = queue.Queue(maxsize=16)
    stop = threading.Event()

    def put(item) -> None:  # gives up once the loop has stopped: nobody would take the item
        while not stop.is_set():
            try:
                work.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    producer = threading.Thread(target=produce, name="qa-batch-producer", daemon=True,
                                args=(stages_, target, ranges, progress.stages, put, stop))
    writer = None
    try:
        writer = WindowWriter(stages_, target, progress, on_window)
        loop = DeviceLoop(stages_, progress, writer, on_batch)
        producer.start()
        while True:
            if stop_requested is not None and stop_requested.is_set():
                stop.set()  # no new work; finish the batches in flight and keep whole windows
                faults.pause("stopping")
                loop.drain()
                producer.join(timeout=10)  # it stops at its next item: its stage seconds are final
                raise Interrupted(target.plan.count_answers(progress.rows), target.where)
            t0 = time.perf_counter()
            try:
                item = work.get(timeout=0.2)
            except queue.Empty:
                progress.stages["wait_for_input"] += time.perf_counter() - t0
                continue
            progress.stages["wait_for_input"] += time.perf_counter() - t0
            if isinstance(item, BaseException):
                raise item
            if item is _DONE:
                loop.drain()
                if len(loop.windows):
                    raise RuntimeError("the producer ended with a window short of the batches it announced")
                break
            if isinstance(item, WindowStart):
                loop.open_window(item)
            else:
                loop.submit(item)
        producer.join()
    finally:
        stop.set()  # on failure: finished parts stay in the work directory for the next run
        if writer is not None:
            writer.stop()  # a failure elsewhere: the windows handed over are still written
            if writer.failed is not None and not writer.reported:
                logging.getLogger("qa_batch").error("writing a window failed too: %s", writer.failed)
