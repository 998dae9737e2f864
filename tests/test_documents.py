"""Documents stored as many rows (--document-col, --across-rows) against a brute-force reference.

The reference answers every (passage, question) pair alone (test_differential's reference_row,
written from README's definitions) and takes, per (document, question), the best-scoring span
over the group (ties: the earlier passage), the minimum null score, and the confidence
exp(score - logsumexp(log_norm of every passage, null_score of the document)) (the null term
only with --allow-null). Groups are generated: sizes 1 to many, interleaved documents, empty and
null passages, errors, null keys, a question column or a question list, any options.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st

from conftest import assert_same_answers, run_cli
from pipeline.config import RunConfig
from pipeline.engines.local import run
from pipeline.engines.resume import WorkDir
from pipeline.errors import UsageError
from pipeline.stages.wide import to_long
from pipeline.stages.write import read_metadata
from test_differential import TOL, options, reference_row, texts
from tiny_models import CORPUS

# ---------------------------------------------------------------------------- the reference


def reference_documents(loaded, rows: list[dict], asked: list[str] | None, o: dict, across: bool) -> list[dict]:
    """One expected output row per (document, question), in order of first appearance.

    `rows`: dicts with doc, passage, question, pid (the passage's id); `asked`: a question list."""
    groups: dict[tuple, list] = {}
    order = 0
    for row in rows:
        for j, q in (enumerate(asked) if asked is not None else [(None, row["question"])]):
            key = (None if across else row["doc"], j if asked is not None else q)
            ref = reference_row(loaded, row["passage"], q, o)
            groups.setdefault(key, []).append((order, row, q, ref))
            order += 1
    out = []
    for (doc, _), pairs in groups.items():
        q = pairs[0][2]
        answered = [(i, row, ref) for i, row, _, ref in pairs if not ref["error"] or ref.get("no_span")]
        base = dict(doc=doc, question=q, passages=len(pairs),
                    chunks=sum(ref["chunks"] for _, _, ref in answered))
        if not answered:
            out.append({**base, "error": "no passage"})
            continue
        null_score = min(ref["null_score"] for _, _, ref in answered)
        cands = sorted(((x.score, i, rank, x, row) for i, row, ref in answered if not ref["error"]
                        for rank, x in enumerate(ref["cands"])), key=lambda t: (-t[0], t[1], t[2]))
        if not cands:
            out.append({**base, "error": "no span", "null_score": null_score})
            continue
        span_norm = float(np.logaddexp.reduce([ref["span_norm"] for _, _, ref in answered if not ref["error"]]))
        log_norm = float(np.logaddexp(span_norm, null_score)) if o["allow_null"] else span_norm
        best = cands[0]
        is_null = o["allow_null"] and null_score - best[0] > o["null_threshold"]
        chosen = null_score if is_null else best[0]
        out.append({**base, "error": None, "null_score": null_score, "span_norm": span_norm, "is_null": is_null,
                    "margin": null_score - best[0] - o["null_threshold"], "score": chosen,
                    "confidence": math.exp(chosen - log_norm), "runner_up": cands[1][0] if len(cands) > 1 else None,
                    "cands": [(s, x, row["pid"], row["passage"]) for s, _, _, x, row in cands],
                    "top": [dict(text=row["passage"][x.start:x.end], start=x.start, end=x.end, score=s,
                                 confidence=math.exp(s - log_norm), passage=row["pid"])
                            for s, _, _, x, row in cands[: o["top_k"]]]})
    return out


# ---------------------------------------------------------------------------- the comparison

def answer_documents(loaded, model_dir: str, rows: list[dict], asked, o: dict, across: bool,
                     with_ids: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/in.parquet"
        columns = {"doc": pa.array([r["doc"] for r in rows], pa.int64()),
                   "passage": pa.array([r["passage"] for r in rows], pa.string()),
                   **({} if asked else {"question": pa.array([r["question"] for r in rows], pa.string())})}
        if with_ids:
            columns["page"] = pa.array([r["pid"] for r in rows], pa.string())
        pq.write_table(pa.table(columns), src)
        config = RunConfig(inputs=(src,), output=f"{tmp}/out.parquet", quiet=True, model=model_dir,
                           id_col="page" if with_ids else None, question=tuple(asked or ()),
                           document_col=None if across else "doc", across_rows=across, **o)
        try:
            summary = run(config, loaded=loaded)
        except UsageError as e:  # a question of the list leaves no room for the passage: refused up front
            assume(asked is None or "is too long for --max-seq-len" not in str(e))
            raise
        got = pq.read_table(config.output).to_pylist()
    assert summary.documents == len(got) and summary.rows == len(rows) * (len(asked) if asked else 1)
    return got


def check_documents(loaded, model_dir, rows, asked, o, across, with_ids, exact: bool) -> None:
    """`model_dir`: a checkpoint with `loaded`'s tokenizer (a question list is checked against it)."""
    note(f"options: {o}, across={across}, asked={asked}")
    want = reference_documents(loaded, rows, asked, o, across)
    event(f"passages per document and question: {'1' if max(w['passages'] for w in want) == 1 else 'several'}")
    event(f"candidates from several passages of one document: "
          f"{'some' if any(w.get('cands') and w['cands'][0][2] != w['cands'][-1][2] for w in want) else 'none'}")
    got = answer_documents(loaded, model_dir, rows, asked, o, across, with_ids)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        note(f"got {g}\nwant {w}")
        if not across:
            assert g["doc"] == w["doc"]
        assert g["question"] == w["question"] and g["passages"] == w["passages"] and g["chunks"] == w["chunks"]
        if w["error"] == "no passage":
            assert g["error"] is not None and g["answer"] is None and g["null_score"] is None
            continue
        assert g["null_score"] == pytest.approx(w["null_score"], abs=TOL)
        if w["error"] == "no span":
            assert g["error"] is not None and g["answer"] is None
            continue
        assert g["error"] is None
        assert g["log_norm"] == pytest.approx(w["span_norm"], abs=TOL)
        if exact or abs(w["margin"]) > TOL:
            assert (g["answer"] is None) == w["is_null"]
        scores = {(pid, x.start, x.end): s for s, x, pid, _ in w["cands"]}
        best = w["cands"][0][0]
        if g["answer"] is not None:
            key = (g["passage"], g["answer_start"], g["answer_end"])
            assert key in scores, "the answer is no span of the document's passages"
            if exact:
                _, x, pid, _ = w["cands"][0]
                assert key == (pid, x.start, x.end)
            assert scores[key] == pytest.approx(best, abs=TOL) and g["score"] == pytest.approx(best, abs=TOL)
            passage = next(p for _, _, pid, p in w["cands"] if pid == g["passage"])
            assert passage[g["answer_start"]:g["answer_end"]] == g["answer"]
        else:
            assert g["score"] == pytest.approx(w["null_score"], abs=TOL) and g["passage"] is None
        if exact or abs(w["margin"]) > TOL:
            assert g["confidence"] == pytest.approx(w["confidence"], abs=TOL)
        if w["runner_up"] is None:
            assert g["runner_up_score"] is None
        else:
            assert g["runner_up_score"] == pytest.approx(w["runner_up"], abs=TOL)
        if o["top_k"] > 1:
            top = g["answers"]
            assert [a["score"] for a in top] == pytest.approx([a["score"] for a in w["top"]], abs=TOL)
            assert [a["confidence"] for a in top] == pytest.approx([a["confidence"] for a in w["top"]], abs=TOL)
            if exact:
                assert top == [{**a, "score": pytest.approx(a["score"]),
                                "confidence": pytest.approx(a["confidence"], abs=TOL)} for a in w["top"]]
            assert len({(a["passage"], a["start"], a["end"]) for a in top}) == len(top)
            null_share = (math.exp(w["null_score"] - np.logaddexp(w["span_norm"], w["null_score"]))
                          if o["allow_null"] else 0.0)
            assert sum(a["confidence"] for a in top) + null_share <= 1.0 + TOL


@st.composite
def documents(draw) -> tuple[list[dict], list[str] | None, bool]:
    """Rows of interleaved documents (keys drawn from a few, so groups have 1 to many pages), a
    question column drawn from a few questions (so pages share them) or a question list."""
    n = draw(st.integers(1, 10))
    n_docs = draw(st.integers(1, 4))
    key = st.one_of(st.integers(0, n_docs - 1), st.none()) if draw(st.booleans()) else st.integers(0, n_docs - 1)
    questions = draw(st.lists(texts(max_pieces=6), min_size=1, max_size=3))
    with_ids = draw(st.booleans())
    rows = [dict(doc=draw(key), passage=draw(texts(max_pieces=30)), question=draw(st.sampled_from(questions)),
                 pid=f"p{i}" if with_ids else i) for i in range(n)]
    asked = None
    if draw(st.booleans()):  # a question list (--question, repeated): blank or repeated questions are refused
        asked = list(dict.fromkeys(q.strip() if q and q.strip() else "who?" for q in questions))
    return rows, asked, with_ids


def _options(draw_o: dict) -> dict:
    o = dict(draw_o)
    o.pop("limit", None)  # a document's passages are all rows that carry its key: the whole table
    return o


@settings(deadline=None)
@given(data=documents(), o=options(), across=st.booleans())
def test_table_model_documents_answer_exactly_as_the_reference(models, checkpoints, data, o, across):
    rows, asked, with_ids = data
    check_documents(models["table"], checkpoints["bert"], rows, asked, _options(o), across, with_ids, exact=True)


@settings(deadline=None, max_examples=15)
@given(data=documents(), o=options(), across=st.booleans())
def test_random_model_documents_answer_as_the_reference(models, checkpoints, data, o, across):
    rows, asked, with_ids = data
    check_documents(models["bert"], checkpoints["bert"], rows, asked, _options(o), across, with_ids, exact=False)


# ---------------------------------------------------------------------------- engines, resume, shapes

OPTIONS = ("--max-seq-len", "48", "--doc-stride", "16", "--rows-per-window", "4", "--top-k", "3", "--allow-null",
           "--device", "cpu", "--quiet")


@pytest.fixture(scope="module")
def paged(tmp_path_factory, checkpoints):
    """24 pages of 5 interleaved documents, in row groups of 5 (windows and row groups disagree)."""
    base = tmp_path_factory.mktemp("paged")
    rng = np.random.default_rng(7)
    pages = [" ".join(rng.choice(CORPUS, int(rng.integers(1, 40)))) for _ in range(24)]
    pages[3] = ""  # an error page: the document is still answered from its other pages
    docs = [f"doc-{int(d)}" for d in rng.integers(0, 5, 24)]
    src = base / "pages.parquet"
    pq.write_table(pa.table({"doc_id": docs, "page_id": [f"p{i}" for i in range(24)], "passage": pages}), src,
                   row_group_size=5)
    ref = base / "ref.parquet"
    r = run_cli("run", src, "-o", ref, "--model", checkpoints["bert"], "--document-col", "doc_id", "--id-col",
                "page_id", "--question", "Who came?", "--question", "When?", *OPTIONS)
    assert r.returncode == 0, r.stderr
    return {"input": src, "reference": pq.read_table(ref), "model": checkpoints["bert"], "docs": docs}


ASK = ("--document-col", "doc_id", "--id-col", "page_id", "--question", "Who came?", "--question", "When?")


def test_the_output_has_one_row_per_document_and_question_in_order_of_first_appearance(paged):
    t = paged["reference"]
    first = list(dict.fromkeys(paged["docs"]))
    assert t["doc_id"].to_pylist() == [d for d in first for _ in range(2)]
    assert t["question_index"].to_pylist() == [0, 1] * len(first)
    assert t["passages"].to_pylist() == [paged["docs"].count(d) for d in first for _ in range(2)]
    assert t.schema.field("passage").type == pa.string()  # the --id-col value names the passage
    pages = dict(zip([f"p{i}" for i in range(24)], pq.read_table(paged["input"])["passage"].to_pylist()))
    for row in t.to_pylist():
        assert row["error"] is None
        if row["answer"] is not None:
            assert pages[row["passage"]][row["answer_start"]:row["answer_end"]] == row["answer"]
            assert paged["docs"][int(row["passage"][1:])] == row["doc_id"]


def test_a_killed_run_resumes_to_the_same_documents(paged, tmp_path):
    out, report = tmp_path / "out.parquet", tmp_path / "report.json"
    args = ("run", paged["input"], "-o", out, "--model", paged["model"], *ASK, *OPTIONS)
    r = run_cli(*args, env={"QA_BATCH_CRASH_AT": "part_written:3"})
    assert r.returncode == -9 and not out.exists()
    kept = WorkDir(str(out) + ".partial").parts()
    assert len(kept) == 2  # the third part died before its rename
    r = run_cli(*args, "--report", report)
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(out), paged["reference"])
    summary = json.loads(report.read_text())
    assert summary["rows_this_run"] == summary["rows"] - 2 * 4 * 2  # two windows of 4 pages, 2 questions each
    assert summary["documents"] == 2 * len(set(paged["docs"])) and read_metadata(str(out))["options"]["document_col"] == "doc_id"


def test_two_workers_give_the_one_process_documents(paged, tmp_path):
    out = tmp_path / "out.parquet"
    r = run_cli("run", paged["input"], "-o", out, "--model", paged["model"], *ASK, *OPTIONS, "--devices", "cpu,cpu")
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(out), paged["reference"])


