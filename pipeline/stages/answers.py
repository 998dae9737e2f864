"""The answer records: what merge produces and write consumes (merge -> write).

Plain dataclasses with no dependencies, so that the write stage, the calibration and the
tools can use them without importing the tokenizer or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Answer:
    """One answer span of a row."""

    text: str
    start: int  # character offsets into the passage: passage[start:end] == text
    end: int
    score: float
    confidence: float


@dataclass
class RowAnswer:
    """What the output says about one row."""

    answer: Answer | None  # None: no answer (null, or an error)
    score: float | None  # the chosen answer's logit sum (the null score for a null answer)
    confidence: float | None
    null_score: float | None  # min over chunks of the CLS start + end logits
    chunks: int
    error: str | None
    top: list[Answer]  # best distinct spans, best first (only filled for top_k > 1)
    # What a calibration reads (calibrate.py), also for null answers:
    span_score: float | None = None  # the best span's logit sum, chosen or not
    runner_up_score: float | None = None  # the best distinct span after it (None: there is none)
    log_norm: float | None = None  # logsumexp of every candidate span's score (the null candidate excluded)
    # the best distinct spans, best first, at least two where there are (merge's `wanted`):
    # what a document's answer is chosen from (documents.py)
    candidates: list[Answer] = field(default_factory=list)
