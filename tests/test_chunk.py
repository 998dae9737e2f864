"""Chunking: tokenize-once assembly equals the tokenizer's own pair encoding, and covers every token."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.stages.chunk import Chunker, chunk_windows, row_error
from tiny_models import FAMILIES, bert_tokenizer_object, save_tokenizer

PASSAGES = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy. " * 30,
    "Café résumé naïve — déjà vu. 東京は日本の首都です。Emoji 😀 🚀 👩‍💻 here.\r\nNext line e\u0301 a\u0308. " * 12,
    "Short passage.",
    "alpha omega " * 200,
]
QUESTIONS = ["Who were the Normans?", "What is the capital?", "alpha?", "Where is 東京 and 😀 located in the text?"]


def reference(tokenizer, question, passage, max_len, stride):
    """What the tokenizer itself produces for the pair, chunk by chunk."""
    enc = tokenizer(question, passage, truncation="only_second", max_length=max_len, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, return_token_type_ids=True)
    out = []
    for i in range(len(enc["input_ids"])):
        seq = enc.sequence_ids(i)
        ctx = [j for j, s in enumerate(seq) if s == 1]
        out.append((enc["input_ids"][i], enc["token_type_ids"][i], ctx,
                    [tuple(enc["offset_mapping"][i][j]) for j in ctx]))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_len,stride", [(384, 128), (64, 16), (48, 0), (32, 20)])
def test_chunks_equal_pair_encoding(checkpoints, family, max_len, stride):
    tok = AutoTokenizer.from_pretrained(checkpoints[family])
    chunker = Chunker(tok, max_len, stride)
    passages = [p for p in PASSAGES for _ in QUESTIONS]
    questions = [q for _ in PASSAGES for q in QUESTIONS]
    cs = chunker(passages, questions)
    assert sum(e is None for e in cs.errors) >= len(passages) // 2
    for r, (p, q) in enumerate(zip(passages, questions)):
        if cs.errors[r] is not None:  # the question leaves too little room: the tokenizer refuses too
            assert cs.errors[r].startswith("question too long")
            # the tokenizer refuses the pair too: an error, or a Rust panic (a BaseException)
            with pytest.raises(BaseException, match="(?i)truncat|stride"):
                reference(tok, q, p, max_len, stride)
            continue
        ref = reference(tok, q, p, max_len, stride)
        mine = np.flatnonzero(cs.row == r)
        assert len(mine) == len(ref) == cs.chunk_count[r]
        for c, (ids, types, ctx, offs) in zip(mine, ref):
            mine_ids, mine_types = cs.chunk_ids(c)
            assert mine_ids.tolist() == ids
            assert mine_types.tolist() == types
            assert list(range(cs.ctx_start[c], cs.ctx_start[c] + cs.ctx_len[c])) == ctx
            tok_idx = cs.token_base[r] + cs.token_start[c] + np.arange(cs.ctx_len[c])
            assert [tuple(o) for o in cs.offsets[tok_idx].tolist()] == offs


def test_windows_cover_every_token_and_overlap_by_stride():
    for n in [0, 1, 5, 100, 245, 246, 1000, 12345]:
        for budget, stride in [(245, 128), (10, 3), (7, 0), (2, 1)]:
            w = chunk_windows(n, budget, stride)
            covered = set()
            for a, b in w:
                assert 0 <= a <= b <= n and b - a <= budget
                covered.update(range(a, b))
            assert covered == set(range(n))
            assert w[-1][1] == n
            for (a0, b0), (a1, b1) in zip(w, w[1:]):
                assert b0 - a1 == stride  # consecutive chunks share exactly `stride` tokens
                assert b0 == a0 + budget  # only the last chunk may be short


def test_offsets_map_back_to_characters(bert_tokenizer):
    passage = ("Accents: café, naïve, Ångström. CJK: 東京は日本の首都です。 Emoji: 😀🚀 👩‍💻. "
               "Combining: e\u0301 o\u0302.\r\nCRLF line.\r\n") * 20
    cs = Chunker(bert_tokenizer, 64, 16)([passage], ["what?"])
    offs = cs.offsets
    assert len(offs) > 100
    assert (offs[:, 0] <= offs[:, 1]).all() and (offs[:, 1] <= len(passage)).all()
    assert (np.diff(offs[:, 0]) >= 0).all()  # in passage order
    covered = set()
    for s, e in offs.tolist():
        covered.update(range(s, e))
    for i, ch in enumerate(passage):  # every letter and digit lies inside some token
        if ch.isalnum():
            assert i in covered, (i, ch)
    for s, e in offs.tolist():  # and a lower-cased token is the lower-cased text it came from
        piece = passage[s:e]
        assert piece.strip() == piece and piece


def test_rows_without_text_get_reasons_and_no_chunks(bert_tokenizer):
    cs = Chunker(bert_tokenizer, 64, 16)(["ok passage", None, "   ", "", "fine"], ["q?", "q?", "q?", "q?", None])
    assert cs.errors == [None, "passage is null", "passage is only whitespace", "passage is empty", "question is null"]
    assert cs.chunk_count.tolist() == [1, 0, 0, 0, 0]
    assert row_error("p", "\t\n") == "question is only whitespace"


def test_question_too_long_is_a_row_error(bert_tokenizer):
    long_q = "who were the normans " * 12  # 48 tokens: 64 - 3 special - 48 = 13 passage tokens, below the stride
    assert len(bert_tokenizer(long_q, add_special_tokens=False)["input_ids"]) == 48
    cs = Chunker(bert_tokenizer, 64, 16)(["the normans " * 100, "short"], [long_q, long_q])
    assert cs.errors[0] == ("question too long: 48 tokens leave 13 passage tokens per chunk, which must exceed "
                            "--doc-stride 16; shorten the question, raise --max-seq-len, lower --doc-stride, "
                            "or pass --truncate-question")
    assert cs.chunk_count[0] == 0
    # a passage that still fits beside the question in one chunk is answered
    assert cs.errors[1] is None and cs.chunk_count[1] == 1


def test_each_distinct_text_is_tokenized_once(bert_tokenizer, monkeypatch):
    chunker = Chunker(bert_tokenizer, 64, 16)
    seen = []
    real = chunker._encode
    monkeypatch.setattr(chunker, "_encode", lambda texts, with_offsets: seen.append(list(texts)) or real(texts, with_offsets))
    chunker(["p one", "p one", "p two", "p one"], ["q a", "q b", "q a", "q a"])
    assert sorted(map(len, seen)) == [2, 2]


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_truncated_questions_equal_pair_encoding_of_the_cut_question(checkpoints, family):
    tok = AutoTokenizer.from_pretrained(checkpoints[family])
    question = "who were the normans and where did they come from " * 6
    passage = PASSAGES[0]
    cs = Chunker(tok, 64, 16, max_question_len=12)([passage, passage], [question, "who?"])
    assert cs.errors == [None, None]
    q_enc = tok(question, add_special_tokens=False, return_offsets_mapping=True)
    assert len(q_enc["input_ids"]) > 12
    cut = question[: q_enc["offset_mapping"][11][1]]  # the text of its first 12 tokens
    ref = reference(tok, cut, passage, 64, 16)
    mine = np.flatnonzero(cs.row == 0)
    assert len(mine) == len(ref)
    for c, (ids, types, ctx, offs) in zip(mine, ref):
        assert [x.tolist() for x in cs.chunk_ids(c)] == [ids, types]
        assert list(range(cs.ctx_start[c], cs.ctx_start[c] + cs.ctx_len[c])) == ctx
    # without the cut the same question is an error for this row only
    plain = Chunker(tok, 64, 16)([passage, passage], [question, "who?"])
    assert plain.errors[0].startswith("question too long") and plain.errors[1] is None


def test_left_padding_tokenizers_put_the_passage_first(tmp_path):
    """Context-first models: (passage, question) pairs, the passage truncated, as the old pipeline did."""
    save_tokenizer(bert_tokenizer_object(), str(tmp_path), "bert", padding_side="left")
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.padding_side == "left"
    passage, question = PASSAGES[0], QUESTIONS[0]
    cs = Chunker(tok, 64, 16)([passage], [question])
    enc = tok(passage, question, truncation="only_first", max_length=64, stride=16,
              return_overflowing_tokens=True, return_offsets_mapping=True, return_token_type_ids=True)
    assert len(cs) == len(enc["input_ids"]) > 3
    for c in range(len(cs)):
        assert [x.tolist() for x in cs.chunk_ids(c)] == [enc["input_ids"][c], enc["token_type_ids"][c]]
        ctx = [j for j, s in enumerate(enc.sequence_ids(c)) if s == 0]
        assert list(range(cs.ctx_start[c], cs.ctx_start[c] + cs.ctx_len[c])) == ctx
        offs = cs.offsets[cs.token_base[0] + cs.token_start[c] + np.arange(cs.ctx_len[c])]
        assert [tuple(o) for o in offs.tolist()] == [tuple(enc["offset_mapping"][c][j]) for j in ctx]


def test_a_tokenizer_that_cannot_encode_is_refused_before_work_and_named_mid_run(bert_dir, tmp_path):
    """The lifecycle machine changed a checkpoint's tokenizer.json twice and the run died with a
    traceback (exit 1, "WordPiece error: Missing [UNK] token"). The CLI refuses such a model before
    any work (exit 2, naming --model); a tokenizer that fails mid-run is a model failure (exit 3)."""
    import json
    import shutil

    from tokenizers import models

    from conftest import run_cli, write_parquet
    from pipeline.errors import RuntimeFailure

    broken = tmp_path / "model"
    shutil.copytree(bert_dir, broken)
    spec = json.loads((broken / "tokenizer.json").read_text())
    spec["model"]["vocab"]["[UNK-gone]"] = spec["model"]["vocab"].pop("[UNK]")
    (broken / "tokenizer.json").write_text(json.dumps(spec))
    data = write_parquet(tmp_path / "in.parquet", {"passage": ["the river runs north"], "question": ["where?"]})
    r = run_cli("run", data, "-o", tmp_path / "out.parquet", "--model", broken)
    assert r.returncode == 2, r.stderr
    assert f"--model {broken}: the model's tokenizer cannot encode the text" in r.stderr, r.stderr
    assert "Missing [UNK] token" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "out.parquet.partial").exists()

    chunker = Chunker(AutoTokenizer.from_pretrained(bert_dir), 32, 8)
    vocab = dict(chunker.backend.get_vocab())
    vocab["[UNK-gone]"] = vocab.pop("[UNK]")
    chunker.backend.model = models.WordPiece(vocab, unk_token="[UNK]")  # broken after the probe
    with pytest.raises(RuntimeFailure, match="tokenizer cannot encode the text"):
        chunker(["a passage with \u2603 in it"], ["what?"])
