"""Read stage: find the input files, validate their schemas, stream rows in windows.

Everything is checked from the Parquet footers before any model work, so a bad input
ends the run in seconds with a message that names the file and the column.

With a question list (--questions, questions.py) the input holds documents: each window of
documents is expanded here into its (row, question) pairs, ordered by row then question, so
the stages after this one see pairs as usual while the cross product exists for one window
at a time only (a passage is one string shared by its pairs, and tokenized once).
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .. import storage
from ..counts import Count
from ..errors import UsageError
from ..wording import plural
from .questions import QuestionList


@dataclass(frozen=True)
class InputPlan:
    """What the read stage will stream: files, columns and row counts."""

    files: tuple[str, ...]
    passage_col: str
    question_col: str
    id_col: str | None  # None: rows are identified by their 0-based row number
    keep_columns: tuple[str, ...]
    total_rows: int  # from the Parquet footers
    file_rows: tuple[int, ...]  # rows of each file, from its footer (read once, here)
    id_type: pa.DataType | None
    keep_types: tuple[pa.DataType, ...]
    questions: QuestionList | None = None  # asked of every row (question_col unused); None: rows are pairs
    document_col: str | None = None  # --document-col: which document each row is a passage of
    document_type: pa.DataType | None = None

    @property
    def questions_per_row(self) -> int:
        """Questions of the list asked of every row; 0 when the rows are pairs."""
        return len(self.questions) if self.questions is not None else 0

    def count(self, rows: int) -> Count:
        """`rows` input rows, and the answers they give."""
        return Count(rows, self.questions_per_row)

    def count_answers(self, answers: int) -> Count:
        return Count.of_answers(answers, self.questions_per_row)


@dataclass
class RowBatch:
    """A window of consecutive input rows: one (passage, question) pair per entry.

    With a question list, entry `r * len(asked) + j` is input row `r` of the window asked
    question `j`; ids and kept columns are repeated to match.
    """

    first_row: int  # 0-based number of the first input row over all inputs
    passages: list[str | None]
    questions: list[str | None]
    ids: pa.Array | None  # the id column, as read
    kept: dict[str, pa.Array]  # --keep-columns, as read
    asked: QuestionList | None = None  # the question list every row was asked; None: one pair per row
    documents: pa.Array | None = None  # --document-col, as read

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def input_rows(self) -> int:
        """How many input rows the window covers."""
        return len(self) // len(self.asked) if self.asked is not None else len(self)


def ask_each(rows: RowBatch, asked: QuestionList) -> RowBatch:
    """A window of documents as its (row, question) pairs, ordered by row then question."""
    m, n = len(asked), len(rows.passages)
    take = pa.array(np.repeat(np.arange(n, dtype=np.int64), m))
    return RowBatch(
        first_row=rows.first_row,
        passages=[p for p in rows.passages for _ in range(m)],  # the same string object, m times
        questions=list(asked.questions) * n,
        ids=rows.ids.take(take) if rows.ids is not None else None,
        kept={c: a.take(take) for c, a in rows.kept.items()},
        asked=asked,
        documents=rows.documents.take(take) if rows.documents is not None else None,
    )


def directory_inputs(spec: str) -> list[str]:
    """Every *.parquet below a directory, sorted. pyarrow's dataset discovery skips names
    that start with '.' or '_' at any depth (hidden files, _SUCCESS, _temporary/ ...);
    qa-batch's own work directories of parts (*.partial/) are skipped too."""
    fs, path = storage.locate(spec)
    # an empty schema: list the files without opening any of them
    found = ds.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=[".", "_"], schema=pa.schema([])).files
    base = path.rstrip("/") + "/"
    relative = [f[len(base):] if f.startswith(base) else f.rsplit("/", 1)[-1] for f in found]
    return sorted(storage.join(spec, *r.split("/")) for r in relative
                  if r.endswith(".parquet") and not any(d.endswith(".partial") for d in r.split("/")[:-1]))


