"""Write stage, --wide: one output row per input row, a group of columns per question.

    long: id  field     question   answer  answer_start ... score ...
          7   supplier  Who is...  ACME    112               8.1
          7   term      When...    null    null              -0.4
    wide: id  supplier  supplier_start ... supplier_score ...  term  term_start ... term_score ...
          7   ACME      112                8.1                 null  null           -0.4

Windows are answered, kept as parts (or Ray shards) and counted in the long form, whose rows
come by input row, then in the question list's order; each window is pivoted as the output is
written, by slicing that order (no sort, no join). A question's columns are named by its field,
else `q<index>`: `<name>` (the answer), `<name>_start`, `<name>_end`, and `<name>_<column>` for
every other answer column of the long form. The question texts are in the output's metadata
(`questions`), and `to_long` turns a wide table back into the long one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import UsageError
from .questions import QuestionList

# The long form's columns that hold one question's answer, in their order there.
ANSWER_COLUMNS = ("answer", "passage", "answer_start", "answer_end", "score", "confidence", "null_score",
                  "runner_up_score", "log_norm", "chunks", "passages", "error", "answers")
DOCUMENT_ONLY = ("passage", "passages")  # answer columns of a document's answer (documents.py): kept columns else
_ASKED = ("field", "question_index", "question")  # what the wide form's column names say instead


def wide_name(name: str, column: str) -> str:
    """The wide column of one question's long `column`: supplier, supplier_start, supplier_score, ..."""
    return name if column == "answer" else f"{name}_{column.removeprefix('answer_')}"


@dataclass(frozen=True)
class Pivot:
    """Long tables of whole input rows -> the wide output table, for one question list."""

    long: pa.Schema
    schema: pa.Schema  # the wide output's
    questions: QuestionList
    answer_columns: tuple[str, ...]  # the long form's columns that hold one question's answer

    @classmethod
    def build(cls, long: pa.Schema, questions: QuestionList, documents: bool = False) -> "Pivot":
        """UsageError when two columns of the wide form would have one name. `documents`: the long
        form holds documents' answers (their `passage` and `passages` are answer columns)."""
        answer_cols = tuple(c for c in ANSWER_COLUMNS if c in long.names and (documents or c not in DOCUMENT_ONLY))
        key, kept = long.field(0), [f for f in long if f.name not in (long.field(0).name, *_ASKED, *answer_cols)]
        made: dict[str, str] = {key.name: f"the key column {key.name!r}"}
        made.update({f.name: f"the kept column {f.name!r}" for f in kept})
        fields = [key]
        for j, name in enumerate(questions.names):
            for c in answer_cols:
                column = wide_name(name, c)
                if column in made:
                    raise UsageError(f"--wide: {questions.label(j)} would make a column {column!r}, as "
                                     f"{made[column]} does: rename one of them ({questions.source})")
                made[column] = questions.label(j)
                fields.append(pa.field(column, long.field(c).type))
        return cls(long, pa.schema(fields + kept), questions, answer_cols)

    def __call__(self, table: pa.Table) -> pa.Table:
        """The wide rows of a long table that holds every question of each of its input rows."""
        m = len(self.questions)
        n = table.num_rows
        if n % m:
            raise ValueError(f"a long table of {n} rows does not hold {m} questions per input row")
        firsts = pa.array(np.arange(0, n, m, dtype=np.int64))
        columns = {}
        for f in self.long:
            if f.name not in _ASKED and f.name not in self.answer_columns:  # the key and the kept columns
                columns[f.name] = table.column(f.name).take(firsts)
        for j, name in enumerate(self.questions.names):
            rows_j = pa.array(np.arange(j, n, m, dtype=np.int64))
            for c in self.answer_columns:
                columns[wide_name(name, c)] = table.column(c).take(rows_j)
        return pa.Table.from_pydict({f.name: columns[f.name] for f in self.schema}, schema=self.schema)


def to_long(table: pa.Table, questions: QuestionList) -> pa.Table:
    """The long form of a --wide output (its question list: `QuestionList.from_dict` of the
    output metadata's `questions`): one row per (input row, question), by row then question."""
    m, n = len(questions), table.num_rows
    names = questions.names
    generated = {wide_name(name, c) for name in names for c in ANSWER_COLUMNS}
    key = table.schema.field(0)
    kept = [f for f in table.schema if f.name != key.name and f.name not in generated]
    repeat = pa.array(np.repeat(np.arange(n, dtype=np.int64), m))
    which = np.tile(np.arange(m, dtype=np.int32), n)
    interleave = pa.array(which.astype(np.int64) * n + np.repeat(np.arange(n, dtype=np.int64), m))
    columns: dict[str, pa.ChunkedArray | pa.Array] = {key.name: table.column(key.name).take(repeat)}
    if questions.fields is not None:
        columns["field"] = pa.array(questions.fields, pa.string()).take(pa.array(which))
    else:
        columns["question_index"] = pa.array(which, pa.int32())
    columns["question"] = pa.array(questions.questions, pa.large_string()).take(pa.array(which))
    for c in ANSWER_COLUMNS:
        if wide_name(names[0], c) in table.column_names:
            parts = [table.column(wide_name(name, c)) for name in names]
            columns[c] = pa.chunked_array([chunk for p in parts for chunk in p.chunks],
                                          type=parts[0].type).take(interleave)
    for f in kept:
        columns[f.name] = table.column(f.name).take(repeat)
    return pa.table(columns)


def long_form(table: pa.Table, path: str) -> pa.Table:
    """The qa-batch output read from `path` in the long form: a --wide one (its metadata names
    the questions) turned back by `to_long`, any other as it is. For the tools that read outputs."""
    from .. import storage
    from .write import read_metadata

    files = [path]
    if storage.is_dir(path):  # an --engine ray output: every file carries the job's metadata
        files = [f for f in storage.list_files(path) if storage.basename(f).endswith(".parquet")
                 and not storage.basename(f).startswith((".", "_"))][:1]
    try:
        meta = read_metadata(files[0]) if files else {}
    except (KeyError, ValueError, OSError):  # not written by qa-batch: taken as it is
        return table
    if meta.get("options", {}).get("wide") and meta.get("questions"):
        return to_long(table, QuestionList.from_dict(meta["questions"]))
    return table
