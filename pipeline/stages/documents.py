"""Documents stored as many rows (--document-col, --across-rows): one answer per document.

A document is the rows that share the --document-col value (pages, clauses, paragraphs), in
input order; with --across-rows the whole table is one document. Each (passage, question)
pair is chunked, run and merged alone as usual (chunks never cross passages), but a window's
table keeps the pair's candidates instead of its answer: its best distinct spans (at least
two, --top-k of them with more), its null score, the log-sum-exp of its span scores, its
chunks and its error. Assembly reduces those tables by (document, question), streamed in
input order, holding per group only its best candidates and three numbers:

    candidates  the best distinct spans of every passage, best first (ties: the earlier
                passage, then the pair's own order)
    null_score  the minimum over every chunk of every passage
    log_norm    logsumexp of every passage's log_norm (every span of the document)

and then chooses the answer as merge.py does for one row (`merge.choose`): the best span;
with --allow-null the null answer when null_score - score > --null-threshold; confidence
exp(score - logsumexp(log_norm, null_score)), the null term only with --allow-null. So a
document's answer is exactly the best-scoring span of its pairs answered alone, and its
confidence a softmax over every candidate of every passage.

Output rows come one per (document, question), in order of first appearance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UsageError
from .answers import Answer, RowAnswer
from .merge import choose
from .write import answer_fields, asked_fields
from .read import InputPlan, RowBatch

CANDIDATE = pa.struct([("text", pa.large_string()), ("start", pa.int64()), ("end", pa.int64()),
                       ("score", pa.float32())])
NO_SPAN = "no valid answer span in any passage of the document"
ROWS_PER_TABLE = 8192  # grouped answers written per table (a multiple of the question list's length)


@dataclass(frozen=True)
class Grouping:
    """Which rows form one document: those sharing `column`'s value, or every row (column None)."""

    column: str | None  # None: --across-rows

    @property
    def option(self) -> str:
        return f"--document-col {self.column}" if self.column else "--across-rows"


def passage_type(plan: InputPlan) -> pa.DataType:
    """What names a passage row: the --id-col value, else the 0-based row number."""
    if plan.id_col is None:
        return pa.int64()
    return plan.id_type.value_type if pa.types.is_dictionary(plan.id_type) else plan.id_type


def pair_schema(plan: InputPlan, grouping: Grouping) -> pa.Schema:
    """A window's table (a part, a Ray shard): one row per (passage, question) pair."""
    doc = [pa.field(grouping.column, plan.document_type)] if grouping.column else []
    return pa.schema([
        *doc,
        pa.field("passage", passage_type(plan)),
        *asked_fields(plan),
        pa.field("question", pa.large_string()),
        pa.field("candidates", pa.list_(CANDIDATE)),
        pa.field("null_score", pa.float32()),  # null: the pair could not be answered (see `error`)
        pa.field("log_norm", pa.float64()),  # logsumexp of the pair's span scores (-inf: no span)
        pa.field("chunks", pa.int32()),
        pa.field("error", pa.string()),
    ])


def answer_struct(plan: InputPlan) -> pa.DataType:
    return pa.struct([("text", pa.string()), ("start", pa.int64()), ("end", pa.int64()), ("score", pa.float32()),
                      ("confidence", pa.float32()), ("passage", passage_type(plan))])


def document_schema(plan: InputPlan, grouping: Grouping, top_k: int) -> pa.Schema:
    """The output: one row per (document, question); documented in README.md ("Output schema")."""
    doc = [pa.field(grouping.column, plan.document_type)] if grouping.column else []
    fields = [*doc, *asked_fields(plan),
              *answer_fields(top_k, answer_struct(plan), passage=passage_type(plan), passages=True)]
    names = [f.name for f in fields]
    if grouping.column and names.count(grouping.column) > 1:
        raise UsageError(f"--document-col {grouping.column}: the output has a column {grouping.column!r} of its own; "
                         "rename the input's document column")
    return pa.schema(fields)


def pairs_table(schema: pa.Schema, rows: RowBatch, answers: list[RowAnswer], grouping: Grouping) -> pa.Table:
    """A window's pairs with their candidates (merged with top_k = the candidates wanted, no null
    decision: that is the document's). A pair with no valid span but with chunks is not an
    error: its null score and chunks count for its document."""
    n = len(answers)
    per_row = len(rows.asked) if rows.asked is not None else 1
    cols: dict[str, pa.Array] = {}
    if grouping.column:
        cols[grouping.column] = rows.documents
    cols["passage"] = rows.ids if rows.ids is not None else pa.array(
        rows.first_row + np.arange(n, dtype=np.int64) // per_row, pa.int64())
    if rows.asked is not None:
        which = np.arange(n, dtype=np.int32) % per_row
        if rows.asked.fields is not None:
            cols["field"] = pa.array(rows.asked.fields, pa.string()).take(pa.array(which))
        else:
            cols["question_index"] = pa.array(which, pa.int32())
    cols["question"] = pa.array(rows.questions, pa.large_string())
    cols["candidates"] = pa.array([[{"text": c.text, "start": c.start, "end": c.end, "score": c.score}
                                    for c in a.candidates] for a in answers], pa.list_(CANDIDATE))
    answered = [a.null_score is not None for a in answers]
    cols["null_score"] = pa.array([a.null_score for a in answers], pa.float32())
    cols["log_norm"] = pa.array([(a.log_norm if a.log_norm is not None else -math.inf) if ok else None
                                 for a, ok in zip(answers, answered)], pa.float64())
    cols["chunks"] = pa.array([a.chunks for a in answers], pa.int32())
    cols["error"] = pa.array([None if ok else a.error for a, ok in zip(answers, answered)], pa.string())
    return pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)


