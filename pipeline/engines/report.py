"""What a run reports (every arrow): counts, rates, seconds per stage, the bottleneck, memory.

`Progress` is what one process answered; `RunSummary` is what a run did, printed as one
line, written by --report and stored in the output's metadata.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import asdict, dataclass, field, fields

from .. import storage
from ..config import RunConfig
from ..counts import Count
from ..wording import plural


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
    backend: str = ""  # what ran the model: torch, onnxruntime or openvino (--backend auto decided)
    started_at: str = ""
    finished_at: str = ""
    stage_seconds: dict = field(default_factory=dict)
    bottleneck: str = ""  # the stage that set the pace (see bottleneck())
    questions_per_row: int = 0  # --questions/--question: asked of every input row (rows then count answers)
    # --document-col/--across-rows: the output's rows, one per (document, question); the counts above are the pairs'
    documents: int = 0
    documents_answered: int = 0
    documents_null: int = 0
    documents_errors: int = 0

    @property
    def unit(self) -> str:
        """What an output row is: an answer with a question list, else a row of the input."""
        return Count(0, self.questions_per_row).unit

    @property
    def earlier_verb(self) -> str:
        """How rows of earlier runs are named: 'rows answered before', 'answers given before'."""
        return "given" if self.questions_per_row else "answered"

    def line(self) -> str:
        """This run's counts, time and rates, on which device; after a resume, the totals too."""
        q, unit = self.questions_per_row, self.unit

        def counts(rows: int, answered: int, null: int, errors: int, chunks: int) -> str:
            asked = f" to {plural(q, 'question')} of {plural(Count.of_answers(rows, q).rows, 'row')}" if q else ""
            if self.documents:  # pairs are not answered one by one: their documents are, below
                return f"{plural(rows, unit)}{asked} ({plural(errors, 'error')}), {plural(chunks, 'chunk')}"
            return (f"{plural(rows, unit)}{asked} ({answered} answered, {null} null, {plural(errors, 'error')}), "
                    f"{plural(chunks, 'chunk')}")

        this_run = counts(self.rows_this_run, self.answered_this_run, self.null_this_run, self.errors_this_run,
                          self.chunks_this_run)
        on = f" on {self.device}" if self.device else ""
        if self.backend and self.backend != "torch":  # --backend auto shows what it chose
            on += f" with {self.backend}" + (f" {self.dtype}" if self.dtype else "")
        text = (f"qa-batch: {this_run} in {self.elapsed_s:.1f} s{on}: "
                f"{rate(self.rows_per_s)} {unit}s/s, {rate(self.chunks_per_s)} chunks/s")
        if self.resumed_from_row:
            text += (f"; with the {plural(self.resumed_from_row, unit)} {self.earlier_verb} before, "
                     f"{counts(self.rows, self.answered, self.null, self.errors, self.chunks)} in all")
        if self.documents:
            text += (f"; {plural(self.documents, 'document answer')} ({self.documents_answered} answered, "
                     f"{self.documents_null} null, {plural(self.documents_errors, 'error')})")
        return f"{text} -> {self.output}"

    def set_counts(self, total: dict, this_run: dict) -> None:
        """The counts over every part of the output, and over the rows this run answered
        (each a dict with rows, chunks, answered and errors)."""
        self.rows, self.chunks, self.answered, self.errors = (total[k] for k in COUNTS)
        self.null = self.rows - self.answered - self.errors
        self.rows_this_run, self.chunks_this_run, self.answered_this_run, self.errors_this_run = (
            this_run[k] for k in COUNTS)
        self.null_this_run = self.rows_this_run - self.answered_this_run - self.errors_this_run
        for key in ("documents", "documents_answered", "documents_null", "documents_errors"):
            setattr(self, key, total.get(key, 0))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSummary":
        """A summary stored by any qa-batch version: fields it lacks keep their defaults, fields
        this version does not know are dropped."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


COUNTS = ("rows", "chunks", "answered", "errors")  # what a part, a shard and a run count


def rate(per_s: float) -> str:
    """12.3, or below 1 two significant digits (a 100,000-word passage: 0.017 rows/s, not 0.0)."""
    return f"{per_s:.2g}" if 0 < per_s < 1 else f"{per_s:.1f}"


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


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError):  # not Linux
        return 0.0


INPUT_STAGES = ("read", "tokenize", "batch")  # the producer thread


DEVICE_STAGES = ("infer_launch", "infer_wait")  # the device loop, besides waiting for input or the writer


OUTPUT_STAGES = ("merge", "write")  # the writer thread


def bottleneck(stage_seconds: dict) -> str:
    """Which stage set the pace: the device loop's model time, unless the loop spent more than a
    fifth of its time waiting for batches (then the producer's busiest stage) or for the writer
    to take a window (then merge or write, whichever took longer)."""
    busy = sum(stage_seconds.get(k, 0.0) for k in DEVICE_STAGES)
    waited_in, waited_out = stage_seconds.get("wait_for_input", 0.0), stage_seconds.get("wait_for_writer", 0.0)
    total = busy + waited_in + waited_out
    if total <= 0:
        return ""
    if waited_in > 0.2 * total and waited_in >= waited_out:
        return max(INPUT_STAGES, key=lambda k: stage_seconds.get(k, 0.0))
    if waited_out > 0.2 * total:
        return max(OUTPUT_STAGES, key=lambda k: stage_seconds.get(k, 0.0))
    return "model"


def padding_efficiency(progress: Progress) -> float:
    return round(progress.real_tokens / progress.padded_tokens, 4) if progress.padded_tokens else 1.0


def write_report(summary: RunSummary, config: RunConfig) -> RunSummary:
    if config.report:
        storage.write_bytes(config.report, json.dumps(summary.as_dict(), indent=2).encode())
    return summary
