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
    """README: --quantize int8 (ONNX Runtime's int8, whatever --backend says) and --dtype bfloat16 on the CPU
    (only their refusals were tested)."""
    out, report = tmp_path / "o.parquet", tmp_path / "r.json"
    r = run_cli("run", SAMPLE, "-o", out, "--model", bert_dir, *FAST, "--device", "cpu", *option, "--report", report)
    assert r.returncode == 0, r.stderr
    got = pq.read_table(out)
    assert got.schema == float32.schema and got.num_rows == float32.num_rows
    meta = json.loads(pq.read_metadata(out).metadata[b"qa_batch"])
    assert meta["options"][option[0].lstrip("-").replace("-", "_")] == option[1]
    assert json.loads(report.read_text())["dtype"] == ("bfloat16" if option[1] == "bfloat16" else "float32")
    assert meta["backend"] == ("onnxruntime" if option[1] == "int8" else "torch")
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


# ---- README's output schema tables, against the schemas the code writes ----

def _readme_schema_tables() -> list[dict[str, str]]:
    """Each table of README's 'Output schema' section: column name -> the type README gives."""
    import os
    import re

    from conftest import ROOT

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Output schema"):text.index("## Speed")]
    tables, current = [], None
    for line in section.splitlines():
        if line.startswith("| column |"):
            current = {}
            tables.append(current)
        elif line.startswith("| `") and current is not None:
            names, kind = line.split("|")[1], line.split("|")[2].strip()
            for name in re.findall(r"`([a-z_]+)`", names):
                current[name] = kind
        elif not line.startswith("|"):
            current = None
    return tables


def _arrow_type_named(kind: str) -> str | None:
    """README's type words as Arrow prints them (None where README names no fixed type)."""
    head = kind.split(",")[0].strip() if not kind.startswith("list<") else kind
    return {"large_string": "large_string", "string": "string", "int64": "int64", "int32": "int32",
            "float32": "float"}.get(head, "list" if head.startswith("list<") else None)


def test_every_column_readme_lists_has_the_type_readme_gives():
    from pipeline.stages.documents import Grouping, document_schema
    from pipeline.stages.read import InputPlan
    from pipeline.stages.write import output_schema

    plan = InputPlan(files=(), passage_col="passage", question_col="question", id_col="id", keep_columns=(),
                     total_rows=0, file_rows=(), id_type=pa.string(), keep_types=(), document_col="doc",
                     document_type=pa.string())
    pairs, documents = _readme_schema_tables()
    for readme, schema in ((pairs, output_schema(plan, top_k=2)),
                           (documents, document_schema(plan, Grouping("doc"), top_k=2))):
        checked = 0
        for name, kind in readme.items():
            if name not in schema.names:
                continue
            want = _arrow_type_named(kind)
            if want is None:  # "the id's type", "as in the input": the input's
                continue
            got = schema.field(name).type
            assert (str(got).startswith("list") if want == "list" else str(got) == want), \
                f"README gives {name} as {kind}, the output has {got}"
            if want == "list":  # the struct's fields, by name, in README's order
                fields = [f.name for f in got.value_type]
                inner = kind.removeprefix("list<struct<").split(">")[0]
                assert [piece.split(":")[0].strip() for piece in inner.split(",")] == fields, kind
            checked += 1
        assert checked >= 9, f"only {checked} of README's columns were found in the schema"
        assert set(readme) - {"row", "id"} <= set(schema.names) | {"id"}, \
            f"README lists columns the output lacks: {set(readme) - set(schema.names)}"



# ---- exit 3 for a model that fails mid-run; finished parts kept ----

def test_a_model_that_fails_mid_run_is_a_runtime_failure_and_keeps_the_finished_parts(bert_dir, tmp_path):
    """README, Exit codes: 3 when the model fails while running, finished parts kept (the rerun resumes)."""
    import torch

    from pipeline.config import RunConfig
    from pipeline.engines.local import run
    from pipeline.engines.resume import WorkDir
    from pipeline.errors import RuntimeFailure
    from pipeline.models.checkpoint import load_model

    src = write_parquet(tmp_path / "in.parquet", {"passage": ["alpha beta gamma delta"] * 16, "question": ["who?"] * 16})
    loaded = load_model(bert_dir, "cpu")
    forward, calls = loaded.model.forward, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] > 5:
            raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED (planted)")
        return forward(*args, **kwargs)

    loaded.model.forward = failing
    out = tmp_path / "out.parquet"
    config = RunConfig(inputs=(src,), output=str(out), model=bert_dir, quiet=True, rows_per_window=2, batch_size=2,
                       cpu_workers=1)
    with pytest.raises(RuntimeFailure, match=r"the model failed on cpu: CUBLAS_STATUS_EXECUTION_FAILED") as e:
        with torch.inference_mode():
            run(config, loaded=loaded)
    assert e.value.exit_code == 3 and not out.exists()
    kept = [first for first, _ in WorkDir(str(out) + ".partial").parts()]
    assert kept and kept == list(range(0, 2 * len(kept), 2))  # whole windows, from the first, before the failure
    loaded.model.forward = forward  # the device is well again: the rerun answers only the rows no part holds
    summary = run(config, loaded=loaded)
    assert summary.rows == 16 and summary.rows_this_run == 16 - 2 * len(kept)
    assert pq.read_metadata(out).num_rows == 16


# ---- a resume skips whole row groups unread ----

def test_a_resume_reads_no_row_group_it_has_answered(tmp_path, monkeypatch):
    """README (resume): rows already answered are skipped without reading them: whole files and row
    groups are not read again, only the row group where the resume starts."""
    import pyarrow.parquet as pq_

    from pipeline.stages import read

    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"passage": [f"p{i}" for i in range(50)], "question": ["q"] * 50}), src,
                   row_group_size=10)
    plan = read.plan_inputs((str(src),), "passage", "question", None)
    asked: list[list[int]] = []
    real = pq_.ParquetFile.iter_batches

    def spy(self, *args, row_groups=None, **kwargs):
        asked.append(list(row_groups))
        return real(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq_.ParquetFile, "iter_batches", spy)
    windows = list(read.read_windows(plan, 8, None, start_row=27))
    assert asked == [[2, 3, 4]]  # row groups 0 and 1 (rows 0-19) are never read
    assert windows[0].first_row == 27 and windows[0].passages[0] == "p27"
    assert sum(len(w) for w in windows) == 23


def test_an_object_store_that_cannot_be_reached_exits_2_naming_the_input(bert_dir):
    """README, Exit codes: 2 for a bucket or host that cannot be reached, before the model is loaded."""
    env = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    r = run_cli("run", "s3://nightly/in.parquet", "-o", "s3://nightly/out.parquet", "--model", bert_dir, env=env)
    assert r.returncode == 2
    assert "input 's3://nightly/in.parquet' cannot be listed" in r.stderr and "Could not connect" in r.stderr
