"""Awkward but valid data is answered row by row; broken files end the run with exit code 2."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import SAMPLE, run_cli, write_parquet


def answer(tmp_path, model, columns, *options, schema=None):
    path = write_parquet(tmp_path / "in.parquet", columns, schema)
    r = run_cli("run", path, "-o", tmp_path / "out.parquet", "--model", model, *options)
    assert r.returncode == 0, r.stderr
    return pq.read_table(tmp_path / "out.parquet").to_pylist(), r


def test_strange_text_is_answered_with_exact_offsets(tmp_path, bert_dir):
    passages = [
        "Before\x00the NUL byte\x00 and after it, the Normans came.",
        "שלום עולם: the Normans came from Normandy. مرحبا بالعالم",
        "Family 👩\u200d👩\u200d👧 and flags 🇫🇷🇩🇪 and zero\u200bwidth\u200djoiners; the Normans 🙂 came.",
        "Combining e\u0301\u0301 marks\r\nand CRLF\r\nlines; the Normans came.",
        "\u202eright-to-left override\u202c then the Normans came.",
    ]
    rows, _ = answer(tmp_path, bert_dir, {"passage": passages, "question": ["Who came?"] * 5})
    for row, passage in zip(rows, passages):
        assert row["error"] is None and row["answer"] is not None
        assert passage[row["answer_start"]:row["answer_end"]] == row["answer"]


def test_a_million_character_passage_is_answered(tmp_path, bert_dir):
    passage = ("The Normans were descended from Norse raiders and pirates from Denmark. " * 14_000)[:1_000_000]
    rows, r = answer(tmp_path, bert_dir, {"passage": [passage, "short one"], "question": ["Who?", "What?"]},
                     "--report", tmp_path / "r.json")
    assert len(passage) == 1_000_000
    assert rows[0]["chunks"] > 500 and rows[0]["answer"] is not None
    assert passage[rows[0]["answer_start"]:rows[0]["answer_end"]] == rows[0]["answer"]
    assert rows[1]["chunks"] == 1


def test_null_and_duplicate_ids_are_kept_as_they_are(tmp_path, bert_dir):
    rows, _ = answer(tmp_path, bert_dir, {"id": ["a", None, "a", "b"], "passage": ["p one", "p two", "p three", "p"],
                                          "question": ["q?"] * 4})
    assert [r["id"] for r in rows] == ["a", None, "a", "b"]


def test_string_encodings_and_nullability_are_all_read(tmp_path, bert_dir):
    schema = pa.schema([pa.field("passage", pa.large_string(), nullable=False),
                        pa.field("question", pa.dictionary(pa.int32(), pa.string())),
                        pa.field("title", pa.string(), nullable=True)])
    table = pa.table({"passage": pa.array(["the normans came", "paris is in france"], pa.large_string()),
                      "question": pa.array(["who came?", "where is paris?"]).dictionary_encode(),
                      "title": ["n", None]}, schema=schema)
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=1)  # two row groups: chunked columns
    r = run_cli("run", path, "-o", tmp_path / "out.parquet", "--model", bert_dir, "--keep-columns", "title")
    assert r.returncode == 0, r.stderr
    out = pq.read_table(tmp_path / "out.parquet")
    assert out["question"].to_pylist() == ["who came?", "where is paris?"]
    assert out["title"].to_pylist() == ["n", None]
    assert out["answer"].null_count == 0


def test_long_questions_error_per_row_or_are_cut(tmp_path, bert_dir):
    long_q = "who were the normans and where did they come from " * 40
    cols = {"passage": ["the normans came from normandy " * 30] * 2, "question": [long_q, "who came?"]}
    rows, r = answer(tmp_path, bert_dir, cols)
    assert rows[0]["error"].startswith("question too long") and "--truncate-question" in rows[0]["error"]
    assert rows[1]["error"] is None and rows[1]["answer"]
    rows, r = answer(tmp_path, bert_dir, cols, "--truncate-question", "--overwrite")
    assert rows[0]["error"] is None and rows[0]["answer"]


def test_truncated_and_corrupt_files_exit_2_naming_the_file(tmp_path, bert_dir):
    data = open(SAMPLE, "rb").read()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    r = run_cli("run", tmp_path / "truncated.parquet", "-o", tmp_path / "out.parquet", "--model", bert_dir)
    assert r.returncode == 2 and "truncated.parquet" in r.stderr
    # footer intact, data pages overwritten: found while reading, still exit 2 and no output
    corrupt = bytearray(data)
    corrupt[100:len(data) // 2] = b"\xff" * (len(data) // 2 - 100)
    (tmp_path / "corrupt.parquet").write_bytes(bytes(corrupt))
    r = run_cli("run", tmp_path / "corrupt.parquet", "-o", tmp_path / "out.parquet", "--model", bert_dir)
    assert r.returncode == 2, r.stderr
    assert "corrupt.parquet" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_device_auto_falls_back_to_the_cpu_quietly_and_says_so_in_the_summary(tmp_path, bert_dir):
    """--device auto choosing the CPU is normal: no warning, the summary line names the device."""

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rows, r = answer(tmp_path, bert_dir, {"passage": ["the normans came"], "question": ["who?"]})
    assert "no CUDA device" not in r.stderr and "warning" not in r.stderr.lower()
    assert " on cpu: " in r.stderr
