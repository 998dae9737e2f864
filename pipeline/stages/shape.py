"""Write stage: the output's shape, from the windows' tables to the output's.

Every window of rows becomes one table (a part of the work directory, or a Ray shard's
piece); assembly turns those tables, in input order, into the output's tables:

    PerPair       one output row per (passage, question) pair, as the window's table says;
                  with --wide each table pivoted (wide.py): one row per input row
    PerDocument   one output row per (document, question): the windows' tables hold each
                  pair's candidates, reduced by document at assembly (documents.py); with
                  --wide pivoted: one row per document

The engines write windows and assemble through this one interface, whatever the shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import pyarrow as pa

from .answers import RowAnswer
from .documents import Grouper, Grouping, count_pairs, document_schema, pair_schema, pairs_table
from .read import InputPlan, RowBatch
from .wide import Pivot
from .write import answers_table, count_answers, output_schema


@dataclass(frozen=True)
class PerPair:
    """One output row per (passage, question) pair; with --wide, one per input row."""

    plan: InputPlan
    top_k: int
    window_schema: pa.Schema  # a window's table: the long form
    pivot: Pivot | None = None

    grouped = False  # each window's output rows are its own (a Ray shard is written in the output's form)

    @classmethod
    def build(cls, plan: InputPlan, top_k: int, wide: bool) -> "PerPair":
        long = output_schema(plan, top_k)
        return cls(plan, top_k, long, Pivot.build(long, plan.questions) if wide else None)

    @property
    def schema(self) -> pa.Schema:
        """The output file's."""
        return self.pivot.schema if self.pivot is not None else self.window_schema

    def window_table(self, rows: RowBatch, answers: list[RowAnswer]) -> pa.Table:
        return answers_table(self.window_schema, rows, answers, self.top_k, self.plan.id_col)

    def count(self, table: pa.Table) -> dict:
        """rows, chunks, answered, errors of a window's table."""
        return count_answers(table)

    def output_table(self, table: pa.Table) -> pa.Table:
        """A window's table in the output's form (a Ray shard)."""
        return self.pivot(table) if self.pivot is not None else table

    def assemble(self, tables: Iterable[pa.Table], totals: dict) -> Iterator[pa.Table]:
        """The windows' tables, in input order, as the output's tables."""
        for t in tables:
            yield self.output_table(t)


@dataclass(frozen=True)
class PerDocument:
    """One output row per (document, question) (documents.py); with --wide, one per document."""

    plan: InputPlan
    grouping: Grouping
    top_k: int
    allow_null: bool  # the document's null decision (a calibration's null bias, else --allow-null)
    null_threshold: float
    window_schema: pa.Schema  # a window's table: its pairs and their candidates
    long: pa.Schema  # the grouped answers, one row per (document, question)
    pivot: Pivot | None = None
    calibrate_answers: Callable[[list[RowAnswer]], list[RowAnswer]] | None = None  # --calibration

    grouped = True  # a document's pairs may lie in any windows: the output exists only once all are in

    @classmethod
    def build(cls, plan: InputPlan, grouping: Grouping, top_k: int, wide: bool, allow_null: bool,
              null_threshold: float, calibrate_answers=None) -> "PerDocument":
        long = document_schema(plan, grouping, top_k)
        return cls(plan, grouping, top_k, allow_null, null_threshold, pair_schema(plan, grouping), long,
                   Pivot.build(long, plan.questions, documents=True) if wide else None, calibrate_answers)

    @property
    def schema(self) -> pa.Schema:
        return self.pivot.schema if self.pivot is not None else self.long

    def window_table(self, rows: RowBatch, answers: list[RowAnswer]) -> pa.Table:
        return pairs_table(self.window_schema, rows, answers, self.grouping)

    def count(self, table: pa.Table) -> dict:
        return count_pairs(table)

    def assemble(self, tables: Iterable[pa.Table], totals: dict) -> Iterator[pa.Table]:
        """Every window's pairs reduced by document, then the grouped answers; `totals` gets the
        documents' counts (documents, documents_answered, documents_null, documents_errors)."""
        grouper = Grouper(self.plan, self.grouping, self.top_k, self.allow_null, self.null_threshold)
        for t in tables:
            grouper.feed(t)
        counts = dict.fromkeys(("documents", "documents_answered", "documents_errors"), 0)
        for t in grouper.results(self.long, self.calibrate_answers):
            counts["documents"] += t.num_rows
            counts["documents_answered"] += t.num_rows - t["answer"].null_count
            counts["documents_errors"] += t.num_rows - t["error"].null_count
            yield self.pivot(t) if self.pivot is not None else t
        counts["documents_null"] = counts["documents"] - counts["documents_answered"] - counts["documents_errors"]
        totals.update(counts)


@dataclass(frozen=True)
class WithPartition:
    """Another shape's output with the partition columns of a table run appended (constant strings):
    Iceberg reads a file's partition from its columns."""

    inner: PerPair | PerDocument
    partition: tuple[tuple[str, str], ...]

    @property
    def window_schema(self) -> pa.Schema:
        return self.inner.window_schema

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([*self.inner.schema, *(pa.field(k, pa.string()) for k, _ in self.partition)])

    @property
    def grouped(self) -> bool:
        return self.inner.grouped

    def window_table(self, rows: RowBatch, answers: list[RowAnswer]) -> pa.Table:
        return self.inner.window_table(rows, answers)

    def count(self, table: pa.Table) -> dict:
        return self.inner.count(table)

    def _with_columns(self, t: pa.Table) -> pa.Table:
        for key, value in self.partition:
            t = t.append_column(pa.field(key, pa.string()), pa.array([value] * t.num_rows, pa.string()))
        return t

    def output_table(self, table: pa.Table) -> pa.Table:
        return self._with_columns(self.inner.output_table(table))

    def assemble(self, tables: Iterable[pa.Table], totals: dict) -> Iterator[pa.Table]:
        for t in self.inner.assemble(tables, totals):
            yield self._with_columns(t)


OutputShape = PerPair | PerDocument | WithPartition
