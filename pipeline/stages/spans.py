"""Decode stage: the best answer spans of every chunk of a batch, searched on the device.

A valid span (s, e) of a chunk has s <= e < s + A (A = max_answer_len), starts at a token
that may start a span and ends at one that may end one (passage tokens only, canonical
ends: chunk.py), and is owned by the chunk (the ownership rule in chunk.py: every distinct
passage span is owned by exactly one chunk of its row). Its score is
start_logits[s] + end_logits[e] (raw logits, so scores compare across chunks and passages).
Rather than the full L x L matrix we build the L x A band:
band[b, s, d] = start[b, s] + end[b, s + d], masked where invalid.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class SpanRules:
    """Which spans of each chunk of a batch are candidates; positions in the padded chunk."""

    start_ok: torch.Tensor  # [B, L] bool: the token may start a span
    end_ok: torch.Tensor  # [B, L] bool: the token may end a span
    own_lo: torch.Tensor  # [B] the chunk's home: spans starting in [own_lo, own_hi) are its own,
    own_hi: torch.Tensor  # [B]   as are spans starting before own_lo that end at or after prev_end
    prev_end: torch.Tensor  # [B] first position past the previous chunk's passage tokens
    cls_pos: torch.Tensor  # [B] position whose start + end logits give the null score

    def to(self, device, non_blocking: bool = False) -> "SpanRules":
        return SpanRules(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    def __getitem__(self, rows: slice) -> "SpanRules":
        return SpanRules(*(getattr(self, f.name)[rows] for f in fields(self)))

    def pin_memory(self) -> "SpanRules":
        return SpanRules(*(getattr(self, f.name).pin_memory() for f in fields(self)))


@dataclass
class ChunkSpans:
    """Per chunk: its k best spans, its null score and the log-sum-exp of all its span scores."""

    start: torch.Tensor  # [B, k] token position of each span's start in the chunk
    end: torch.Tensor  # [B, k] token position of its end (inclusive)
    score: torch.Tensor  # [B, k] float32; -inf where the chunk has fewer than k valid spans
    null_score: torch.Tensor  # [B] start + end logit at the CLS position
    log_norm: torch.Tensor  # [B] logsumexp over every valid span of the chunk (-inf: none)
    finite: torch.Tensor  # [B] bool: every logit the chunk's spans and null score read is finite

    def to(self, device, non_blocking: bool = False) -> "ChunkSpans":
        return ChunkSpans(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    @staticmethod
    def cat(parts: list["ChunkSpans"]) -> "ChunkSpans":
        return ChunkSpans(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(ChunkSpans)))


def search_spans(start_logits: torch.Tensor, end_logits: torch.Tensor, rules: SpanRules,
                 max_answer_len: int, k: int = 1) -> ChunkSpans:
    """Exact best-k valid spans per chunk. Ties go to the smaller start, then the smaller end."""
    start_logits = start_logits.float()  # [B, L]
    end_logits = end_logits.float()
    B, L = start_logits.shape
    A = max(1, min(max_answer_len, L))
    dev = start_logits.device
    s = torch.arange(L, device=dev)[None, :, None]  # [1, L, 1] span start
    e = s + torch.arange(A, device=dev)[None, None, :]  # [1, L, A] span end

    # band[b, s, d] = start[b, s] + end[b, s + d]
    end_band = F.pad(end_logits, (0, A - 1), value=float("-inf")).unfold(1, A, 1)  # [B, L, A]
    end_ok = F.pad(rules.end_ok, (0, A - 1), value=False).unfold(1, A, 1)  # [B, L, A]
    lo, hi, prev = (t[:, None, None] for t in (rules.own_lo, rules.own_hi, rules.prev_end))
    owned = ((s >= lo) & (s < hi)) | ((s < lo) & (e >= prev))  # [B, L, A]
    valid = rules.start_ok[:, :, None] & end_ok & owned
    band = (start_logits[:, :, None] + end_band).masked_fill(~valid, float("-inf")).reshape(B, L * A)

    k = min(k, L * A)
    if k <= 2:  # one or two max passes, cheaper than a sort; ties as the sort's (first index)
        score, flat = band.max(dim=1, keepdim=True)  # first index among equal maxima
        if k == 2:
            second, flat2 = band.scatter(1, flat, float("-inf")).max(dim=1, keepdim=True)
            score, flat = torch.cat([score, second], 1), torch.cat([flat, flat2], 1)
    else:
        score, flat = band.sort(dim=1, descending=True, stable=True)  # deterministic ties
        score, flat = score[:, :k], flat[:, :k]
    span_start = flat // A
    span_end = span_start + flat % A
    rows = torch.arange(B, device=dev)
    null_score = start_logits[rows, rules.cls_pos] + end_logits[rows, rules.cls_pos]
    # float16 can overflow to inf, and a broken model can give NaN: such a chunk's scores mean
    # nothing (an inf would win, a NaN would poison the row's confidence), so merge refuses it
    read = rules.start_ok | rules.end_ok
    read[rows, rules.cls_pos] = True
    finite = ((start_logits.isfinite() & end_logits.isfinite()) | ~read).all(dim=1)
    return ChunkSpans(span_start, span_end, score, null_score, log_sum_exp(band), finite)


def log_sum_exp(band: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1, the terms summed in float64: far less sensitive than a float32 sum
    to the order of the additions (how a kernel splits them), which the output should not show."""
    top = band.amax(dim=1, keepdim=True)
    top = top.masked_fill(top.isinf(), 0.0)  # as torch.logsumexp: a row of -inf gives -inf, a +inf gives +inf
    total = torch.exp(band - top).sum(dim=1, dtype=torch.float64)
    return (torch.log(total) + top[:, 0].double()).float()