def resolve_inputs(specs: tuple[str, ...] | list[str]) -> list[str]:
    """Expand files, directories (every *.parquet below, sorted) and globs, in the order given.

    Each may be a local path or a URI (s3://, gs://, hdfs://, ...); see storage.py.
    """
    if not specs:
        raise UsageError("no input given: pass one or more Parquet files, directories or globs")
    files: list[str] = []
    for spec in specs:
        try:
            if glob.has_magic(spec.split("?")[0] if storage.is_uri(spec) else spec):
                matched = storage.glob_files(spec)
                if not matched:
                    raise UsageError(f"input glob {spec!r} matches no file")
                files.extend(matched)
            elif storage.is_dir(spec):
                found = directory_inputs(spec)
                if not found:
                    raise UsageError(f"input directory {spec!r} holds no *.parquet file")
                files.extend(found)
            elif storage.is_file(spec):
                files.append(spec)
            else:
                raise UsageError(f"input {spec!r} does not exist")
        except OSError as e:  # an object store refusing access, a host that cannot be reached
            raise UsageError(f"input {spec!r} cannot be listed: {e}") from None
    seen: set[str] = set()
    unique = []
    for f in files:
        key = storage.identity(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _logical(t: pa.DataType) -> str:
    """A type's name for comparing schemas: the string encodings all count as one."""
    return "string" if _is_string(t) else str(t)


def open_parquet(path: str) -> pq.ParquetFile:
    fs, inner = storage.locate(path)
    return pq.ParquetFile(inner, filesystem=fs)


def _read_schema(path: str) -> tuple[pa.Schema, int]:
    try:
        meta = open_parquet(path).metadata
        return meta.schema.to_arrow_schema(), meta.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise UsageError(f"{path}: not a readable Parquet file ({e})") from None


def plan_inputs(
    specs: tuple[str, ...] | list[str],
    passage_col: str,
    question_col: str,
    id_col: str | None,
    keep_columns: tuple[str, ...] = (),
    questions: QuestionList | None = None,
    document_col: str | None = None,
) -> InputPlan:
    """Resolve the inputs and check every file's schema; raise UsageError on the first problem.

    With `questions` the inputs need no question column: every row is asked the list.
    `document_col`: rows sharing its value are one document (documents.py)."""
    twice = sorted({c for c in keep_columns if keep_columns.count(c) > 1})
    if twice:
        raise UsageError(f"--keep-columns names {', '.join(twice)} more than once: name each column once")
    files = resolve_inputs(specs)
    schemas = [(f, *_read_schema(f)) for f in files]

    first_file, first_schema, _ = schemas[0]
    if id_col is None and "id" in first_schema.names:
        id_col = "id"
    if questions is not None and question_col in first_schema.names:
        logging.getLogger("qa_batch").warning(
            "the input's %r column is ignored: every row is asked the %s of %s", question_col,
            plural(len(questions), "question"), questions.source)
    asks = [] if questions is not None else [question_col]
    wanted = [passage_col] + asks + ([id_col] if id_col else []) + list(keep_columns) + \
        ([document_col] if document_col else [])
    reference: dict[str, str] = {}
    for path, schema, _ in schemas:
        for col in wanted:
            if col not in schema.names:
                found = ", ".join(schema.names) or "(none)"
                hint = {
                    passage_col: " (set its name with --passage-col)",
                    question_col: " (set its name with --question-col, or ask every row the same questions "
                                  "with --questions FILE or --question TEXT)",
                    id_col: " (set its name with --id-col)",
                    document_col: " (name the column that says which document each row belongs to with "
                                  "--document-col)",
                }.get(col, "")
                raise UsageError(f"{path}: column {col!r} is missing{hint}; columns found: {found}")
            t = schema.field(col).type
            if col in (passage_col, question_col) and not _is_string(t):
                raise UsageError(
                    f"{path}: column {col!r} has type {t}, but text is needed (string); "
                    f"columns found: {', '.join(f'{n}: {schema.field(n).type}' for n in schema.names)}"
                )
            if col == document_col:
                _check_document_key(path, col, t)
            if col not in reference:
                reference[col] = _logical(t)
            elif reference[col] != _logical(t):
                raise UsageError(
                    f"inputs disagree: column {col!r} is {reference[col]} in {first_file} "
                    f"but {_logical(t)} in {path}"
                )
    return InputPlan(
        files=tuple(files),
        passage_col=passage_col,
        question_col=question_col,
        id_col=id_col,
        keep_columns=tuple(keep_columns),
        total_rows=sum(n for _, _, n in schemas),
        file_rows=tuple(n for _, _, n in schemas),
        id_type=first_schema.field(id_col).type if id_col else None,
        keep_types=tuple(first_schema.field(c).type for c in keep_columns),
        questions=questions,
        document_col=document_col,
        document_type=_plain_type(first_schema.field(document_col).type) if document_col else None,
    )


def _check_document_key(path: str, column: str, t: pa.DataType) -> None:
    """A document key must compare exactly: text, integers, dates (floats and nested types do not)."""
    plain = _plain_type(t)
    if not (_is_string(plain) or pa.types.is_integer(plain) or pa.types.is_date(plain)
            or pa.types.is_binary(plain) or pa.types.is_large_binary(plain)):
        raise UsageError(f"{path}: --document-col {column} has type {t}; a document key must be text, an integer or a "
                         "date (values that compare exactly): cast it, or name another column")


def _plain(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Combine chunks and decode dictionaries so that windows concatenate cleanly."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def _plain_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def read_windows(plan: InputPlan, rows_per_window: int, limit: int | None = None,
                 start_row: int = 0) -> Iterator[RowBatch]:
    """Stream the inputs as windows of at most `rows_per_window` rows, in input order.

    Memory holds one Parquet record batch and one window, whatever the table's size.
    `start_row` skips rows already answered (whole files and row groups unread). With a
    question list, each window of `rows_per_window` documents comes as its pairs (ask_each).
    """
    columns = [plan.passage_col] + ([plan.question_col] if plan.questions is None else [])
    if plan.id_col:
        columns.append(plan.id_col)
    columns += [c for c in plan.keep_columns if c not in columns]
    if plan.document_col and plan.document_col not in columns:
        columns.append(plan.document_col)
    remaining = (plan.total_rows if limit is None else min(limit, plan.total_rows)) - start_row
    row = start_row
    skip = start_row
    pending: list[dict[str, pa.Array]] = []
    pending_rows = 0
    text_cols = {plan.passage_col, plan.question_col}
    target = {c: _plain_type(t) for c, t in zip(plan.keep_columns, plan.keep_types)}
    if plan.id_col:
        target[plan.id_col] = _plain_type(plan.id_type)
    if plan.document_col:
        target[plan.document_col] = plan.document_type

    def normalize(rb: pa.RecordBatch) -> dict[str, pa.Array]:
        # Files may differ in string encoding (string, large_string, dictionary): unify here.
        out = {}
        for c in columns:
            arr = _plain(rb.column(c))
            out[c] = arr.cast(pa.large_string()) if c in text_cols else arr.cast(target[c])
        return out

    def flush() -> RowBatch:
        nonlocal pending, pending_rows, row
        col = {c: pa.concat_arrays([p[c] for p in pending]) for c in columns}
        batch = RowBatch(
            first_row=row,
            passages=col[plan.passage_col].to_pylist(),
            questions=col[plan.question_col].to_pylist() if plan.questions is None else [],
            ids=col[plan.id_col] if plan.id_col else None,
            kept={c: col[c] for c in plan.keep_columns},
            documents=col[plan.document_col] if plan.document_col else None,
        )
        row += pending_rows
        pending, pending_rows = [], 0
        return batch if plan.questions is None else ask_each(batch, plan.questions)

    for path, n_rows in zip(plan.files, plan.file_rows):
        if remaining <= 0:
            break
        if skip >= n_rows:  # answered already: not even its footer is read again
            skip -= n_rows
            continue
        try:
            pf = open_parquet(path)
            groups = list(range(pf.metadata.num_row_groups))
            while groups and skip >= pf.metadata.row_group(groups[0]).num_rows:  # unread, whole
                skip -= pf.metadata.row_group(groups.pop(0)).num_rows
            if not groups:
                continue
            for rb in pf.iter_batches(batch_size=rows_per_window, columns=columns, row_groups=groups):
                if skip:
                    take = min(skip, rb.num_rows)
                    rb, skip = rb.slice(take), skip - take
                rb = rb.slice(0, min(rb.num_rows, remaining))
                remaining -= rb.num_rows
                while rb.num_rows:
                    take = min(rb.num_rows, rows_per_window - pending_rows)
                    pending.append(normalize(rb.slice(0, take)))
                    pending_rows += take
                    rb = rb.slice(take)
                    if pending_rows == rows_per_window:
                        yield flush()
                if remaining <= 0:
                    break
        except (pa.ArrowInvalid, OSError) as e:
            raise UsageError(f"{path}: could not read Parquet data ({e})") from None
    if pending_rows:
        yield flush()
