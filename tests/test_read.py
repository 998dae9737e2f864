"""Reading: input resolution, schema checks, streaming windows over many files and encodings."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_parquet
from pipeline.errors import UsageError
from pipeline.stages.read import plan_inputs, read_windows


def test_windows_stream_across_files_with_mixed_string_encodings(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", {"id": [1, 2, 3], "passage": ["p1", "p2", "p3"],
                                               "question": ["q1", "q2", "q3"]})
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({
        "id": pa.array([4, 5], pa.int64()),
        "passage": pa.array(["p4", None], pa.large_string()),
        "question": pa.array(["q4", "q5"]).dictionary_encode(),
    }), b, row_group_size=1)
    plan = plan_inputs([str(a), str(b)], "passage", "question", None)
    assert plan.id_col == "id" and plan.total_rows == 5
    windows = list(read_windows(plan, rows_per_window=2))
    assert [len(w) for w in windows] == [2, 2, 1]
    assert [w.first_row for w in windows] == [0, 2, 4]
    assert sum((w.passages for w in windows), []) == ["p1", "p2", "p3", "p4", None]
    assert sum((w.questions for w in windows), []) == ["q1", "q2", "q3", "q4", "q5"]
    assert sum((w.ids.to_pylist() for w in windows), []) == [1, 2, 3, 4, 5]
    limited = list(read_windows(plan, rows_per_window=2, limit=3))
    assert sum(len(w) for w in limited) == 3


def test_zero_row_input_gives_no_window(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"passage": pa.array([], pa.string()), "question": pa.array([], pa.string())}), path)
    plan = plan_inputs([str(path)], "passage", "question", None)
    assert plan.total_rows == 0 and list(read_windows(plan, 10)) == []


def test_custom_column_names_and_missing_keep_column(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", {"ctx": ["p"], "q": ["q"], "doc": ["d"]})
    plan = plan_inputs([str(path)], "ctx", "q", "doc", ("ctx",))
    assert plan.id_col == "doc"
    with pytest.raises(UsageError, match="column 'title' is missing"):
        plan_inputs([str(path)], "ctx", "q", None, ("title",))
    with pytest.raises(UsageError, match="--passage-col"):
        plan_inputs([str(path)], "passage", "q", None)


def test_directories_skip_hidden_folders_and_work_directories(tmp_path):
    from pipeline.stages.read import resolve_inputs

    for rel in ("a.parquet", "sub/b.parquet", ".hidden/c.parquet", "out.parquet.partial/part-000000000000.parquet",
                "_tmp/d.parquet", "notes.txt"):
        path = tmp_path / "in" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(path, {"passage": ["p"], "question": ["q"]})
    found = [os.path.relpath(f, tmp_path / "in") for f in resolve_inputs([str(tmp_path / "in")])]
    assert found == ["a.parquet", os.path.join("sub", "b.parquet")]


def test_a_resume_point_skips_whole_files_without_reading_them(tmp_path, monkeypatch):
    """Each file's row count comes from the plan (its footer read once), not from reopening it."""
    import pipeline.stages.read as read

    for i in range(4):
        pq.write_table(pa.table({"passage": [f"p{i}-{j}" for j in range(5)], "question": ["q"] * 5}),
                       tmp_path / f"f{i}.parquet")
    plan = read.plan_inputs((str(tmp_path),), "passage", "question", None)
    assert plan.file_rows == (5, 5, 5, 5)
    opened = []
    real = read.open_parquet
    monkeypatch.setattr(read, "open_parquet", lambda path: opened.append(path) or real(path))
    rows = [p for w in read.read_windows(plan, 4, None, 12) for p in w.passages]
    assert rows == ["p2-2", "p2-3", "p2-4", "p3-0", "p3-1", "p3-2", "p3-3", "p3-4"]
    assert [os.path.basename(p) for p in opened] == ["f2.parquet", "f3.parquet"]


def test_directory_discovery_skips_hidden_underscore_and_work_folders(tmp_path):
    from pipeline.stages.read import directory_inputs

    for name in ["a.parquet", "_SUCCESS", "_b.parquet", ".c.parquet", "notes.txt", ".hidden/d.parquet",
                 "_temporary/e.parquet", "x.answers.parquet.partial/part-000000000000.parquet", "sub/f.parquet"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert directory_inputs(str(tmp_path)) == [str(tmp_path / "a.parquet"), str(tmp_path / "sub" / "f.parquet")]
