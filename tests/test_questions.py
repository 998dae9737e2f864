"""--questions / --question / --wide: a fixed list of questions asked of every row's passage.

The generated test runs the same documents and questions twice: through --questions, and as
the cross product built by hand and fed as pairs (rows_per_window and --limit scaled by the
number of questions, so that both runs see the same windows, batches and hence logits). The
answers must be the same, column for column, for the table model and the random BERT and
RoBERTa of test_differential.py; the pairs run is itself checked against the brute-force
reference there. --wide must turn back into the long output (wide.to_long), and a question
too long for --max-seq-len must be refused before any model work exactly when the
reference's chunk budget says so.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from conftest import ROOT, SAMPLE, assert_same_answers, run_cli, write_parquet
from pipeline.config import RunConfig
from pipeline.engines.local import run
from pipeline.errors import UsageError
from pipeline.stages.questions import QuestionList, load
from pipeline.stages.wide import ANSWER_COLUMNS, DOCUMENT_ONLY, to_long, wide_name
from pipeline.stages.write import read_metadata
from test_differential import options, texts

# ---------------------------------------------------------------------------- generated

field_names = st.lists(st.from_regex(r"[a-z]{1,5}", fullmatch=True).filter(lambda f: f not in ("id", "row")),
                       min_size=4, max_size=4, unique=True)


@st.composite
def question_lists(draw) -> list[str]:
    """1 to 4 distinct questions, as a list file holds them (stripped; blank ones are refused)."""
    qs = draw(st.lists(texts(max_pieces=6).filter(lambda q: q is not None and q.strip()), min_size=1, max_size=4))
    return list(dict.fromkeys(q.strip() for q in qs))


def _run(loaded, model_dir, table: pa.Table, o: dict, tmp: str, name: str, **extra) -> tuple[pa.Table, object]:
    src = f"{tmp}/{name}.in.parquet"
    pq.write_table(table, src)
    config = RunConfig(inputs=(src,), output=f"{tmp}/{name}.parquet", quiet=True, model=model_dir, **o, **extra)
    summary = run(config, loaded=loaded)
    return pq.read_table(config.output), summary


def _too_long(tok, question: str, o: dict) -> bool:
    """The reference rule: the question leaves no more than --doc-stride passage tokens per chunk."""
    n = len(tok(question, add_special_tokens=False)["input_ids"])
    if o["truncate_question"]:
        n = min(n, o["max_question_len"])
    return o["max_seq_len"] - tok.num_special_tokens_to_add(pair=True) - n <= o["doc_stride"]


def check_questions(loaded, model_dir, passages, questions, fields, with_ids, o):
    note(f"options: {o}")
    m, n = len(questions), len(passages)
    ids = [f"doc-{i}" for i in range(n)]
    docs = {"passage": pa.array(passages, pa.string())}
    if with_ids:
        docs = {"id": pa.array(ids, pa.string()), **docs}
    with tempfile.TemporaryDirectory() as tmp:
        qfile = f"{tmp}/fields.parquet"
        pq.write_table(pa.table({"question": questions, **({"field": fields} if fields else {})}), qfile)
        refused = [q for q in questions if _too_long(loaded.tokenizer, q, o)]
        event("refused: a question too long" if refused else "answered")
        if refused:
            with pytest.raises(UsageError, match="is too long for --max-seq-len") as e:
                _run(loaded, model_dir, pa.table(docs), o, tmp, "long", questions=qfile)
            first = questions.index(refused[0])
            assert (f"field {fields[first]!r}" if fields else f"question {first} ") in e.value.message
            return
        long, summary = _run(loaded, model_dir, pa.table(docs), o, tmp, "long", questions=qfile)

        # the same pairs built by hand, in the order --questions writes them: by row, then question
        pairs = {"passage": pa.array([p for p in passages for _ in range(m)], pa.string()),
                 "question": pa.array(questions * n, pa.string())}
        if with_ids:
            pairs = {"id": pa.array([i for i in ids for _ in range(m)], pa.string()), **pairs}
        scaled = {**o, "rows_per_window": o["rows_per_window"] * m}
        if o.get("limit") is not None:
            scaled["limit"] = o["limit"] * m
        by_hand, _ = _run(loaded, model_dir, pa.table(pairs), scaled, tmp, "pairs")

        asked = "field" if fields else "question_index"
        n_rows = n if o.get("limit") is None else min(n, o["limit"])
        assert long.num_rows == n_rows * m == by_hand.num_rows == summary.rows
        which = np.tile(np.arange(m), n_rows)
        assert long[asked].to_pylist() == ([fields[j] for j in which] if fields else which.tolist())
        key = "id" if with_ids else "row"
        expected_key = [ids[r] for r in np.repeat(np.arange(n_rows), m)] if with_ids else \
            np.repeat(np.arange(n_rows), m).tolist()
        assert long[key].to_pylist() == expected_key
        for column in by_hand.column_names:
            if column != "row":
                assert long[column].equals(by_hand[column]), column

        wide, _ = _run(loaded, model_dir, pa.table(docs), o, tmp, "wide", questions=qfile, wide=True)
        assert wide.num_rows == n_rows
        meta = read_metadata(f"{tmp}/wide.parquet")
        assert to_long(wide, QuestionList.from_dict(meta["questions"])).equals(long)


def _model_dir(checkpoints, family: str) -> str:
    return checkpoints["bert" if family == "table" else family]  # the table model has BERT's tokenizer


documents = st.lists(texts(), min_size=1, max_size=5)


@pytest.mark.parametrize("family", ["table", "bert", "roberta"])
@settings(deadline=None)
@given(passages=documents, questions=question_lists(), names=field_names, named=st.booleans(),
       with_ids=st.booleans(), roomy=st.booleans(), o=options())
def test_questions_answer_as_the_cross_product_fed_as_pairs(models, checkpoints, family, passages, questions,
                                                            names, named, with_ids, roomy, o):
    fields = names[: len(questions)] if named else None
    if roomy:  # chunks with room for the questions more often than options() alone gives
        o = {**o, "max_seq_len": o["max_seq_len"] + 64}
    check_questions(models[family], _model_dir(checkpoints, family), passages, questions, fields, with_ids, o)


# ---------------------------------------------------------------------------- the list itself

def test_question_files_of_each_kind(tmp_path):
    (tmp_path / "q.txt").write_text("Who is the supplier?\n\n  When does it end?  \r\n")
    assert load(str(tmp_path / "q.txt")) == QuestionList(("Who is the supplier?", "When does it end?"), None,
                                                         f"--questions {tmp_path / 'q.txt'}")
    (tmp_path / "q.csv").write_text('field,question\nsupplier,Who is the supplier?\nend,"When, then?"\n')
    got = load(str(tmp_path / "q.csv"))
    assert got.questions == ("Who is the supplier?", "When, then?") and got.fields == ("supplier", "end")
    write_parquet(tmp_path / "q.parquet", {"question": pa.array(["a?", "b?"]).dictionary_encode()})
    got = load(str(tmp_path / "q.parquet"))
    assert got.questions == ("a?", "b?") and got.fields is None and got.names == ("q0", "q1")
    assert load(None, ("x?", "y?")).source == "--question"
    assert load(None, ()) is None


@pytest.mark.parametrize("content,message", [
    ("\n \n", "holds no question"),
    ("a?\nb?\na?\n", "the question 'a?' is given twice (number 1 and 3)"),
])
def test_text_lists_that_are_refused(tmp_path, content, message):
    (tmp_path / "q.txt").write_text(content)
    with pytest.raises(UsageError, match=message.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        load(str(tmp_path / "q.txt"))


@pytest.mark.parametrize("columns,message", [
    ({"field": ["a", "b"], "question": ["x?", "y?"], }, None),
    ({"field": ["a", "a"], "question": ["x?", "y?"]}, "the field name 'a' is given twice"),
    ({"field": ["a", None], "question": ["x?", "y?"]}, "the question 'y?' has no field name"),
    ({"field": ["a", "b"], "question": ["x?", " "]}, "field 'b' is empty"),
    ({"text": ["x?"]}, "column 'question' is missing; columns found: text"),
    ({"question": [1, 2]}, "column 'question' has type int64, but text is needed"),
])
def test_tables_that_are_refused(tmp_path, columns, message):
    write_parquet(tmp_path / "q.parquet", columns)
    if message is None:
        assert load(str(tmp_path / "q.parquet")).fields == ("a", "b")
        return
    with pytest.raises(UsageError) as e:
        load(str(tmp_path / "q.parquet"))
    assert message in e.value.message and str(tmp_path / "q.parquet") in e.value.message


def test_a_list_in_a_file_and_one_by_one_are_not_mixed(tmp_path):
    (tmp_path / "q.txt").write_text("a?\n")
    with pytest.raises(UsageError, match="not both"):
        load(str(tmp_path / "q.txt"), ("b?",))
    (tmp_path / "q.json").write_text('["a?"]')
    with pytest.raises(UsageError, match="give a .txt file"):
        load(str(tmp_path / "q.json"))
    with pytest.raises(UsageError, match="no such file"):
        load(str(tmp_path / "missing.txt"))


def test_each_passage_is_tokenized_once_for_all_its_questions(bert_tokenizer):
    """The chunker shares a window's passages: n documents x m questions hold n passages' tokens."""
    from pipeline.stages.chunk import Chunker
    from pipeline.stages.read import RowBatch, ask_each

    passages = ["alpha beta gamma " * 40, "delta omega " * 30, None]
    docs = RowBatch(first_row=10, passages=passages, questions=[], ids=None, kept={})
    asked = QuestionList(("what is alpha?", "where is omega?", "who?", "why?"), None, "--question")
    pairs = ask_each(docs, asked)
    assert len(pairs) == 12 and pairs.input_rows == 3
    assert all(pairs.passages[4 * r + j] is passages[r] for r in range(3) for j in range(4))
    chunks = Chunker(bert_tokenizer, 48, 16)(pairs.passages, pairs.questions)
    assert len(chunks.passage_ids) == 2 and len(chunks.question_ids) == 4
    assert chunks.errors[8:] == ["passage is null"] * 4


# ---------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """The sample's distinct passages as documents (the two long articles first), and a field list."""
    base = tmp_path_factory.mktemp("questions")
    src = pq.read_table(SAMPLE).to_pylist()
    passages = sorted({r["passage"]: r["title"] for r in src}.items(), key=lambda kv: -len(kv[0]))
    write_parquet(base / "docs.parquet", {"id": [f"d{i}" for i in range(len(passages))],
                                          "passage": [p for p, _ in passages], "title": [t for _, t in passages]})
    (base / "fields.csv").write_text("field,question\nwho,Who ruled Normandy?\nwhen,When did it happen?\n"
                                     "what,What is complexity theory?\n")
    return base


