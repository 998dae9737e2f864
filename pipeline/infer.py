"""Infer stage: one forward pass per batch, under inference_mode, with out-of-memory recovery.

On CUDA out-of-memory the batch is split in two and each half retried (recursively, down
to a single chunk); every chunk is answered exactly once and the engine counts the splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .batch import HostBatch
from .errors import RuntimeFailure
from .spans import ChunkSpans, search_spans


@dataclass
class InferStats:
    forwards: int = 0
    oom_splits: int = 0
    seconds: float = 0.0


@dataclass
class Predictor:
    """Runs the model and the span search for host batches on one device."""

    model: torch.nn.Module
    device: torch.device
    max_answer_len: int
    k: int
    stats: InferStats = field(default_factory=InferStats)

    def _forward(self, inputs: dict[str, torch.Tensor], ctx_start, ctx_len, cls_pos) -> ChunkSpans:
        non_blocking = self.device.type == "cuda"
        inputs = {n: t.to(self.device, non_blocking=non_blocking) for n, t in inputs.items()}
        out = self.model(**inputs)
        self.stats.forwards += 1
        return search_spans(
            out.start_logits, out.end_logits,
            ctx_start.to(self.device, non_blocking=non_blocking),
            ctx_len.to(self.device, non_blocking=non_blocking),
            cls_pos.to(self.device, non_blocking=non_blocking),
            self.max_answer_len, self.k,
        )

    def _run(self, inputs, ctx_start, ctx_len, cls_pos) -> ChunkSpans:
        try:
            return self._forward(inputs, ctx_start, ctx_len, cls_pos)
        except torch.OutOfMemoryError:
            n = ctx_start.shape[0]
            if n == 1:
                raise RuntimeFailure(
                    "out of device memory for a single chunk: lower --max-seq-len or use a bigger device"
                ) from None
            self.stats.oom_splits += 1
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            h = n // 2
            halves = [
                self._run({k: v[sl] for k, v in inputs.items()}, ctx_start[sl], ctx_len[sl], cls_pos[sl])
                for sl in (slice(0, h), slice(h, n))
            ]
            return ChunkSpans(*(torch.cat(parts) for parts in zip(*(
                (p.start, p.end, p.score, p.null_score, p.log_norm) for p in halves))))

    @torch.inference_mode()
    def __call__(self, batch: HostBatch) -> ChunkSpans:
        """Spans for the batch, still on the device (copy them back when needed)."""
        return self._run(batch.inputs, batch.ctx_start, batch.ctx_len, batch.cls_pos)
