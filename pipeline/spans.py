"""Decode stage: the best answer spans of every chunk of a batch, searched on the device.

A valid span (s, e) has both ends among the chunk's passage tokens and s <= e < s + A,
with A = max_answer_len. Its score is start_logits[s] + end_logits[e] (raw logits, so
scores compare across chunks and passages). Rather than the full L x L matrix we build
the L x A band: band[b, s, d] = start[b, s] + end[b, s + d], masked where invalid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ChunkSpans:
    """Per chunk: its k best spans, its null score and the log-sum-exp of all its span scores."""

    start: torch.Tensor  # [B, k] token position of each span's start in the chunk
    end: torch.Tensor  # [B, k] token position of its end (inclusive)
    score: torch.Tensor  # [B, k] float32; -inf where the chunk has fewer than k valid spans
    null_score: torch.Tensor  # [B] start + end logit at the CLS position
    log_norm: torch.Tensor  # [B] logsumexp over every valid span of the chunk

    def to(self, device, non_blocking: bool = False) -> "ChunkSpans":
        return ChunkSpans(*(t.to(device, non_blocking=non_blocking) for t in
                            (self.start, self.end, self.score, self.null_score, self.log_norm)))


def search_spans(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    ctx_start: torch.Tensor,
    ctx_len: torch.Tensor,
    cls_pos: torch.Tensor,
    max_answer_len: int,
    k: int = 1,
) -> ChunkSpans:
    """Exact best-k valid spans per chunk. Ties go to the smaller start, then the smaller end."""
    start_logits = start_logits.float()  # [B, L]
    end_logits = end_logits.float()
    B, L = start_logits.shape
    A = max(1, min(max_answer_len, L))
    pos = torch.arange(L, device=start_logits.device)
    in_ctx = (pos >= ctx_start[:, None]) & (pos < (ctx_start + ctx_len)[:, None])  # [B, L]

    # band[b, s, d] = start[b, s] + end[b, s + d]; both ends in the passage makes it valid,
    # since the passage tokens of a chunk are contiguous.
    end_band = F.pad(end_logits, (0, A - 1), value=float("-inf")).unfold(1, A, 1)  # [B, L, A]
    end_ok = F.pad(in_ctx, (0, A - 1), value=False).unfold(1, A, 1)  # [B, L, A]
    band = start_logits[:, :, None] + end_band
    band = band.masked_fill(~(in_ctx[:, :, None] & end_ok), float("-inf")).reshape(B, L * A)

    k = min(k, L * A)
    if k == 1:
        score, flat = band.max(dim=1, keepdim=True)  # first index among equal maxima
    else:
        score, flat = band.sort(dim=1, descending=True, stable=True)  # deterministic ties
        score, flat = score[:, :k], flat[:, :k]
    span_start = flat // A
    span_end = span_start + flat % A
    rows = torch.arange(B, device=start_logits.device)
    null_score = start_logits[rows, cls_pos] + end_logits[rows, cls_pos]
    return ChunkSpans(span_start, span_end, score, null_score, torch.logsumexp(band, dim=1))
