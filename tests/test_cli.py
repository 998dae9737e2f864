"""qa-batch as a subprocess: the sample job, options, and every bad input with its exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE, run_cli, write_parquet
from pipeline.stages.write import read_metadata


def no_files_left(directory) -> bool:
    """Nothing but the inputs: no output, no temporary file."""
    return not [n for n in os.listdir(directory) if "answers" in n or n.endswith(".tmp") or n == "out.parquet"]


def check_answers(table: pa.Table, passages: list[str]):
    for row, passage in zip(table.to_pylist(), passages):
        if row["answer"] is not None:
            assert passage[row["answer_start"]:row["answer_end"]] == row["answer"]


@pytest.fixture
def sample(tmp_path) -> str:
    return shutil.copy(SAMPLE, tmp_path / "sample.parquet")


def test_sample_job(tmp_path, sample, bert_dir):
    r = run_cli("run", sample, "--model", bert_dir, "--report", tmp_path / "report.json")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "sample.answers.parquet"  # default: beside the input
    table = pq.read_table(out)
    src = pq.read_table(sample)
    assert table.column_names == ["id", "question", "answer", "answer_start", "answer_end", "score",
                                  "confidence", "null_score", "runner_up_score", "log_norm", "chunks", "error"]
    assert table.schema.field("answer_start").type == pa.int64()
    assert table.schema.field("score").type == pa.float32()
    assert table.schema.field("chunks").type == pa.int32()
    assert table["id"].to_pylist() == src["id"].to_pylist()  # one row per input row, in order
    assert table["question"].to_pylist() == src["question"].to_pylist()
    check_answers(table, src["passage"].to_pylist())
    assert max(table["chunks"].to_pylist()) > 10  # the long articles need many chunks
    conf = table["confidence"].to_pylist()
    assert all(0.0 <= c <= 1.0 for c in conf)
    # one summary line on stderr, the same counts in the report and the file's metadata
    summary = [line for line in r.stderr.splitlines() if line.startswith("qa-batch: 45 rows")]
    assert len(summary) == 1 and "chunks/s" in summary[0]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rows"] == 45 and report["chunks"] == sum(table["chunks"].to_pylist())
    for key in ("answered", "null", "errors", "rows_per_s", "chunks_per_s", "elapsed_s"):
        assert key in report
    meta = read_metadata(str(out))
    assert meta["model"]["id"] == bert_dir and meta["model"]["revision"].startswith("sha256:")
    assert meta["options"]["max_seq_len"] == 384 and meta["options"]["doc_stride"] == 128
    assert meta["qa_batch_version"] and meta["started_at"] and meta["finished_at"]


def test_console_script_and_help():
    exe = shutil.which("qa-batch", path=os.path.dirname(sys.executable))
    assert exe, "the qa-batch console script is installed"
    r = subprocess.run([exe, "run", "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0
    for option in ("--model", "--max-seq-len", "--doc-stride", "--max-answer-len", "--top-k", "--allow-null",
                   "--null-threshold", "--device", "--dtype", "--batch-size", "--limit", "--keep-columns",
                   "--overwrite", "--report", "--quiet", "--id-col", "--passage-col", "--question-col"):
        assert option in r.stdout
    assert "[default: 384]" in r.stdout and "[default: 128]" in r.stdout
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("qa-batch ")


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "albert", "electra", "deberta-v2"])
def test_every_family_answers_with_exact_offsets(tmp_path, checkpoints, family):
    src = pq.read_table(SAMPLE).slice(0, 30)
    path = tmp_path / "in.parquet"
    pq.write_table(src, path)
    r = run_cli("run", path, "-o", tmp_path / "out.parquet", "--model", checkpoints[family],
                "--max-seq-len", 128, "--doc-stride", 32, "--top-k", 2)
    assert r.returncode == 0, r.stderr
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == 30
    for row in table.to_pylist():  # tiny tokenizers make long questions: 98 tokens here and there
        assert (row["answer"] is None) == (row["error"] is not None)
        assert row["error"] is None or row["error"].startswith("question too long")
    assert table["answer"].null_count <= 2
    check_answers(table, src["passage"].to_pylist())
    for row, passage in zip(table.to_pylist(), src["passage"].to_pylist()):
        for a in row["answers"]:
            assert passage[a["start"]:a["end"]] == a["text"]


def test_options_limit_keep_columns_top_k_and_row_numbers(tmp_path, bert_dir):
    src = pq.read_table(SAMPLE).drop_columns(["id"])
    path = tmp_path / "noid.parquet"
    pq.write_table(src, path)
    out = tmp_path / "out.parquet"
    r = run_cli("run", path, "-o", out, "--model", bert_dir, "--limit", 7,
                "--keep-columns", "title, is_impossible", "--top-k", 3, "-q")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ""  # --quiet
    t = pq.read_table(out)
    assert t.num_rows == 7
    assert t["row"].to_pylist() == list(range(7))
    assert t["title"].to_pylist() == src["title"].to_pylist()[:7]
    assert t["is_impossible"].type == pa.bool_()
    for row in t.to_pylist():
        spans = [(a["start"], a["end"]) for a in row["answers"]]
        assert 1 <= len(spans) <= 3 and len(set(spans)) == len(spans)
        assert [a["score"] for a in row["answers"]] == sorted((a["score"] for a in row["answers"]), reverse=True)
        assert (row["answer_start"], row["answer_end"]) == spans[0]


@pytest.mark.parametrize("options", [["--top-k", "2"], ["--top-k", "5", "--rows-per-window", "1"],
                                     ["--top-k", "3", "--allow-null"]])
def test_top_k_on_passages_with_fewer_spans_than_k(tmp_path, bert_dir, options):
    """Regression: chunks with fewer valid spans than kept slots crashed the merge (IndexError)."""
    passages = ["Paris.", "The capital of France is Paris, a city on the Seine."]
    questions = ["Which city is the capital of the country that lies between Spain and Germany?",
                 "What is the capital of France?"]
    path = write_parquet(tmp_path / "in.parquet", {"passage": passages, "question": questions})
    out = tmp_path / "out.parquet"
    r = run_cli("run", path, "-o", out, "--model", bert_dir, "-q", *options)
    assert r.returncode == 0, r.stderr
    rows = pq.read_table(out).to_pylist()
    k = int(options[1])
    assert len(rows[0]["answers"]) == min(k, 3)  # "Paris." is two tokens: three spans
    for passage, row in zip(passages, rows):
        assert 1 <= len(row["answers"]) <= k
        for a in row["answers"]:
            assert passage[a["start"]:a["end"]] == a["text"] and 0 <= a["confidence"] <= 1


def test_rows_without_text_get_an_error_and_the_run_goes_on(tmp_path, bert_dir):
    path = write_parquet(tmp_path / "in.parquet", {
        "id": [10, 11, 12, 13, 14],
        "passage": ["The Normans came from Normandy.", None, "  \n", "Paris is in France.", "text"],
        "question": ["Where from?", "Who?", "What?", "", "Is it?"],
    })
    r = run_cli("run", path, "-o", tmp_path / "out.parquet", "--model", bert_dir)
    assert r.returncode == 0, r.stderr
    t = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [row["id"] for row in t] == [10, 11, 12, 13, 14]
    assert [row["error"] for row in t] == [None, "passage is null", "passage is only whitespace",
                                          "question is empty", None]
    assert t[1]["answer"] is None and t[1]["score"] is None and t[1]["chunks"] == 0
    assert t[0]["answer"] is not None and t[4]["answer"] is not None
    assert "3 errors" in r.stderr


def test_refuses_to_overwrite_unless_asked(tmp_path, sample, bert_dir):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"precious")
    r = run_cli("run", sample, "-o", out, "--model", bert_dir, "--limit", 2)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert out.read_bytes() == b"precious"
    r = run_cli("run", sample, "-o", out, "--model", bert_dir, "--limit", 2, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert pq.read_table(out).num_rows == 2


def _bad_inputs(tmp_path) -> dict:
    good = {"passage": ["a passage"], "question": ["a question?"]}
    cases = {}
    cases["missing column"] = ([write_parquet(tmp_path / "m.parquet", {"text": ["x"], "question": ["q"]})],
                               ["m.parquet", "'passage'", "columns found: text, question"])
    cases["integer passage"] = ([write_parquet(tmp_path / "i.parquet", {"passage": [1], "question": ["q"]})],
                                ["i.parquet", "'passage'", "int64"])
    cases["binary question"] = ([write_parquet(tmp_path / "b.parquet", {"passage": ["p"], "question": [b"q"]})],
                                ["b.parquet", "'question'", "binary"])
    write_parquet(tmp_path / "g1.parquet", {**good, "id": [1]})
    cases["schemas disagree"] = ([str(tmp_path / "g1.parquet"),
                                  write_parquet(tmp_path / "g2.parquet", {**good, "id": ["x"]})],
                                 ["disagree", "'id'", "g1.parquet", "g2.parquet"])
    (tmp_path / "not.parquet").write_text("hello")
    cases["not parquet"] = ([str(tmp_path / "not.parquet")], ["not.parquet", "not a readable Parquet"])
    (tmp_path / "empty.parquet").write_bytes(b"")
    cases["empty file"] = ([str(tmp_path / "empty.parquet")], ["empty.parquet"])
    cases["no such file"] = ([str(tmp_path / "nope.parquet")], ["nope.parquet", "does not exist"])
    cases["glob matches nothing"] = ([str(tmp_path / "zz*.parquet")], ["matches no file"])
    (tmp_path / "emptydir").mkdir()
    cases["directory without parquet"] = ([str(tmp_path / "emptydir")], ["holds no *.parquet"])
    return cases


BAD = ["missing column", "integer passage", "binary question", "schemas disagree", "not parquet",
       "empty file", "no such file", "glob matches nothing", "directory without parquet"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_before_model_work(tmp_path, case):
    inputs, expected = _bad_inputs(tmp_path)[case]
    # the model does not exist: proves the inputs are checked before any model work
    r = run_cli("run", *inputs, "-o", tmp_path / "out.parquet", "--model", tmp_path / "no-model")
    assert r.returncode == 2, r.stderr
    for text in expected:
        assert text in r.stderr, (text, r.stderr)
    assert not (tmp_path / "out.parquet").exists()
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,expected", [
    (["--model", "{tmp}/no-model"], "no such directory"),
    (["--max-seq-len", "600"], "above what"),
    (["--doc-stride", "400"], "--doc-stride"),
    (["--top-k", "0"], "--top-k"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int4"], "--dtype"),
    (["-o", "{tmp}/missing-dir/out.parquet"], "does not exist"),
    # the sample has an 'answers' column: the output's own 'answers' (--top-k) would replace it
    (["--keep-columns", "answers", "--top-k", "2"], "--keep-columns answers: the output has a column 'answers'"),
])
def test_bad_options_exit_2(tmp_path, sample, bert_dir, args, expected):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--model" not in args:
        args += ["--model", bert_dir]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.parquet")]
    if "--device" in args and "cuda" in args:
        pytest.importorskip("torch")
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    r = run_cli("run", sample, *args)
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr, r.stderr
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("env,why,fix", [
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "and the Hugging Face hub cannot be reached",
     "download it once with network access and rerun with HF_HUB_OFFLINE=1 to use the cache"),
    ({"HF_HUB_OFFLINE": "1"}, "and HF_HUB_OFFLINE is set, so nothing is downloaded",
     "download it once with HF_HUB_OFFLINE unset and network access"),
], ids=["hub-unreachable", "HF_HUB_OFFLINE-set"])
def test_a_hub_model_not_in_the_cache_fails_fast_saying_why(tmp_path, sample, env, why, fix):
    """The advice fits the environment: with HF_HUB_OFFLINE=1 set, never 'set HF_HUB_OFFLINE=1'."""
    env = {**env, "HF_HOME": str(tmp_path / "hf")}
    t0 = time.monotonic()
    r = run_cli("run", sample, "-o", tmp_path / "out.parquet", env=env)  # the default hub model
    assert r.returncode == 2, r.stderr
    assert time.monotonic() - t0 < 60
    message = r.stderr.strip().splitlines()[-1]
    assert message.startswith("qa-batch: error: --model google-bert/bert-large-uncased-whole-word-masking-finetuned-squad: "
                              f"the model is not in the local Hugging Face cache ({tmp_path / 'hf' / 'hub'}) {why}. "
                              "Point --model at a local directory holding the checkpoint"), message
    assert message.endswith(f"or {fix}."), message
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # the error alone: no warning before it
    assert not (tmp_path / "out.parquet").exists()


def test_model_env_var_sets_the_default(tmp_path, sample, bert_dir):
    r = run_cli("run", sample, "-o", tmp_path / "out.parquet", "--limit", 1, env={"QA_BATCH_MODEL": bert_dir})
    assert r.returncode == 0, r.stderr
    assert read_metadata(str(tmp_path / "out.parquet"))["model"]["id"] == bert_dir


def test_many_inputs_dirs_and_globs_in_order(tmp_path, bert_dir):
    src = pq.read_table(SAMPLE).slice(0, 12)
    (tmp_path / "parts").mkdir()
    for i in range(3):
        pq.write_table(src.slice(4 * i, 4), tmp_path / "parts" / f"part-{i}.parquet")
    out = tmp_path / "out.parquet"
    r = run_cli("run", tmp_path / "parts", "-o", out, "--model", bert_dir, "--max-seq-len", 128, "--doc-stride", 32)
    assert r.returncode == 0, r.stderr
    assert pq.read_table(out)["id"].to_pylist() == src["id"].to_pylist()
    r = run_cli("run", tmp_path / "parts", "--model", bert_dir, "--limit", 1)  # beside the directory
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "parts.answers.parquet").exists()
    r = run_cli("run", str(tmp_path / "parts" / "part-*.parquet"), "--model", bert_dir, "--max-seq-len", 128,
                "--doc-stride", 32, "--overwrite")  # beside the folder the glob reads, as for the folder itself
    assert r.returncode == 0, r.stderr
    assert pq.read_table(tmp_path / "parts.answers.parquet")["id"].to_pylist() == src["id"].to_pylist()
    assert sorted(os.listdir(tmp_path / "parts")) == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]


def test_zero_row_table_gives_an_empty_output_with_the_full_schema(tmp_path, bert_dir):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "passage": pa.array([], pa.string()),
                             "question": pa.array([], pa.string())}), path)
    r = run_cli("run", path, "-o", tmp_path / "out.parquet", "--model", bert_dir, "--top-k", 2)
    assert r.returncode == 0, r.stderr
    t = pq.read_table(tmp_path / "out.parquet")
    assert t.num_rows == 0
    assert t.column_names == ["id", "question", "answer", "answer_start", "answer_end", "score", "confidence",
                              "null_score", "runner_up_score", "log_norm", "chunks", "error", "answers"]
