"""The whole pipeline against a brute-force reference, on generated inputs and options.

The reference is written here from README.md's definitions, independently of pipeline/:
every pair is encoded on its own by the tokenizer (`truncation="only_second", stride=...,
return_overflowing_tokens=True`), every chunk runs through the model alone, every span of
the passage is enumerated in Python, given to the chunk that owns it, and the row's answer,
top-k list, null decision and confidence are computed from those candidates.

Three models: a "table" model whose logits are a function of the token id only (batching
and padding cannot change them, so answers must be exact, ties included: its logits take
few distinct values on purpose), and tiny random BERT and RoBERTa checkpoints loaded with
from_pretrained (their logits move by ~1e-6 with batching, so near-ties are compared by
score, not by span). Run more examples with `pytest --hypothesis-profile=long`.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

from pipeline.config import RunConfig
from pipeline.engines.local import run
from pipeline.models.checkpoint import LoadedModel
from tiny_models import CORPUS

TOL = 1e-4

# ---------------------------------------------------------------------------- inputs

WORDS = sorted({w for line in CORPUS for w in line.split()})
ODD = ["", " ", "   ", "\t", "\r\n", "\n\n", "😀", "👩\u200d💻", "🇫🇷", "e\u0301", "a\u0308o\u0302", "東京は日本",
       "北京", "שלום", "مرحبا", "\u200b", "\u200d", "alpha" * 12, "x" * 70, ".", ",", "—", "$1,200.00", "(12)"]
piece = st.one_of(st.sampled_from(WORDS), st.sampled_from(ODD))
separator = st.sampled_from([" ", " ", " ", "", "  ", "\r\n", "\n", "\t"])


@st.composite
def texts(draw, max_pieces: int = 40) -> str | None:
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return None
    if kind == 1:
        return draw(st.sampled_from(["", " ", "\r\n\t ", "\u200b", "\u200b\u200d"]))  # empty, blank, no tokens
    pieces = draw(st.lists(piece, min_size=1, max_size=max_pieces))
    seps = draw(st.lists(separator, min_size=len(pieces), max_size=len(pieces)))
    return "".join(p + s for p, s in zip(pieces, seps))


@st.composite
def options(draw) -> dict:
    max_seq_len = draw(st.one_of(st.integers(8, 40), st.integers(40, 128)))
    o = dict(
        max_seq_len=max_seq_len,
        doc_stride=draw(st.integers(0, max_seq_len - 1)),
        max_answer_len=draw(st.integers(1, 64)),
        top_k=draw(st.integers(1, 5)),
        allow_null=draw(st.booleans()),
        null_threshold=draw(st.sampled_from([0.0, -2.0, 1.5, 5.0])),
        truncate_question=draw(st.booleans()),
        max_question_len=draw(st.integers(1, 20)),
        rows_per_window=draw(st.integers(1, 64)),
        batch_size=draw(st.integers(1, 8)),
        max_batch_tokens=draw(st.one_of(st.none(), st.integers(16, 512))),
        cpu_workers=draw(st.sampled_from([None, 1, 2])),
    )
    if draw(st.booleans()):
        o["limit"] = draw(st.integers(0, 8))
    return o


# ---------------------------------------------------------------------------- models



def forward(loaded: LoadedModel, enc: dict) -> tuple[np.ndarray, np.ndarray]:
    """One chunk alone through the model: float32 start and end logits."""
    inputs = {name: torch.tensor([enc[name]]) for name in loaded.input_names if name in enc}
    if "attention_mask" in loaded.input_names:
        inputs["attention_mask"] = torch.ones(1, len(enc["input_ids"]), dtype=torch.long)
    with torch.inference_mode():
        out = loaded.model(**inputs)
    return out.start_logits[0].float().numpy(), out.end_logits[0].float().numpy()


# ---------------------------------------------------------------------------- the reference

@dataclass
class Candidate:
    score: float  # float32 sum of the owner chunk's logits
    owner: int
    s: int  # passage token positions
    e: int
    start: int  # character offsets
    end: int


def reference_row(loaded: LoadedModel, passage, question, o: dict) -> dict:
    """What README.md says the output row holds."""
    tok = loaded.tokenizer
    for text in (passage, question):
        if text is None or not text.strip():
            return {"error": True}
    q_enc = tok(question, add_special_tokens=False, return_offsets_mapping=True)
    if o["truncate_question"] and len(q_enc["input_ids"]) > o["max_question_len"]:
        question = question[: q_enc["offset_mapping"][o["max_question_len"] - 1][1]]
        cut = tok(question, add_special_tokens=False)["input_ids"]
        assume(cut == q_enc["input_ids"][: o["max_question_len"]])  # the prefix re-tokenizes alike
        q_enc = {"input_ids": cut}
    p_enc = tok(passage, add_special_tokens=False, return_offsets_mapping=True)
    offsets = p_enc["offset_mapping"]
    n_p = len(offsets)
    budget = o["max_seq_len"] - tok.num_special_tokens_to_add(pair=True) - len(q_enc["input_ids"])
    if n_p > budget and budget <= o["doc_stride"]:
        return {"error": True}  # the question leaves no room for the stride
    if n_p == 0:
        return {"error": True}
    if n_p <= budget:  # one chunk (transformers refuses some strides even where nothing overflows)
        enc = tok([question], [passage], return_offsets_mapping=True)
    else:
        enc = tok(question, passage, truncation="only_second", max_length=o["max_seq_len"],
                  stride=o["doc_stride"], return_overflowing_tokens=True, return_offsets_mapping=True)

    # chunks: passage-token windows [ts, te), logits, where each window sits in its chunk
    windows, logits, ctx_at, null = [], [], [], []
    for i in range(len(enc["input_ids"])):
        seq = enc.sequence_ids(i)
        ctx = [j for j, sid in enumerate(seq) if sid == 1]
        ts = 0 if not windows else windows[-1][1] - o["doc_stride"]  # consecutive chunks share the stride
        windows.append((ts, ts + len(ctx)))
        assert [tuple(enc["offset_mapping"][i][j]) for j in ctx] == [tuple(x) for x in offsets[ts : ts + len(ctx)]]
        start, end = forward(loaded, {"input_ids": enc["input_ids"][i], "token_type_ids": enc.encodings[i].type_ids})
        logits.append((start, end))
        ctx_at.append(ctx[0] - ts)
        cls = enc["input_ids"][i].index(tok.cls_token_id)
        null.append(float(np.float32(start[cls]) + np.float32(end[cls])))
    assert windows[-1][1] == n_p

    # ownership: the chunk whose home (middle of overlap to middle of overlap) holds the start,
    # if it holds the whole span; else the first chunk that holds it
    home = []
    for c, (ts, te) in enumerate(windows):
        lo = 0 if c == 0 else (ts + windows[c - 1][1]) // 2
        hi = te if c == len(windows) - 1 else (windows[c + 1][0] + te) // 2
        home.append((lo, hi))
    first_of_start = [t == 0 or offsets[t][0] != offsets[t - 1][0] for t in range(n_p)]
    last_of_end = [t == n_p - 1 or offsets[t][1] != offsets[t + 1][1] for t in range(n_p)]
    cands = []
    for s in range(n_p):
        if not first_of_start[s]:
            continue
        h = next(c for c, (lo, hi) in enumerate(home) if lo <= s < hi)
        for e in range(s, min(s + o["max_answer_len"], n_p)):
            if not last_of_end[e]:
                continue
            holding = [c for c, (ts, te) in enumerate(windows) if ts <= s and e < te]
            if not holding:
                continue
            c = h if h in holding else holding[0]
            start, end = logits[c]
            score = float(np.float32(start[ctx_at[c] + s]) + np.float32(end[ctx_at[c] + e]))
            cands.append(Candidate(score, c, s, e, offsets[s][0], offsets[e][1]))
    if not cands:  # chunks, but no valid span: an error for the row; a document still counts its chunks
        return {"error": True, "no_span": True, "chunks": len(windows), "null_score": min(null)}
    cands.sort(key=lambda x: (-x.score, x.owner, x.s, x.e))
    distinct, seen = [], set()
    for x in cands:
        if (x.start, x.end) not in seen:
            seen.add((x.start, x.end))
            distinct.append(x)
    null_score = min(null)
    span_norm = float(np.logaddexp.reduce([x.score for x in cands]))
    log_norm = float(np.logaddexp(span_norm, null_score)) if o["allow_null"] else span_norm
    top = [dict(text=passage[x.start : x.end], start=x.start, end=x.end, score=x.score,
                confidence=math.exp(x.score - log_norm)) for x in distinct[: o["top_k"]]]
    is_null = o["allow_null"] and null_score - distinct[0].score > o["null_threshold"]
    return dict(error=False, chunks=len(windows), cands=distinct, null_score=null_score, span_norm=span_norm,
                margin=null_score - distinct[0].score - o["null_threshold"], is_null=is_null, top=top,
                score=null_score if is_null else distinct[0].score,
                confidence=math.exp((null_score if is_null else distinct[0].score) - log_norm),
                runner_up=distinct[1].score if len(distinct) > 1 else None)


# ---------------------------------------------------------------------------- the comparison

def answer(loaded: LoadedModel, passages, questions, o: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/in.parquet"
        pq.write_table(pa.table({"passage": pa.array(passages, pa.string()),
                                 "question": pa.array(questions, pa.string())}), src)
        config = RunConfig(inputs=(src,), output=f"{tmp}/out.parquet", quiet=True, model=loaded.model_id, **o)
        summary = run(config, loaded=loaded)
        rows = pq.read_table(config.output).to_pylist()
    assert summary.rows == len(rows)
    return rows


def check(loaded: LoadedModel, passages, questions, o: dict, exact: bool) -> None:
    note(f"options: {o}")
    rows = answer(loaded, passages, questions, o)
    n = len(passages) if o.get("limit") is None else min(o["limit"], len(passages))
    assert [r["row"] for r in rows] == list(range(n))  # one row per input row, in order
    for r, row in enumerate(rows):
        p, q = passages[r], questions[r]
        assert row["question"] == q
        ref = reference_row(loaded, p, q, o)
        note(f"row {r}: passage={p!r} question={q!r} -> {row}")
        if ref["error"]:
            assert row["error"] is not None and row["answer"] is None
            continue
        assert row["error"] is None
        assert row["chunks"] == ref["chunks"]
        assert row["null_score"] == pytest.approx(ref["null_score"], abs=TOL)
        assert row["log_norm"] == pytest.approx(ref["span_norm"], abs=TOL)
        scores = {(x.start, x.end): x.score for x in ref["cands"]}
        best = ref["cands"][0].score
        # the answer: exact for the table model; within TOL of the best for random weights
        if exact or abs(ref["margin"]) > TOL:
            assert (row["answer"] is None) == ref["is_null"]
        if row["answer"] is not None:
            assert p[row["answer_start"] : row["answer_end"]] == row["answer"]
            key = (row["answer_start"], row["answer_end"])
            if exact:
                assert key == (ref["cands"][0].start, ref["cands"][0].end)
            assert scores[key] == pytest.approx(best, abs=TOL)
            assert row["score"] == pytest.approx(best, abs=TOL)
        else:
            assert row["score"] == pytest.approx(ref["null_score"], abs=TOL)
        if exact or abs(ref["margin"]) > TOL:
            assert row["confidence"] == pytest.approx(ref["confidence"], abs=TOL)
        assert 0.0 <= row["confidence"] <= 1.0
        if ref["runner_up"] is None:
            assert row["runner_up_score"] is None
        else:
            assert row["runner_up_score"] == pytest.approx(ref["runner_up"], abs=TOL)
        if o["top_k"] > 1:
            got = row["answers"]
            assert [a["score"] for a in got] == pytest.approx([a["score"] for a in ref["top"]], abs=TOL)
            assert [a["confidence"] for a in got] == pytest.approx([a["confidence"] for a in ref["top"]], abs=TOL)
            if exact:
                assert [(a["text"], a["start"], a["end"]) for a in got] == \
                       [(a["text"], a["start"], a["end"]) for a in ref["top"]]
            for a in got:
                assert p[a["start"] : a["end"]] == a["text"]
                assert scores[(a["start"], a["end"])] == pytest.approx(a["score"], abs=TOL)
            assert len({(a["start"], a["end"]) for a in got}) == len(got)
            # every candidate's share, the null candidate's included, sums to at most 1
            null_share = (math.exp(ref["null_score"] - np.logaddexp(ref["span_norm"], ref["null_score"]))
                          if o["allow_null"] else 0.0)
            if row["answer"] is None and o["allow_null"]:
                assert row["confidence"] == pytest.approx(null_share, abs=TOL)
            assert sum(a["confidence"] for a in got) + null_share <= 1.0 + TOL


rows_of = st.integers(1, 6).flatmap(lambda n: st.tuples(st.lists(texts(), min_size=n, max_size=n),
                                                        st.lists(texts(max_pieces=12), min_size=n, max_size=n)))


@settings(deadline=None)
@given(data=rows_of, o=options())
def test_table_model_answers_exactly_as_the_reference(models, data, o):
    check(models["table"], data[0], data[1], o, exact=True)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@settings(deadline=None)
@given(data=rows_of, o=options())
def test_random_models_answer_as_the_reference(models, family, data, o):
    check(models[family], data[0], data[1], o, exact=False)


ONE_TOKEN_WORDS = ["alpha", "omega", "beta", "gamma", "delta", "the", "normans", "paris"]


@settings(deadline=None)
@given(question=texts(max_pieces=8), extra=st.integers(-2, 2), max_seq_len=st.integers(24, 64),
       words=st.lists(st.sampled_from(ONE_TOKEN_WORDS), min_size=80, max_size=80), o=options())
def test_passages_of_exactly_one_chunk_and_one_token_more(models, question, extra, max_seq_len, words, o):
    """Passages sized to the chunk budget: one chunk, or two for one token more."""
    tok = models["table"].tokenizer
    assume(question is not None and question.strip())
    n_q = len(tok(question, add_special_tokens=False)["input_ids"])
    budget = max_seq_len - 3 - n_q
    assume(0 < budget + extra <= 80 and budget > 1)
    passage = " ".join(words[: budget + extra])
    assert len(tok(passage, add_special_tokens=False)["input_ids"]) == budget + extra
    o = {**o, "max_seq_len": max_seq_len, "doc_stride": min(o["doc_stride"], budget - 1), "truncate_question": False}
    o.pop("limit", None)
    check(models["table"], [passage, "paris"], [question, question], o, exact=True)