OPTIONS = ["--max-seq-len", "128", "--doc-stride", "32", "--rows-per-window", "1", "--batch-size", "4"]


def test_limit_counts_input_rows_and_the_list_is_in_the_metadata(docs, bert_dir, tmp_path):
    out = tmp_path / "out.parquet"
    r = run_cli("run", docs / "docs.parquet", "--questions", docs / "fields.csv", "-o", out, "--model", bert_dir,
                "--limit", "3", "--keep-columns", "title", *OPTIONS)
    assert r.returncode == 0, r.stderr
    t = pq.read_table(out)
    assert t.column_names[:3] == ["id", "field", "question"] and t.column_names[-1] == "title"
    assert t["id"].to_pylist() == ["d0"] * 3 + ["d1"] * 3 + ["d2"] * 3
    assert t["field"].to_pylist() == ["who", "when", "what"] * 3
    meta = read_metadata(str(out))
    assert meta["questions"]["fields"] == ["who", "when", "what"] and meta["summary"]["rows"] == 9


@pytest.mark.parametrize("extra,message", [
    (["--question", "what " * 120], "--question: question 0 ('what what"),
    (["--questions", "FIELDS", "--question", "b?"], "not both"),
    (["--wide"], "--wide needs a question list"),
])
def test_refused_with_exit_2_before_any_model_work(docs, bert_dir, tmp_path, extra, message):
    out = tmp_path / "out.parquet"
    extra = [str(docs / "fields.csv") if x == "FIELDS" else x for x in extra]
    r = run_cli("run", docs / "docs.parquet", "-o", out, "--model", bert_dir, *OPTIONS, *extra)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not out.exists() and not (tmp_path / "out.parquet.partial").exists()


