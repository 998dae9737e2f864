"""Batch stage: group chunks into padded device batches under a token budget.

Chunks are sorted by length inside a window so that a batch pads little; a batch takes
chunks while `rows x longest chunk` stays within `max_batch_tokens` and its row count
within `batch_size`. The merge stage restores row order, so sorting changes no answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .chunk import ChunkSet
from .spans import SpanRules


@dataclass
class HostBatch:
    """One forward pass worth of chunks, padded, on the host."""

    chunk_index: np.ndarray  # [B] which chunks of the ChunkSet these rows are
    inputs: dict[str, torch.Tensor]  # model inputs, each [B, T]
    ctx_start: torch.Tensor  # [B] first passage position (after padding)
    rules: SpanRules  # which spans of each row are candidates (positions after padding)
    real_tokens: int  # tokens before padding, for padding efficiency

    def __len__(self) -> int:
        return len(self.chunk_index)

    @property
    def padded_tokens(self) -> int:
        b, t = self.inputs["input_ids"].shape
        return b * t


def plan_batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int,
                 max_waste: float = 0.25) -> list[np.ndarray]:
    """Chunk indices per batch: longest first, each batch within both limits (at least one chunk).

    Once a batch holds a quarter of what fits, it also ends where the next chunk would waste
    more than `max_waste` of its row on padding, so short chunks are not padded to long ones.
    """
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    begin = 0
    while begin < len(order):
        width = int(lengths[order[begin]])
        fits = max(1, min(batch_size, max_batch_tokens // max(width, 1)))
        stop = min(len(order), begin + fits)
        short = np.flatnonzero(lengths[order[begin:stop]] < (1 - max_waste) * width)
        first_short = begin + int(short[0]) if len(short) else stop
        end = max(first_short, min(stop, begin + max(1, fits // 4)))
        batches.append(order[begin:end])
        begin = end
    return batches


def collate(
    chunks: ChunkSet,
    index: np.ndarray,
    input_names: tuple[str, ...],
    pad_id: int,
    pad_left: bool = False,
    pad_multiple: int = 1,
    pin: bool = False,
    max_width: int | None = None,
) -> HostBatch:
    """Pad the chosen chunks into [B, T] tensors: T rounded up to `pad_multiple`, but never past
    `max_width` (the model's position table: a table of 100 takes no chunk of 104)."""
    lengths = chunks.lengths[index]
    longest = int(lengths.max())
    width = int(-(-longest // pad_multiple) * pad_multiple)
    if max_width is not None:
        width = max(longest, min(width, max_width))
    ids = np.full((len(index), width), pad_id, dtype=np.int64)
    types = np.zeros((len(index), width), dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    start_ok = np.zeros((len(index), width), dtype=bool)
    end_ok = np.zeros((len(index), width), dtype=bool)
    shift = (width - lengths) if pad_left else np.zeros_like(lengths)
    ctx_start = chunks.ctx_start[index] + shift
    for b, i in enumerate(index):
        s, n = shift[b], lengths[b]
        chunks.assemble(i, ids[b, s : s + n], types[b, s : s + n])
        mask[b, s : s + n] = 1
        tokens = slice(chunks.token_base[chunks.row[i]] + chunks.token_start[i],
                       chunks.token_base[chunks.row[i]] + chunks.token_start[i] + chunks.ctx_len[i])
        start_ok[b, ctx_start[b] : ctx_start[b] + chunks.ctx_len[i]] = chunks.can_start[tokens]
        end_ok[b, ctx_start[b] : ctx_start[b] + chunks.ctx_len[i]] = chunks.can_end[tokens]
    arrays = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    # An all-ones mask means no mask: leaving it out lets SDPA pick its fastest kernel.
    unpadded = bool((lengths == width).all())
    inputs = {name: torch.from_numpy(arrays[name]) for name in input_names
              if not (name == "attention_mask" and unpadded)}
    to_chunk = ctx_start - chunks.token_start[index]  # passage token -> position in the padded chunk
    rules = SpanRules(
        start_ok=torch.from_numpy(start_ok), end_ok=torch.from_numpy(end_ok),
        own_lo=torch.from_numpy(chunks.own_lo[index] + to_chunk),
        own_hi=torch.from_numpy(chunks.own_hi[index] + to_chunk),
        prev_end=torch.from_numpy(chunks.prev_end[index] + to_chunk),
        cls_pos=torch.from_numpy(chunks.cls_pos[index] + shift),
    )
    ctx_start = torch.from_numpy(ctx_start)
    if pin:  # every tensor: a copy from pageable memory would wait for the GPU to go idle
        inputs = {k: v.pin_memory() for k, v in inputs.items()}
        ctx_start, rules = ctx_start.pin_memory(), rules.pin_memory()
    return HostBatch(
        chunk_index=index,
        inputs=inputs,
        ctx_start=ctx_start,
        rules=rules,
        real_tokens=int(lengths.sum()),
    )
