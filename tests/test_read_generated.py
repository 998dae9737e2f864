"""The read stage on generated inputs: whatever the files' encodings, sizes and row groups,
the rows read equal what pyarrow and polars read from the same files, in the same order.

Generated: several files (zero-row ones among them), row groups of one row and more,
string / large_string / dictionary-encoded text, ids that are null or repeated, int or
string ids, nested (struct and list) and plain --keep-columns, windows, --limit and a
resume point (start_row).
"""

from __future__ import annotations

import os
import tempfile

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import event, given, note
from hypothesis import strategies as st

from pipeline.stages.read import plan_inputs, read_windows

TEXT = st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["", " ", "\r\n", "東京", "👩\u200d💻"]))
TEXT_TYPES = ["string", "large_string", "dictionary"]
ID_KINDS = [None, "int", "string"]
NESTED = pa.struct([("source", pa.string()), ("pages", pa.list_(pa.int32()))])


def text_array(values, kind: str) -> pa.Array:
    if kind == "dictionary":
        return pa.array(values, pa.string()).dictionary_encode()
    return pa.array(values, pa.large_string() if kind == "large_string" else pa.string())


@st.composite
def tables(draw, id_kind: str | None) -> tuple[pa.Table, int]:
    n = draw(st.sampled_from([0, 0, 1, 2, 3, 5, 9]))
    cols = {
        "passage": text_array(draw(st.lists(TEXT, min_size=n, max_size=n)), draw(st.sampled_from(TEXT_TYPES))),
        "question": text_array(draw(st.lists(TEXT, min_size=n, max_size=n)), draw(st.sampled_from(TEXT_TYPES))),
    }
    if id_kind == "int":  # nulls and duplicates allowed: ids are copied, never interpreted
        cols["id"] = pa.array(draw(st.lists(st.one_of(st.none(), st.integers(0, 3)), min_size=n, max_size=n)),
                              pa.int64())
    elif id_kind == "string":
        cols["id"] = text_array(draw(st.lists(st.one_of(st.none(), st.sampled_from("abc")), min_size=n,
                                              max_size=n)), draw(st.sampled_from(TEXT_TYPES)))
    cols["meta"] = pa.array(draw(st.lists(st.one_of(st.none(), st.fixed_dictionaries(
        {"source": st.one_of(st.none(), st.text(max_size=4)),
         "pages": st.one_of(st.none(), st.lists(st.integers(0, 9), max_size=3))})), min_size=n, max_size=n)), NESTED)
    cols["flag"] = pa.array(draw(st.lists(st.one_of(st.none(), st.booleans()), min_size=n, max_size=n)), pa.bool_())
    return pa.table(cols), draw(st.integers(1, 4))


@st.composite
def inputs(draw):
    id_kind = draw(st.sampled_from(ID_KINDS))
    files = draw(st.lists(tables(id_kind), min_size=1, max_size=6))
    return id_kind, files


@given(data=inputs(), rows_per_window=st.integers(1, 7), keep=st.sampled_from([(), ("meta",), ("flag", "meta")]),
       limit=st.one_of(st.none(), st.integers(0, 30)), start_at=st.floats(0.0, 1.0, exclude_max=True))
def test_rows_read_equal_pyarrow_and_polars(data, rows_per_window, keep, limit, start_at):
    """`start_at`: where a resume starts, as a share of the rows to read, so that the range lies
    inside the rows that exist (it was drawn from 0-30 and clamped: 72% of examples read nothing).
    The share of examples that read rows is reported as a hypothesis event (--hypothesis-show-statistics)."""
    id_kind, files = data
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (table, group) in enumerate(files):
            path = os.path.join(tmp, f"part-{i:02d}.parquet")
            pq.write_table(table, path, row_group_size=group)
            paths.append(path)
        plan = plan_inputs((tmp,), "passage", "question", None, keep)
        assert plan.files == tuple(paths)  # a directory reads in name order
        total = sum(t.num_rows for t, _ in files)
        assert plan.total_rows == total
        end = total if limit is None else min(limit, total)
        start = int(start_at * end)
        windows = list(read_windows(plan, rows_per_window, limit, start))
        event("reads rows" if windows else "reads no row (an empty input or --limit 0)")

        # each file read on its own by pyarrow and by polars, then its values concatenated
        read = [pq.read_table(p) for p in paths]
        expected = {c: [v for t in read for v in t[c].to_pylist()] for c in read[0].column_names}
        by_polars = {c: [v for p in paths for v in pl.read_parquet(p)[c].to_list()] for c in ("passage", "question")}
        note(f"windows: {[(w.first_row, len(w)) for w in windows]}")

        assert [w.first_row for w in windows] == list(range(start, end, rows_per_window))
        assert all(len(w) == min(rows_per_window, end - w.first_row) for w in windows)
        passages = [p for w in windows for p in w.passages]
        questions = [q for w in windows for q in w.questions]
        assert passages == expected["passage"][start:end] == by_polars["passage"][start:end]
        assert questions == expected["question"][start:end] == by_polars["question"][start:end]
        if id_kind is None:
            assert plan.id_col is None and all(w.ids is None for w in windows)
        else:
            assert [i for w in windows for i in w.ids.to_pylist()] == expected["id"][start:end]
        for col in keep:
            assert [v for w in windows for v in w.kept[col].to_pylist()] == expected[col][start:end]
