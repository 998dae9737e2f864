"""Infer stage: one forward pass per batch, under inference_mode, with out-of-memory recovery.

On CUDA out-of-memory the batch is split in two and each half retried (recursively, down
to a single chunk); every chunk is answered exactly once and the engine counts the splits.

`Predictor.submit` starts a batch and returns a handle whose `result()` gives the spans on
the host. On CUDA the launch is asynchronous, on a stream of its own (copies in from pinned
memory, forward, span search, copy back, and an event marking its end), so the next batch is
queued while this one runs and nothing else using the default stream serialises with it. On the CPU, `workers` threads
each run whole batches with one intra-op thread: on a few cores that beats splitting every
matrix product across them (measured 15% faster on 2 cores, see BENCHMARKS.md).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from dataclasses import dataclass, field

import torch

from .. import faults
from ..errors import RuntimeFailure
from .batch import HostBatch
from .spans import ChunkSpans, SpanRules, search_spans

RETRY_FULL_AFTER = 256  # batches that fit after an out-of-memory before full-size batches are tried again


@dataclass
class InferStats:
    oom_splits: int = 0  # batches split in two after running out of device memory
    too_big: int | None = None  # the fewest padded tokens a batch ran out of memory with: larger ones are split first
    fits_since: int = 0  # batches run since too_big was set: after RETRY_FULL_AFTER, full sizes are tried again


class _Ready:
    """A handle for work already done."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _CudaHandle:
    """Spans being copied back to pinned host memory; result() waits for that copy only."""

    def __init__(self, host: ChunkSpans):
        self.host = host
        self.event = torch.cuda.Event(blocking=True)  # the waiting thread sleeps instead of spinning a core
        self.event.record()

    def result(self) -> ChunkSpans:
        self.event.synchronize()
        return self.host


@dataclass
class Predictor:
    """Runs the model and the span search for host batches on one device."""

    model: torch.nn.Module
    device: torch.device
    max_answer_len: int
    k: int
    workers: int = 1  # CPU only: batches run in parallel, one intra-op thread each
    mask_4d: bool = False  # the padding mask as [B, 1, 1, T] bool (LoadedModel.mask_4d)
    mask_always: bool = False  # and an all-true one for unpadded batches (LoadedModel.mask_always)
    stats: InferStats = field(default_factory=InferStats)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._pool = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._threads_before = None
        if self.device.type == "cpu":
            # one intra-op thread per worker (torch's count is per process); close() restores it
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
            if self.workers > 1:
                # each thread sets its count (1) before its first op, rather than relying on torch
                # to carry the process-wide setting into threads it did not start
                self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="qa-batch-infer",
                                                                   initializer=torch.set_num_threads, initargs=(1,))

    def submit(self, batch: HostBatch):
        """Start the batch; pass the handle to collect() for its spans on the host."""
        if self._pool is not None:
            return self._pool.submit(self, batch)
        with self._failures():
            if self._stream is not None:
                # The batch's device memory is allocated and used on this stream only, and its
                # pinned host tensors live until collect(): no cross-stream hazards to manage.
                with torch.cuda.stream(self._stream), torch.inference_mode():
                    spans = self(batch)
                    return _CudaHandle(spans.to("cpu", non_blocking=True))  # its event is on this stream
            return _Ready(self(batch))

    def collect(self, handle) -> ChunkSpans:
        """Wait for a submitted batch; its spans, on the host."""
        with self._failures():
            return handle.result()

    @contextlib.contextmanager
    def _failures(self):
        """A model or device error (at launch or when waited for) ends the run with exit code 3."""
        try:
            yield
        except RuntimeFailure:
            raise
        except RuntimeError as e:
            raise RuntimeFailure(f"the model failed on {self.device}: {e}") from e

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def _forward(self, inputs: dict[str, torch.Tensor], rules: SpanRules) -> ChunkSpans:
        non_blocking = self.device.type == "cuda"
        inputs = {n: t.to(self.device, non_blocking=non_blocking) for n, t in inputs.items()}
        if self.mask_4d and "attention_mask" in inputs:  # no host read in the model's mask check
            inputs["attention_mask"] = inputs["attention_mask"][:, None, None, :].bool()
        elif self.mask_always:  # an unpadded batch: the model would look for padding on the host
            ids = inputs["input_ids"]
            inputs["attention_mask"] = torch.ones(ids.shape[0], 1, 1, ids.shape[1], dtype=torch.bool, device=ids.device)
        if faults.out_of_memory(rules.cls_pos.shape[0]):  # tests: the out-of-memory path on any device
            raise torch.cuda.OutOfMemoryError("simulated out of memory (QA_BATCH_OOM_ABOVE)")
        out = self.model(**inputs)
        return search_spans(out.start_logits, out.end_logits, rules.to(self.device, non_blocking=non_blocking),
                            self.max_answer_len, self.k)

    def _run(self, inputs: dict[str, torch.Tensor], rules: SpanRules) -> ChunkSpans:
        """The spans of a batch; on out-of-memory, of its two halves, split again as needed.

        A batch at least as large (in padded tokens) as one that ran out of memory before is
        split without trying: a workload that never fits pays for one failure, not one a batch."""
        n = rules.cls_pos.shape[0]
        tokens = n * inputs["input_ids"].shape[1]
        too_big = self.stats.too_big
        if n == 1 or too_big is None or tokens < too_big:
            try:
                spans = self._forward(inputs, rules)
                with self._lock:
                    if self.stats.too_big is not None:
                        self.stats.fits_since += 1
                        if self.stats.fits_since >= RETRY_FULL_AFTER:  # a passing peak must not halve the rest
                            self.stats.too_big, self.stats.fits_since = None, 0
                return spans
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError is newer than the torch 2.4 we allow
                pass  # leave the except block first: its traceback keeps the failed forward's tensors alive
            if n == 1:
                raise RuntimeFailure("out of device memory for a single chunk: lower --max-seq-len or use a bigger "
                                     "device")
            with self._lock:
                self.stats.oom_splits += 1
                self.stats.too_big = tokens if self.stats.too_big is None else min(self.stats.too_big, tokens)
                self.stats.fits_since = 0
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the failed forward's blocks back before retrying (a device-wide sync)
        h = n // 2
        return ChunkSpans.cat([self._run({k: v[sl] for k, v in inputs.items()}, rules[sl])
                               for sl in (slice(0, h), slice(h, n))])

    @torch.inference_mode()
    def __call__(self, batch: HostBatch) -> ChunkSpans:
        """Spans for the batch, still on the device (copy them back when needed)."""
        return self._run(batch.inputs, batch.rules)