def test_a_question_column_in_the_input_is_ignored_and_said_so(docs, bert_dir, tmp_path):
    src = pq.read_table(SAMPLE).slice(12, 3)  # paragraphs, with a question column
    write_parquet(tmp_path / "in.parquet", {"id": src["id"], "passage": src["passage"], "question": src["question"]})
    r = run_cli("run", tmp_path / "in.parquet", "--question", "Who?", "-o", tmp_path / "out.parquet",
                "--model", bert_dir, *OPTIONS)
    assert r.returncode == 0, r.stderr
    assert "the input's 'question' column is ignored: every row is asked the 1 question of --question" in r.stderr
    assert pq.read_table(tmp_path / "out.parquet")["question"].to_pylist() == ["Who?"] * 3
    r = run_cli("run", tmp_path / "in.parquet", "--question", "Who?", "-o", tmp_path / "kept.parquet",
                "--model", bert_dir, "--keep-columns", "question", *OPTIONS)
    assert r.returncode == 2 and "--keep-columns question: the output has a column 'question'" in r.stderr


def _command(docs, bert_dir, out, *extra):
    return [sys.executable, "-m", "jobs.cli", "run", str(docs / "docs.parquet"), "--questions",
            str(docs / "fields.csv"), "-o", str(out), "--model", bert_dir, *OPTIONS, *extra]