def count_pairs(table: pa.Table) -> dict:
    """rows, chunks, answered (pairs with a span) and errors of a window's pairs table."""
    return {
        "rows": table.num_rows,
        "chunks": pc.sum(table["chunks"]).as_py() or 0,
        "answered": pc.sum(pc.greater(pc.list_value_length(table["candidates"]), 0)).as_py() or 0,
        "errors": table.num_rows - table["error"].null_count,
    }


@dataclass
class PassageAnswer(Answer):
    """A span of a document: which passage row it lies in (its offsets are that passage's)."""

    passage: object = None


@dataclass
class _Group:
    """What one (document, question) keeps while its pairs stream past."""

    document: object
    asked: object  # the field or question index (a question list), else None
    question: str | None
    candidates: list[tuple[float, int, PassageAnswer]] = field(default_factory=list)  # (-score, order, span)
    null_score: float = math.inf
    log_norm: float = -math.inf
    chunks: int = 0
    passages: int = 0
    answered: int = 0
    errors: int = 0
    first_error: str | None = None


class Grouper:
    """Pairs tables in input order -> one answer per (document, question), in order of first
    appearance. Memory: the groups and their best candidates, never the pairs."""

    def __init__(self, plan: InputPlan, grouping: Grouping, top_k: int, allow_null: bool, null_threshold: float):
        self.plan, self.grouping, self.top_k = plan, grouping, top_k
        self.allow_null, self.null_threshold = allow_null, null_threshold
        self.wanted = max(top_k, 2)
        self.groups: dict[tuple, _Group] = {}
        self.seen = 0  # pairs fed so far: orders candidates of equal score

    def feed(self, table: pa.Table) -> None:
        n = table.num_rows
        docs = table.column(self.grouping.column).to_pylist() if self.grouping.column else [None] * n
        asked_col = "field" if "field" in table.column_names else "question_index" if "question_index" in \
            table.column_names else None
        asked = table.column(asked_col).to_pylist() if asked_col else [None] * n
        questions = table.column("question").to_pylist()
        passages = table.column("passage").to_pylist()
        candidates = table.column("candidates").to_pylist()
        nulls = table.column("null_score").to_pylist()
        norms = table.column("log_norm").to_pylist()
        chunks = table.column("chunks").to_pylist()
        errors = table.column("error").to_pylist()
        for i in range(n):
            key = (docs[i], asked[i] if asked_col else questions[i])
            g = self.groups.get(key)
            if g is None:
                g = self.groups[key] = _Group(docs[i], asked[i], questions[i])
            order = self.seen * self.wanted
            self.seen += 1
            g.passages += 1
            g.chunks += chunks[i]
            if nulls[i] is None:
                g.errors += 1
                g.first_error = g.first_error or errors[i]
                continue
            g.answered += 1
            g.null_score = min(g.null_score, nulls[i])
            g.log_norm = float(np.logaddexp(g.log_norm, norms[i]))
            if candidates[i]:
                new = [(-c["score"], order + j, PassageAnswer(c["text"], c["start"], c["end"], c["score"], 0.0,
                                                              passages[i])) for j, c in enumerate(candidates[i])]
                g.candidates = sorted(g.candidates + new, key=lambda t: t[:2])[: self.wanted]

    def answers(self, group: _Group) -> RowAnswer:
        if not group.answered:
            return RowAnswer(None, None, None, None, group.chunks,
                             f"no passage of the document could be answered ({group.errors} of {group.passages} "
                             f"with errors; the first: {group.first_error})", [])
        return choose([c for _, _, c in group.candidates], group.null_score, group.log_norm, group.chunks,
                      self.top_k, self.allow_null, self.null_threshold, no_span=NO_SPAN)

    def results(self, schema: pa.Schema, calibrate_answers=None) -> Iterator[pa.Table]:
        """The grouped answers as tables of whole documents (every question of a document in one
        table), in order of first appearance. `calibrate_answers` (a --calibration): applied to
        each table's answers."""
        groups = list(self.groups.values())
        step = ROWS_PER_TABLE * max(1, self.plan.questions_per_row)
        for at in range(0, len(groups), step):
            part = groups[at: at + step]
            answers = [self.answers(g) for g in part]
            if calibrate_answers is not None:
                answers = calibrate_answers(answers)
            yield self._table(schema, part, answers)
        if not groups:
            yield schema.empty_table()

    def _table(self, schema: pa.Schema, groups: list[_Group], answers: list[RowAnswer]) -> pa.Table:
        cols: dict[str, list] = {f.name: [] for f in schema}
        for g, a in zip(groups, answers):
            if self.grouping.column:
                cols[self.grouping.column].append(g.document)
            if "field" in cols:
                cols["field"].append(g.asked)
            if "question_index" in cols:
                cols["question_index"].append(g.asked)
            cols["question"].append(g.question)
            best = a.answer
            cols["answer"].append(best.text if best else None)
            cols["passage"].append(best.passage if best else None)
            cols["answer_start"].append(best.start if best else None)
            cols["answer_end"].append(best.end if best else None)
            cols["score"].append(a.score)
            cols["confidence"].append(a.confidence)
            cols["null_score"].append(a.null_score)
            cols["runner_up_score"].append(a.runner_up_score)
            cols["log_norm"].append(a.log_norm)
            cols["chunks"].append(a.chunks)
            cols["passages"].append(g.passages)
            cols["error"].append(a.error)
            if "answers" in cols:
                cols["answers"].append([{"text": t.text, "start": t.start, "end": t.end, "score": t.score,
                                         "confidence": t.confidence, "passage": t.passage} for t in a.top])
        return pa.Table.from_pydict(cols, schema=schema)
