"""Write stage: the output schema and the answers of a window as an Arrow table.

Windows are written as parts of a work directory and become the output file in one
rename at the end (resume.py), so no partial output ever stands at the output path.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from ..errors import UsageError
from .answers import RowAnswer
from .read import InputPlan, RowBatch

ANSWER_STRUCT = pa.struct([
    ("text", pa.string()), ("start", pa.int64()), ("end", pa.int64()),
    ("score", pa.float32()), ("confidence", pa.float32()),
])
METADATA_KEY = b"qa_batch"


def asked_fields(plan: InputPlan) -> list[pa.Field]:
    """With a question list, the column naming each row's question: its `field`, else its
    `question_index`; none for a table of pairs. Shared by both output shapes."""
    if plan.questions is None:
        return []
    return [pa.field("field", pa.string()) if plan.questions.fields is not None else pa.field("question_index", pa.int32())]


def answer_fields(top_k: int, answer_struct: pa.DataType, passage: pa.DataType | None = None,
                  passages: bool = False) -> list[pa.Field]:
    """The answer's columns, shared by both output shapes: a document's answer adds the passage
    it was found in (after `answer`) and how many passages it had (after `chunks`)."""
    return [
        pa.field("question", pa.large_string()),
        pa.field("answer", pa.large_string()),
        *([pa.field("passage", passage)] if passage is not None else []),
        pa.field("answer_start", pa.int64()),
        pa.field("answer_end", pa.int64()),
        pa.field("score", pa.float32()),
        pa.field("confidence", pa.float32()),
        pa.field("null_score", pa.float32()),
        pa.field("runner_up_score", pa.float32()),
        pa.field("log_norm", pa.float32()),
        pa.field("chunks", pa.int32()),
        *([pa.field("passages", pa.int32())] if passages else []),
        pa.field("error", pa.string()),
        *([pa.field("answers", pa.list_(answer_struct))] if top_k > 1 else []),
    ]


def output_schema(plan: InputPlan, top_k: int) -> pa.Schema:
    """The output columns; documented in README.md ("Output schema"). With a question list: one
    row per (input row, question), the question named by its `field`, else its `question_index`."""
    key = pa.field(plan.id_col, plan.id_type.value_type if pa.types.is_dictionary(plan.id_type)
                   else plan.id_type) if plan.id_col else pa.field("row", pa.int64())
    fields = [key, *asked_fields(plan), *answer_fields(top_k, ANSWER_STRUCT)]
    taken = {f.name for f in fields}
    for name, t in zip(plan.keep_columns, plan.keep_types):
        if name in (plan.id_col, plan.question_col if plan.questions is None else None) and name in taken:
            continue  # already there, with the same values
        if name in taken:
            raise UsageError(f"--keep-columns {name}: the output has a column {name!r} of its own, so the input's "
                             "would be lost; rename that input column, or leave it out of --keep-columns")
        fields.append(pa.field(name, t.value_type if pa.types.is_dictionary(t) else t))
    return pa.schema(fields)


def answers_table(schema: pa.Schema, rows: RowBatch, answers: list[RowAnswer], top_k: int,
                  id_col: str | None) -> pa.Table:
    """One output row per (input row, question) pair of the window, in input order."""
    n = len(answers)
    cols: dict[str, pa.Array] = {}
    per_row = len(rows.asked) if rows.asked is not None else 1
    if id_col:
        cols[id_col] = rows.ids
    else:
        cols["row"] = pa.array(rows.first_row + np.arange(n, dtype=np.int64) // per_row, pa.int64())
    if rows.asked is not None:
        which = np.arange(n, dtype=np.int32) % per_row
        if rows.asked.fields is not None:
            cols["field"] = pa.array(rows.asked.fields, pa.string()).take(pa.array(which))
        else:
            cols["question_index"] = pa.array(which, pa.int32())
    cols["question"] = pa.array(rows.questions, pa.large_string())
    cols["answer"] = pa.array([a.answer.text if a.answer else None for a in answers], pa.large_string())
    cols["answer_start"] = pa.array([a.answer.start if a.answer else None for a in answers], pa.int64())
    cols["answer_end"] = pa.array([a.answer.end if a.answer else None for a in answers], pa.int64())
    cols["score"] = pa.array([a.score for a in answers], pa.float32())
    cols["confidence"] = pa.array([a.confidence for a in answers], pa.float32())
    cols["null_score"] = pa.array([a.null_score for a in answers], pa.float32())
    cols["runner_up_score"] = pa.array([a.runner_up_score for a in answers], pa.float32())
    cols["log_norm"] = pa.array([a.log_norm for a in answers], pa.float32())
    cols["chunks"] = pa.array([a.chunks for a in answers], pa.int32())
    cols["error"] = pa.array([a.error for a in answers], pa.string())
    if top_k > 1:
        cols["answers"] = pa.array(
            [[vars(x) for x in a.top] for a in answers], pa.list_(ANSWER_STRUCT))
    for name, arr in rows.kept.items():
        if name not in cols:
            cols[name] = arr
    return pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)


def count_answers(table: pa.Table) -> dict:
    """rows, chunks, answered and errors of an output table (or part of one)."""
    return {
        "rows": table.num_rows,
        "chunks": pc.sum(table["chunks"]).as_py() or 0,
        "answered": table.num_rows - table["answer"].null_count,
        "errors": table.num_rows - table["error"].null_count,
    }


def read_metadata(path: str) -> dict:
    """The qa-batch metadata of an output file (model, options, times, counts)."""
    fs, inner = storage.locate(path)
    meta = pq.read_metadata(inner, filesystem=fs).metadata or {}
    return json.loads(meta[METADATA_KEY])