def test_wide_documents_turn_back_into_the_long_ones(paged, tmp_path):
    out = tmp_path / "out.parquet"
    r = run_cli("run", paged["input"], "-o", out, "--model", paged["model"], *ASK, *OPTIONS, "--wide")
    assert r.returncode == 0, r.stderr
    wide = pq.read_table(out)
    assert wide.num_rows == len(set(paged["docs"])) and "q0_passage" in wide.column_names and "q1_passages" in wide.column_names
    from pipeline.stages.questions import QuestionList

    long = to_long(wide, QuestionList.from_dict(read_metadata(str(out))["questions"]))
    assert_same_answers(long, paged["reference"])


def test_ray_gives_the_local_documents(paged, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    r = run_cli("run", paged["input"], "-o", out, "--model", paged["model"], *ASK, *OPTIONS, "--engine", "ray",
                "--num-gpus", "0", "--rows-per-batch", "8", timeout=600)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(out / "_SUCCESS") and not os.path.exists(str(out) + ".partial")
    files = [f for f in os.listdir(out) if f.endswith(".parquet")]
    assert len(files) == 1
    assert_same_answers(pq.read_table(out / files[0]), paged["reference"])


# ---------------------------------------------------------------------------- refused before any model work

@pytest.mark.parametrize("extra, match", [
    (("--document-col", "book"), r"column 'book' is missing \(name the column .* --document-col\)"),
    (("--document-col", "score"), r"--document-col score has type double; a document key must be text"),
    (("--document-col", "doc_id", "--across-rows"), r"give one \(--across-rows makes the whole table one document\)"),
    (("--document-col", "passage"), r"--document-col passage: that is the passage column"),
    (("--document-col", "doc_id", "--keep-columns", "score"), r"input columns cannot be kept \(--keep-columns\): join"),
    (("--across-rows", "--question", "who?", "--wide"), r"--across-rows gives one output row per question already"),
])
def test_a_bad_document_option_is_refused_naming_the_fix(tmp_path, extra, match):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"doc_id": ["a"], "passage": ["x"], "question": ["q"], "score": [1.0]}), src)
    with pytest.raises(UsageError, match=match):
        run(RunConfig(inputs=(str(src),), model=str(tmp_path / "no-model"), quiet=True,
                      document_col=extra[1] if extra[0] == "--document-col" else None,
                      across_rows="--across-rows" in extra, wide="--wide" in extra,
                      question=("who?",) if "--question" in extra else (),
                      keep_columns=("score",) if "--keep-columns" in extra else ()))


