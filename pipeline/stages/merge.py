"""Merge stage: pick each row's answer (or top-k answers) from the spans of all its chunks.

The candidates of a row are its distinct passage spans, each scored once, by the chunk that
owns it (the ownership rule in chunk.py: the chunk where the span has the most context);
with --allow-null, the null answer is one more candidate, scored by the row's null score.
The answer is the best candidate; with --top-k, the k best distinct character spans.
Confidence is a softmax over all the row's candidates: exp(score - logsumexp(all candidate
scores)). Since each candidate counts once, an answer's confidence does not depend on
whether it sits inside a chunk overlap, and the confidences of a row sum to at most 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .answers import Answer, RowAnswer
from .chunk import ChunkSet


@dataclass
class WindowSpans:
    """Per chunk of a window, in passage-token coordinates (filled batch by batch)."""

    token_start: np.ndarray  # [chunks, k] first passage token of each span
    token_end: np.ndarray  # [chunks, k] last passage token (inclusive)
    score: np.ndarray  # [chunks, k] float32, -inf where no span
    null_score: np.ndarray  # [chunks]
    log_norm: np.ndarray  # [chunks]
    finite: np.ndarray  # [chunks] bool: the chunk's logits were all finite (spans.py)

    def store(self, batch, host, chunks: ChunkSet) -> None:
        """Put one batch's spans (ChunkSpans on the host) in place, in passage-token coordinates."""
        idx = batch.chunk_index
        shift = (chunks.token_start[idx] - batch.ctx_start.numpy())[:, None]  # chunk -> passage tokens
        self.token_start[idx] = host.start.numpy() + shift
        self.token_end[idx] = host.end.numpy() + shift
        self.score[idx] = host.score.numpy()
        self.null_score[idx] = host.null_score.numpy()
        self.log_norm[idx] = host.log_norm.numpy()
        self.finite[idx] = host.finite.numpy()

    @classmethod
    def empty(cls, n_chunks: int, k: int) -> "WindowSpans":
        return cls(
            np.zeros((n_chunks, k), np.int64), np.zeros((n_chunks, k), np.int64),
            np.full((n_chunks, k), -np.inf, np.float32),
            np.zeros(n_chunks, np.float32), np.full(n_chunks, -np.inf, np.float32), np.ones(n_chunks, bool),
        )


def merge_window(
    passages: list[str | None],
    chunks: ChunkSet,
    spans: WindowSpans,
    top_k: int,
    allow_null: bool,
    null_threshold: float,
) -> list[RowAnswer]:
    """One RowAnswer per row of the window, in row order."""
    n_rows = len(passages)
    # Chunks of a row are consecutive: row r owns chunks [bounds[r], bounds[r + 1]).
    bounds = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(chunks.chunk_count, out=bounds[1:])
    # Character offsets of every candidate, in one vectorized gather. Empty slots (-inf: the
    # chunk has fewer valid spans than slots) hold no position: read token 0, never used.
    found = np.isfinite(spans.score)
    base = chunks.token_base[chunks.row][:, None] if len(chunks) else np.zeros((0, 1), np.int64)
    char_start = chunks.offsets[base + np.where(found, spans.token_start, 0), 0] if len(chunks) else spans.token_start
    char_end = chunks.offsets[base + np.where(found, spans.token_end, 0), 1] if len(chunks) else spans.token_end

    out: list[RowAnswer] = []
    for r in range(n_rows):
        a, b = bounds[r], bounds[r + 1]
        if chunks.errors[r] is not None or a == b:
            out.append(RowAnswer(None, None, None, None, int(b - a), chunks.errors[r], []))
            continue
        if not spans.finite[a:b].all():
            bad = int((~spans.finite[a:b]).sum())
            out.append(RowAnswer(None, None, None, None, int(b - a), nonfinite_error(bad), []))
            continue
        null_score = float(spans.null_score[a:b].min())
        span_log_norm = float(np.logaddexp.reduce(spans.log_norm[a:b].astype(np.float64)))

        scores = spans.score[a:b].ravel()
        order = np.argsort(-scores, kind="stable")  # ties: earlier chunk, then better rank
        cs, ce = char_start[a:b].ravel(), char_end[a:b].ravel()
        candidates: list[Answer] = []
        seen: set[tuple[int, int]] = set()
        wanted = max(top_k, 2)  # the runner-up is always found: calibration reads its score
        for j in order:
            if len(candidates) == wanted or not np.isfinite(scores[j]):
                break
            key = (int(cs[j]), int(ce[j]))
            if key in seen:  # the same text span from an overlapping chunk
                continue
            seen.add(key)
            candidates.append(Answer(passages[r][key[0] : key[1]], key[0], key[1], float(scores[j]), 0.0))
        out.append(choose(candidates, null_score, span_log_norm, int(b - a), top_k, allow_null, null_threshold))
    return out


def choose(candidates: list[Answer], null_score: float, span_log_norm: float, chunks: int, top_k: int,
           allow_null: bool, null_threshold: float, no_span: str = "no valid answer span in the passage") -> RowAnswer:
    """The answer of one row (or one document: documents.py) from its best distinct candidate
    spans, best first (at least two where there are: the runner-up), its null score (the
    minimum over its chunks) and the log-sum-exp of all its span scores. Each candidate's
    confidence is its softmax share among all spans, and the null candidate with --allow-null."""
    log_norm = float(np.logaddexp(span_log_norm, null_score)) if allow_null else span_log_norm
    for c in candidates:
        c.confidence = _share(c.score, log_norm)
    if not candidates:
        return RowAnswer(None, None, None, null_score, chunks, no_span, [], candidates=[])
    best = candidates[0]
    found = dict(span_score=best.score, runner_up_score=candidates[1].score if len(candidates) > 1 else None,
                 log_norm=span_log_norm, candidates=candidates)
    top = candidates[:top_k] if top_k > 1 else []
    if allow_null and null_score - best.score > null_threshold:
        return RowAnswer(None, null_score, _share(null_score, log_norm), null_score, chunks, None, top, **found)
    return RowAnswer(best, best.score, best.confidence, null_score, chunks, None, top, **found)


def nonfinite_error(n_chunks: int) -> str:
    return (f"the model's logits were not finite (inf or NaN) in {n_chunks} of this row's chunks, so no answer "
            "can be trusted; float16 overflow is the usual cause: rerun with --dtype bfloat16 or --dtype float32")


def _share(score: float, log_norm: float) -> float:
    """A candidate's softmax share; at most 1 (float32 rounding could put it a hair above)."""
    return float(min(1.0, np.exp(score - log_norm)))