@pytest.fixture(scope="module")
def reference(docs, bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("questions-ref") / "ref.parquet"
    r = subprocess.run(_command(docs, bert_dir, out, "--wide"), capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    return pq.read_table(out)


@pytest.mark.parametrize("point", ["batch:5", "part_written:2"])
def test_a_kill_in_the_middle_of_a_documents_questions_resumes_to_the_same_output(docs, bert_dir, reference,
                                                                                  tmp_path, point):
    """One document per window; batch:5 is inside the first (the longest article: dozens of batches)."""
    out, report = tmp_path / "out.parquet", tmp_path / "report.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(_command(docs, bert_dir, out, "--wide"), capture_output=True, text=True, cwd=ROOT,
                       env={**env, "QA_BATCH_CRASH_AT": point})
    assert r.returncode == -signal.SIGKILL, r.stderr
    parts = sorted(os.listdir(str(out) + ".partial"))
    kept = [p for p in parts if p.startswith("part-") and p.endswith(".parquet")]
    assert len(kept) == (0 if point == "batch:5" else 1)  # part_written:2 dies before its move
    r = subprocess.run(_command(docs, bert_dir, out, "--wide", "--report", str(report)), capture_output=True,
                       text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(out), reference)
    rep = json.loads(report.read_text())
    assert rep["rows"] == 3 * reference.num_rows  # answers: one per document and question
    assert rep["resumed_from_row"] == 3 * len(kept) and rep["rows_this_run"] == rep["rows"] - 3 * len(kept)


def test_two_worker_processes_write_the_one_process_output(docs, bert_dir, reference, tmp_path):
    r = subprocess.run(_command(docs, bert_dir, tmp_path / "out.parquet", "--wide", "--devices", "cpu,cpu"),
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(tmp_path / "out.parquet"), reference)


def test_the_ray_engine_writes_the_local_engines_rows(docs, bert_dir, reference, tmp_path):
    pytest.importorskip("ray.data")
    out = tmp_path / "out"
    r = subprocess.run(_command(docs, bert_dir, out, "--wide", "--engine", "ray", "--num-gpus", "0",
                                "--cpu-workers", "1", "--rows-per-batch", "3"),
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stderr
    got = pq.read_table(out)
    assert_same_answers(got.sort_by("id"), reference.sort_by("id"))


def test_the_readme_contracts_example(bert_dir, tmp_path):
    """data/contracts.parquet and data/contract_fields.csv are what data/make_contracts.py makes,
    and the README's command gives one row per contract with a group of columns per field."""
    sys.path.insert(0, os.path.join(ROOT, "data"))
    import make_contracts

    make_contracts.main(str(tmp_path))
    assert pq.read_table(tmp_path / "contracts.parquet").equals(pq.read_table(os.path.join(ROOT, "data",
                                                                                           "contracts.parquet")))
    with open(os.path.join(ROOT, "data", "contract_fields.csv")) as f:
        assert (tmp_path / "contract_fields.csv").read_text() == f.read()
    out = tmp_path / "answers.parquet"
    r = run_cli("run", "data/contracts.parquet", "--questions", "data/contract_fields.csv", "--wide", "--allow-null",
                "-o", out, "--model", bert_dir)
    assert r.returncode == 0, r.stderr
    assert re.search(r"qa-batch: 30 answers to 6 questions of 5 rows \(\d+ answered, \d+ null, 0 errors\), "
                     r"\d+ chunks in [\d.]+ s on cpu: [\d.]+ answers/s", r.stderr), r.stderr
    wide = pq.read_table(out)
    assert wide["id"].to_pylist() == [c[0] for c in make_contracts.CONTRACTS]
    assert wide.column_names == ["id", *(wide_name(f, c) for f, _ in make_contracts.FIELDS for c in ANSWER_COLUMNS
                                         if c != "answers" and c not in DOCUMENT_ONLY)]  # answers: with --top-k
    assert "supplier_confidence" in wide.column_names and "governing_law_error" in wide.column_names
    passages = dict(zip(wide["id"].to_pylist(), (c[2] for c in make_contracts.CONTRACTS)))
    for row in wide.to_pylist():
        for field, _ in make_contracts.FIELDS:
            if row[field] is not None:
                assert passages[row["id"]][row[f"{field}_start"]:row[f"{field}_end"]] == row[field]
    r = run_cli("summary", out, "--by", "field")  # the tools read a wide output as its long form
    assert r.returncode == 0, r.stderr
    assert "rows 30:" in r.stdout and "by field (6 groups" in r.stdout


def test_the_summary_line_counts_answers_to_the_questions_of_the_rows():
    from pipeline.engines.report import RunSummary

    s = RunSummary(output="out.parquet", device="cpu", elapsed_s=2.0, rows_per_s=6.0, chunks_per_s=9.0,
                   resumed_from_row=18, questions_per_row=6)
    s.set_counts({"rows": 30, "chunks": 40, "answered": 25, "errors": 1},
                 {"rows": 12, "chunks": 18, "answered": 10, "errors": 0})
    assert s.line() == ("qa-batch: 12 answers to 6 questions of 2 rows (10 answered, 2 null, 0 errors), 18 chunks "
                        "in 2.0 s on cpu: 6.0 answers/s, 9.0 chunks/s; with the 18 answers given before, "
                        "30 answers to 6 questions of 5 rows (25 answered, 4 null, 1 error), 40 chunks in all "
                        "-> out.parquet")
    pairs = RunSummary(output="o", elapsed_s=1.0, rows_per_s=1.0)
    pairs.set_counts({"rows": 1, "chunks": 1, "answered": 1, "errors": 0}, {"rows": 1, "chunks": 1, "answered": 1,
                                                                            "errors": 0})
    assert pairs.line().startswith("qa-batch: 1 row (1 answered, 0 null, 0 errors), 1 chunk in 1.0 s: 1.0 rows/s")
