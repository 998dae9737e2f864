"""README promises that no other test held (issue 26): each checked through the CLI as a user
runs it, so that breaking the promise fails here."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE, run_cli, write_parquet

FAST = ["--max-seq-len", "64", "--doc-stride", "16", "--limit", "12"]


@pytest.fixture(scope="module")
def float32(bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("promises") / "f32.parquet"
    r = run_cli("run", SAMPLE, "-o", out, "--model", bert_dir, *FAST, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return pq.read_table(out)


@pytest.mark.parametrize("option", [["--quantize", "int8"], ["--dtype", "bfloat16"]])
def test_the_faster_cpu_paths_run_and_say_what_they_ran(bert_dir, tmp_path, float32, option):
    """README: --quantize int8 and --dtype bfloat16 on the CPU (only their refusals were tested)."""
    out, report = tmp_path / "o.parquet", tmp_path / "r.json"
    r = run_cli("run", SAMPLE, "-o", out, "--model", bert_dir, *FAST, "--device", "cpu", *option, "--report", report)
    assert r.returncode == 0, r.stderr
    got = pq.read_table(out)
    assert got.schema == float32.schema and got.num_rows == float32.num_rows
    meta = json.loads(pq.read_metadata(out).metadata[b"qa_batch"])
    assert meta["options"][option[0].lstrip("-").replace("-", "_")] == option[1]
    assert json.loads(report.read_text())["dtype"] == ("bfloat16" if option[1] == "bfloat16" else "float32")
    passages = pq.read_table(SAMPLE)["passage"].to_pylist()
    for p, row in zip(passages, got.to_pylist()):  # every answer an exact slice of its passage
        if row["answer"] is not None:
            assert p[row["answer_start"]:row["answer_end"]] == row["answer"]


def test_the_report_holds_what_readme_lists(bert_dir, tmp_path):
    """README's --report row: counts, elapsed, rates, padding efficiency, out-of-memory splits,
    peak and model RSS, seconds per stage and the bottleneck."""
    report = tmp_path / "r.json"
    r = run_cli("run", SAMPLE, "-o", tmp_path / "o.parquet", "--model", bert_dir, *FAST, "--report", report)
    assert r.returncode == 0, r.stderr
    rep = json.loads(report.read_text())
    assert rep["rows"] == 12 and rep["chunks"] >= 12 and rep["answered"] + rep["null"] + rep["errors"] == 12
    assert rep["elapsed_s"] > 0 and rep["rows_per_s"] > 0 and rep["chunks_per_s"] > 0
    assert 0 < rep["padding_efficiency"] <= 1 and rep["oom_splits"] == 0
    assert rep["peak_rss_mb"] >= rep["model_rss_mb"] > 50
    for stage in ("read", "tokenize", "batch", "infer_launch", "infer_wait", "merge", "write", "assemble",
                  "load_model"):
        assert stage in rep["stage_seconds"], stage
    assert rep["bottleneck"] in ("model", "read", "tokenize", "batch", "merge", "write")


def test_a_passage_with_no_tokens_gets_the_error_readme_names(bert_dir, tmp_path):
    """A passage the tokenizer reduces to nothing (combining accents, stripped by BERT's
    normaliser) is not blank, yet has no token: its row says so and the others are answered."""
    src = write_parquet(tmp_path / "in.parquet", {"passage": ["\u0301\u0301\u0301", "the normans came"],
                                                  "question": ["who?", "who came?"]},
                        pa.schema([("passage", pa.string()), ("question", pa.string())]))
    r = run_cli("run", src, "-o", tmp_path / "o.parquet", "--model", bert_dir)
    assert r.returncode == 0, r.stderr
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert rows[0]["error"] == "passage has no tokens after tokenization" and rows[0]["answer"] is None
    assert rows[1]["error"] is None