def test_the_cli_exits_2_on_a_missing_document_column_before_loading_the_model(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"passage": ["x"], "question": ["q"]}), src)
    r = run_cli("run", src, "--model", tmp_path / "no-model", "--document-col", "doc_id")
    assert r.returncode == 2
    assert "column 'doc_id' is missing" in r.stderr and "no-model" not in r.stderr


def test_a_document_of_many_pages_keeps_only_its_best_candidates():
    """The reduction holds per (document, question) its best max(top_k, 2) candidates and three
    numbers, however many pages stream past: memory follows documents x --top-k, not pages."""
    from pipeline.stages.documents import Grouper, Grouping, pair_schema
    from pipeline.stages.read import InputPlan

    plan = InputPlan(files=(), passage_col="passage", question_col="question", id_col=None, keep_columns=(),
                     total_rows=0, file_rows=(), id_type=None, keep_types=(), document_col="doc",
                     document_type=pa.string())
    schema = pair_schema(plan, Grouping("doc"))
    grouper = Grouper(plan, Grouping("doc"), top_k=3, allow_null=True, null_threshold=0.0)
    rng = np.random.default_rng(0)
    best = (-math.inf, None)
    for window in range(20):
        n = 500
        scores = rng.normal(size=(n, 3)).astype(np.float32)
        rows = window * n + np.arange(n)
        for r, s in zip(rows, scores.max(axis=1)):
            best = max(best, (float(s), int(r)), key=lambda t: t[0])
        grouper.feed(pa.Table.from_pydict({
            "doc": ["a" if r % 7 else "b" for r in rows], "passage": rows, "question": ["q"] * n,
            "candidates": [[{"text": "x", "start": 0, "end": 1, "score": float(v)} for v in sorted(s, reverse=True)]
                           for s in scores],
            "null_score": np.full(n, -3.0, np.float32), "log_norm": np.log(np.exp(scores).sum(axis=1)).astype(float),
            "chunks": np.ones(n, np.int32), "error": [None] * n}, schema=schema))
        assert all(len(g.candidates) <= 3 for g in grouper.groups.values())
    assert len(grouper.groups) == 2 and sum(g.passages for g in grouper.groups.values()) == 10_000
    answers = {g.document: grouper.answers(g) for g in grouper.groups.values()}
    winner = answers["a" if best[1] % 7 else "b"]
    assert winner.answer.passage == best[1] and winner.score == pytest.approx(best[0])
