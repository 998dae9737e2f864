"""The question list of `--questions FILE` / `--question TEXT`: every question asked of every row.

    --questions fields.txt       one question a line (blank lines skipped)
    --questions fields.csv       a `question` column and an optional `field` column naming each
    --questions fields.parquet   the same columns
    --question "..." (repeated)  the questions themselves

This is the read stage's other input: it is loaded and checked here, before any model work,
and read.py asks it of each window of rows (read -> chunk: a window of documents becomes its
(row, question) pairs, ordered by row then question; the cross product is never built for
the whole table). Nothing is asked twice: the questions of a list are distinct, and so are
its field names; a question that leaves no room for the passage (--max-seq-len,
--doc-stride) is refused with its name, since it would fail for every long passage.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow as pa

from .. import storage
from ..errors import UsageError
from ..wording import plural


@dataclass(frozen=True)
class QuestionList:
    """The questions asked of every row, in the order answers are written."""

    questions: tuple[str, ...]
    fields: tuple[str, ...] | None  # each question's name (--questions table with a `field` column), else None
    source: str  # where they came from, for messages: the file, or "--question"

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def names(self) -> tuple[str, ...]:
        """What --wide names each question's columns by: its field, else q0, q1, ..."""
        return self.fields if self.fields is not None else tuple(f"q{i}" for i in range(len(self.questions)))

    def label(self, i: int) -> str:
        """Question i as messages name it."""
        what = f"field {self.fields[i]!r}" if self.fields is not None else f"question {i}"
        return f"{what} ({_short(self.questions[i])})"

    def as_dict(self) -> dict:
        """As the output's metadata holds it (`questions`)."""
        return {"source": self.source, "questions": list(self.questions),
                "fields": None if self.fields is None else list(self.fields)}

    @classmethod
    def from_dict(cls, d: dict) -> "QuestionList":
        return cls(tuple(d["questions"]), None if d.get("fields") is None else tuple(d["fields"]), d["source"])


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def load(path: str | None, inline: tuple[str, ...] | list[str] = ()) -> QuestionList | None:
    """The list of --questions PATH or of the --question texts; None when neither is given."""
    if path and inline:
        raise UsageError("give the questions either in a file (--questions) or one by one (--question), not both")
    if not path and not inline:
        return None
    if inline:
        rows, fields, source = [_text(q) for q in inline], None, "--question"
    else:
        rows, fields = _read(path)
        source = f"--questions {path}"
    questions = []
    for i, q in enumerate(rows):
        if q is None or not q.strip():
            where = f"field {fields[i]!r}" if fields and fields[i] else f"question {i + 1}"
            raise UsageError(f"{source}: {where} is empty; every question needs text")
        questions.append(q.strip())
    if not questions:
        raise UsageError(f"{source} holds no question: give at least one")
    _distinct(source, "question", questions)
    if fields is not None:
        for i, f in enumerate(fields):
            if f is None or not f.strip():
                raise UsageError(f"{source}: the question {_short(questions[i])} has no field name; name every "
                                 "question, or leave out the field column")
        fields = [f.strip() for f in fields]
        _distinct(source, "field name", fields)
    return QuestionList(tuple(questions), None if fields is None else tuple(fields), source)


def _text(q) -> str | None:
    return q if q is None or isinstance(q, str) else str(q)


def _distinct(source: str, what: str, values: list[str]) -> None:
    first: dict[str, int] = {}
    for i, v in enumerate(values):
        if v in first:
            raise UsageError(f"{source}: the {what} {_short(v)} is given twice (number {first[v] + 1} and {i + 1}): "
                             f"each {what} must be given once")
        first[v] = i


def _read(path: str) -> tuple[list[str | None], list[str | None] | None]:
    """The questions of a file, and its field names when it has a `field` column."""
    where = f"--questions {path}"
    name = path.split("?")[0].lower()
    try:
        try:
            found = storage.is_file(path)
        except UsageError as e:  # an unreachable bucket or host: say which option named it
            raise UsageError(f"{where}: {e.message}") from None
        if not found:
            raise UsageError(f"{where}: no such file")
        if name.endswith(".parquet"):
            table = storage.read_table(path)
        elif name.endswith(".csv"):
            import pyarrow.csv as pacsv

            data = storage.read_bytes(path)
            if not data.strip():
                raise UsageError(f"{where}: the file is empty: give a header line 'question' (and 'field'), "
                                 "then one question a line")
            # one thread: pyarrow's threaded CSV reader aborted the process now and then (torch loaded)
            table = pacsv.read_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(use_threads=False),
                                   convert_options=pacsv.ConvertOptions(strings_can_be_null=True,
                                                                        column_types={"question": pa.string(),
                                                                                      "field": pa.string()}))
        elif name.endswith(".txt"):
            text = storage.read_bytes(path).decode("utf-8-sig")  # a BOM (Windows editors) is not text
            return [line for line in text.splitlines() if line.strip()], None
        else:
            raise UsageError(f"{where}: give a .txt file (one question a line), or a .csv or .parquet table "
                             "with a 'question' column and an optional 'field' column")
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: not UTF-8 text ({e})") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise UsageError(f"{where}: cannot be read ({e})") from None
    if "question" not in table.column_names:
        raise UsageError(f"{where}: column 'question' is missing; columns found: "
                         f"{', '.join(table.column_names) or '(none)'}")
    for col in ("question", "field"):
        if col in table.column_names and not _is_text(table.schema.field(col).type):
            raise UsageError(f"{where}: column {col!r} has type {table.schema.field(col).type}, but text is needed")
    questions = table.column("question").cast(pa.large_string()).to_pylist()
    fields = table.column("field").cast(pa.large_string()).to_pylist() if "field" in table.column_names else None
    return questions, fields


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def check_fit(questions: QuestionList, tokenizer, max_seq_len: int, doc_stride: int,
              max_question_len: int | None) -> None:
    """Refuse a question that leaves no more than --doc-stride passage tokens per chunk (it would
    give every passage longer than one chunk an error). `max_question_len`: --truncate-question."""
    from .chunk import Chunker

    chunker = Chunker(tokenizer, max_seq_len, doc_stride, max_question_len)
    for i, ids in enumerate(chunker.question_tokens(list(questions.questions))):
        n = len(ids)
        left = max_seq_len - chunker.template.n_special - n
        if left <= doc_stride:
            cut = " after --truncate-question" if max_question_len is not None else ""
            fix = ("lower --max-question-len" if max_question_len is not None else "pass --truncate-question")
            raise UsageError(
                f"{questions.source}: {questions.label(i)} is too long for --max-seq-len {max_seq_len}: its "
                f"{plural(n, 'token')}{cut} {'leaves' if n == 1 else 'leave'} {plural(max(left, 0), 'passage token')} "
                f"per chunk, which must exceed --doc-stride {doc_stride}. Shorten it, raise --max-seq-len, lower "
                f"--doc-stride, or {fix}")


def plan_questions(config) -> QuestionList | None:
    """The run's question list (None for a table of pairs), checked against the model's tokenizer
    before the model itself is loaded. Both engines call this while planning the job."""
    questions = load(config.questions, config.question)
    if questions is None:
        if config.wide:
            raise UsageError("--wide needs a question list: --questions FILE or --question TEXT")
        return None
    from ..models.checkpoint import load_tokenizer

    check_fit(questions, load_tokenizer(config.model), config.max_seq_len, config.doc_stride,
              config.max_question_len if config.truncate_question else None)
    return questions
