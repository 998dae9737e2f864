"""The whole local engine with a fake model whose logits peak where the test plants them.

The fake model is a real torch module fed by the real tokenizer, chunker, batcher, span
search, merge and Parquet writer; only its logits are chosen: high start logit on the
token "alpha", high end logit on "omega", and `cls_logit` at the CLS token.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.stages.chunk import Chunker, chunk_windows
from pipeline.config import RunConfig
from pipeline.engines.local import run
from pipeline.engines.report import bottleneck
from pipeline.models.checkpoint import LoadedModel
from conftest import write_parquet

FILLER = "the normans were descended from norse raiders and pirates from denmark iceland and norway "


class PlantedModel(torch.nn.Module):
    def __init__(self, start_id: int, end_id: int, cls_id: int, cls_logit: float = -100.0,
                 oom_above: int | None = None):
        super().__init__()
        self.start_id, self.end_id, self.cls_id = start_id, end_id, cls_id
        self.cls_logit = cls_logit
        self.oom_above = oom_above  # raise OutOfMemoryError for larger batches (simulated OOM)
        self.batch_sizes: list[int] = []
        self.failed: list[int] = []  # sizes that ran out of memory

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if self.oom_above is not None and input_ids.shape[0] > self.oom_above:
            self.failed.append(input_ids.shape[0])
            raise torch.OutOfMemoryError("simulated CUDA out of memory")
        self.batch_sizes.append(input_ids.shape[0])
        base = torch.zeros(input_ids.shape)
        start = base + 10.0 * (input_ids == self.start_id)
        end = base + 10.0 * (input_ids == self.end_id)
        cls = input_ids == self.cls_id
        start, end = start.masked_fill(cls, self.cls_logit), end.masked_fill(cls, self.cls_logit)
        return SimpleNamespace(start_logits=start, end_logits=end)


def planted(tokenizer, **kw) -> LoadedModel:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("alpha", "omega")]
    assert tokenizer.unk_token_id not in ids, "the fixture tokenizer must know both words"
    model = PlantedModel(ids[0], ids[1], tokenizer.cls_token_id, **kw)
    return LoadedModel(model=model, tokenizer=tokenizer, device=torch.device("cpu"), dtype=torch.float32,
                       input_names=("input_ids", "attention_mask"), max_positions=512,
                       model_id="planted", revision=None)


def answer(tmp_path, tokenizer, passages, questions, loaded=None, **options):
    src = write_parquet(tmp_path / "in.parquet", {"passage": passages, "question": questions})
    config = RunConfig(inputs=(src,), output=str(tmp_path / "out.parquet"), overwrite=True,
                       quiet=True, model="planted", **options)
    loaded = loaded or planted(tokenizer)
    summary = run(config, loaded=loaded)
    return pq.read_table(config.output).to_pylist(), summary, loaded


def passage_with_answer_at(tokenizer, n_words: int, at_word: int, answer="alpha beta gamma omega") -> tuple[str, int]:
    words = (FILLER.split() * (n_words // 10 + 1))[:n_words]
    before = " ".join(words[:at_word])
    text = before + (" " if before else "") + answer + " " + " ".join(words[at_word:])
    return text, len(before) + (1 if before else 0)


@pytest.mark.parametrize("where", ["first", "last", "overlap"])
def test_planted_answer_is_found_in_any_chunk(tmp_path, bert_tokenizer, where):
    q = "who raided?"
    n = 2000
    probe = Chunker(bert_tokenizer, 128, 32)
    # find a word position that lands in the wanted place of the chunk windows
    words = {"first": 3, "last": n - 2}
    if where == "overlap":
        text, _ = passage_with_answer_at(bert_tokenizer, n, 0)
        cs = probe([text], [q])
        budget = 128 - 3 - len(bert_tokenizer(q, add_special_tokens=False)["input_ids"])
        w = chunk_windows(len(cs.offsets), budget, 32)
        overlap_char = cs.offsets[w[1][0] + 5, 0]  # 5 tokens into chunk 1, inside chunk 0 too
        words["overlap"] = len(text[:overlap_char].split())
    text, start = passage_with_answer_at(bert_tokenizer, n, words[where])
    rows, summary, _ = answer(tmp_path, bert_tokenizer, [text], [q], max_seq_len=128, doc_stride=32, top_k=3)
    row = rows[0]
    assert row["chunks"] > 10
    assert row["answer"] == "alpha beta gamma omega"
    assert (row["answer_start"], row["answer_end"]) == (start, start + len(row["answer"]))
    assert text[row["answer_start"]:row["answer_end"]] == row["answer"]
    assert row["score"] == pytest.approx(20.0)
    # top-k: the planted span is counted once even where two chunks see it
    spans = [(a["start"], a["end"]) for a in row["answers"]]
    assert len(spans) == len(set(spans)) == 3
    assert spans[0] == (row["answer_start"], row["answer_end"])


def test_planted_answer_in_a_100k_token_passage(tmp_path, bert_tokenizer):
    n = 100_000  # one token per filler word with this tokenizer
    text, start = passage_with_answer_at(bert_tokenizer, n, n - 50)
    rows, summary, _ = answer(tmp_path, bert_tokenizer, [text, text[:2000]], ["who?", "who?"])
    n_tokens = len(Chunker(bert_tokenizer, 384, 128)([text], ["who?"]).offsets)
    assert n_tokens >= 100_000
    assert rows[0]["answer_start"] == start and rows[0]["answer"] == "alpha beta gamma omega"
    assert rows[0]["chunks"] > 300
    assert rows[1]["chunks"] == 1


def test_null_answers_with_allow_null(tmp_path, bert_tokenizer):
    text, _ = passage_with_answer_at(bert_tokenizer, 300, 100)
    loaded = planted(bert_tokenizer, cls_logit=15.0)  # null score 30 beats the span's 20
    rows, summary, _ = answer(tmp_path, bert_tokenizer, [text], ["q?"], loaded=loaded, allow_null=True)
    assert rows[0]["answer"] is None and rows[0]["answer_start"] is None and rows[0]["error"] is None
    assert rows[0]["score"] == pytest.approx(30.0) and rows[0]["null_score"] == pytest.approx(30.0)
    assert 0.5 < rows[0]["confidence"] <= 1.0
    assert summary.null == 1 and summary.answered == 0
    # a threshold above the margin (10) keeps the span
    rows, _, _ = answer(tmp_path, bert_tokenizer, [text], ["q?"], loaded=loaded, allow_null=True,
                        null_threshold=10.5)
    assert rows[0]["answer"] == "alpha beta gamma omega"
    # without --allow-null the best span is always given
    rows, _, _ = answer(tmp_path, bert_tokenizer, [text], ["q?"], loaded=loaded)
    assert rows[0]["answer"] == "alpha beta gamma omega"


def test_confidence_is_a_softmax_over_all_spans(tmp_path, bert_tokenizer):
    text = "alpha omega"  # spans: alpha(10), alpha..omega(20), omega(10)
    rows, _, _ = answer(tmp_path, bert_tokenizer, [text], ["q?"])
    expected = np.exp(20) / (np.exp(20) + 2 * np.exp(10))
    assert rows[0]["confidence"] == pytest.approx(expected, rel=1e-5)


def test_runner_up_and_log_norm_are_kept_for_null_answers_too(tmp_path, bert_tokenizer):
    """What a calibration reads: the best distinct runner-up span and the spans' normaliser."""
    text = "alpha omega"  # spans: alpha..omega (20), alpha (10), omega (10)
    loaded = planted(bert_tokenizer, cls_logit=15.0)  # null score 30
    for allow_null in (False, True):
        rows, _, _ = answer(tmp_path, bert_tokenizer, [text], ["q?"], loaded=loaded, allow_null=allow_null)
        row = rows[0]
        assert (row["answer"] is None) == allow_null
        assert row["runner_up_score"] == pytest.approx(10.0)
        assert row["log_norm"] == pytest.approx(np.log(np.exp(20) + 2 * np.exp(10)), rel=1e-6)
        norm = np.logaddexp(row["log_norm"], 30.0) if allow_null else row["log_norm"]
        assert row["confidence"] == pytest.approx(np.exp(row["score"] - norm), rel=1e-5)
    rows, _, _ = answer(tmp_path, bert_tokenizer, ["omega"], ["q?"])  # one candidate span only
    assert rows[0]["runner_up_score"] is None and rows[0]["log_norm"] == pytest.approx(10.0)


def test_out_of_memory_halves_the_batch_and_loses_no_row(tmp_path, bert_tokenizer):
    texts = [passage_with_answer_at(bert_tokenizer, 400, i * 7)[0] for i in range(12)]
    loaded = planted(bert_tokenizer, oom_above=3)
    rows, summary, _ = answer(tmp_path, bert_tokenizer, texts, ["q?"] * 12, loaded=loaded, batch_size=16,
                              max_seq_len=96, doc_stride=16)
    assert summary.oom_splits > 0
    assert max(loaded.model.batch_sizes) <= 3
    assert sum(loaded.model.batch_sizes) == summary.chunks  # every chunk exactly once
    for text, row in zip(texts, rows):
        assert text[row["answer_start"]:row["answer_end"]] == "alpha beta gamma omega"
    # the size that failed is remembered: later batches as large are split before they are tried,
    # so the model runs out of memory once per halving, not once per batch (issue 27 item 9)
    # (16 -> 8 -> 4 -> 2, then narrower batches are tried once more: each batch failing costs 14 here)
    assert len(loaded.model.failed) == summary.oom_splits <= 6


def test_rows_stay_in_input_order_across_windows(tmp_path, bert_tokenizer):
    # varied lengths make the length-sorted batches mix rows of several windows' worth
    texts = [passage_with_answer_at(bert_tokenizer, 20 + 37 * i % 400, 5)[0] for i in range(50)]
    questions = [f"question {i}?" for i in range(50)]
    rows, summary, _ = answer(tmp_path, bert_tokenizer, texts, questions, rows_per_window=7, batch_size=5)
    assert [r["question"] for r in rows] == questions
    assert [r["row"] for r in rows] == list(range(50))
    assert all(r["answer"] == "alpha beta gamma omega" for r in rows)


@pytest.mark.parametrize("stages,expected", [
    ({"wait_for_input": 0.1, "infer_launch": 1.0, "infer_wait": 8.0, "merge": 0.2, "write": 0.3,
      "tokenize": 3.0, "read": 0.1, "batch": 0.2}, "model"),  # the device loop hardly waited
    ({"wait_for_input": 5.0, "infer_launch": 1.0, "infer_wait": 2.0, "merge": 0.2, "write": 0.3,
      "tokenize": 7.0, "read": 0.5, "batch": 0.4}, "tokenize"),  # it waited for batches: the producer
    ({"wait_for_input": 5.0, "infer_launch": 1.0, "infer_wait": 2.0, "read": 7.5, "tokenize": 1.0}, "read"),
    ({"wait_for_input": 0.0, "infer_launch": 0.5, "infer_wait": 0.5, "wait_for_writer": 2.5, "merge": 0.1,
      "write": 3.0}, "write"),  # the writer thread held the loop up
    ({"wait_for_input": 0.0, "infer_launch": 4.5, "infer_wait": 0.5, "wait_for_writer": 0.1, "merge": 0.1,
      "write": 3.0}, "model"),  # writing took time, beside the model: it set no pace
    ({}, ""),
])
def test_the_bottleneck_is_the_stage_that_set_the_pace(stages, expected):
    assert bottleneck(stages) == expected


def test_confidence_does_not_depend_on_whether_the_answer_sits_in_an_overlap(tmp_path, bert_tokenizer):
    """Each distinct span counts once in the softmax, however many chunks see it."""
    q = "who raided?"
    n = 600
    text, _ = passage_with_answer_at(bert_tokenizer, n, 0)
    cs = Chunker(bert_tokenizer, 128, 32)([text], [q])
    budget = 128 - 3 - len(bert_tokenizer(q, add_special_tokens=False)["input_ids"])
    w = chunk_windows(len(cs.offsets), budget, 32)
    assert w[1][0] + 5 < w[0][1]  # 5 tokens into chunk 1 lie inside chunk 0 too
    in_overlap = len(text[:cs.offsets[w[1][0] + 5, 0]].split())
    outside = len(text[:cs.offsets[w[1][0] + 60, 0]].split())  # chunk 1 only
    confidences = {}
    for where, word in (("overlap", in_overlap), ("outside", outside)):
        passage, start = passage_with_answer_at(bert_tokenizer, n, word)
        rows, _, _ = answer(tmp_path, bert_tokenizer, [passage], [q], max_seq_len=128, doc_stride=32)
        assert rows[0]["answer_start"] == start
        confidences[where] = rows[0]["confidence"]
    assert confidences["outside"] > 0.9  # dominant: 20 against ~thousands of spans at 0
    assert abs(confidences["overlap"] - confidences["outside"]) <= 0.01


def test_top_k_confidences_and_null_sum_to_at_most_one(tmp_path, bert_tokenizer):
    text, _ = passage_with_answer_at(bert_tokenizer, 300, 40)
    loaded = planted(bert_tokenizer, cls_logit=9.0)
    rows, _, _ = answer(tmp_path, bert_tokenizer, [text], ["q?"], loaded=loaded, allow_null=True, top_k=5,
                        max_seq_len=64, doc_stride=24)
    row = rows[0]
    null_share = np.exp(row["null_score"] - row["score"]) * row["confidence"]
    assert len(row["answers"]) == 5
    assert 0.9 < sum(a["confidence"] for a in row["answers"]) + null_share <= 1.0 + 1e-6


class AllocatingOOMModel(PlantedModel):
    """Allocates activations, then runs out of memory for larger batches, as a real forward does."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.alive_at_retry: list[bool] = []
        self._refs: list = []

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        import weakref

        # at every call, are the activations of earlier failed forwards still held?
        self.alive_at_retry.append(any(ref() is not None for ref in self._refs))
        if input_ids.shape[0] > self.oom_above:
            activations = torch.empty(input_ids.shape[0], 1024)
            self._refs.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (after allocating activations)")
        return super().forward(input_ids, attention_mask, token_type_ids)


def test_out_of_memory_retry_runs_after_the_failed_forward_is_freed(tmp_path, bert_tokenizer):
    """Regression: retrying inside `except` kept the failed forward's tensors alive (its traceback)."""
    texts = [passage_with_answer_at(bert_tokenizer, 300, i * 5)[0] for i in range(6)]
    base = planted(bert_tokenizer)
    model = AllocatingOOMModel(base.model.start_id, base.model.end_id, base.model.cls_id, oom_above=2)
    loaded = planted(bert_tokenizer)
    loaded.model = model
    rows, summary, _ = answer(tmp_path, bert_tokenizer, texts, ["q?"] * 6, loaded=loaded, batch_size=8,
                              max_seq_len=96, doc_stride=16)
    assert summary.oom_splits > 0 and len(model.alive_at_retry) > summary.oom_splits
    assert not any(model.alive_at_retry)
    assert all(r["answer"] == "alpha beta gamma omega" for r in rows)


class PoisonedModel(PlantedModel):
    """A non-finite logit (float16 overflow, a broken model) on every `poison_id` token."""

    def __init__(self, *args, poison_id: int, value: float, **kw):
        super().__init__(*args, **kw)
        self.poison_id, self.value = poison_id, value

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        out = super().forward(input_ids, attention_mask, token_type_ids)
        out.start_logits = out.start_logits.masked_fill(input_ids == self.poison_id, self.value)
        return out


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_logit_gives_the_row_an_error_never_an_answer(tmp_path, bert_tokenizer, value):
    """Issue 27: +inf sorted first and ended the row with 'no valid answer span'; NaN made log_norm
    NaN and the confidence 1.0. Now the row says why it has no answer; other rows are untouched."""
    poison = bert_tokenizer.convert_tokens_to_ids("pirates")
    assert poison != bert_tokenizer.unk_token_id
    clean = "alpha beta gamma omega the normans were descended from norse raiders"
    words = [w for w in FILLER.split() if w != "pirates"] * 20
    poisoned = " ".join(words[:5] + ["pirates"] + words[5:150] + ["alpha beta gamma omega"] + words[150:200])
    base = planted(bert_tokenizer)
    loaded = planted(bert_tokenizer)
    loaded.model = PoisonedModel(base.model.start_id, base.model.end_id, base.model.cls_id, poison_id=poison,
                                 value=value)
    rows, summary, _ = answer(tmp_path, bert_tokenizer, [clean, poisoned, clean], ["q?"] * 3, loaded=loaded,
                              allow_null=True, max_seq_len=64, doc_stride=24)
    assert [r["answer"] for r in rows] == ["alpha beta gamma omega", None, "alpha beta gamma omega"]
    assert rows[1]["error"].startswith("the model's logits were not finite (inf or NaN) in 1 of this row's chunks")
    assert "--dtype float32" in rows[1]["error"]
    assert rows[1]["confidence"] is None and rows[1]["score"] is None
    assert all(r["confidence"] is None or math.isfinite(r["confidence"]) for r in rows)
    assert summary.errors == 1


def test_the_summary_line_shows_slow_rates_and_the_loop_reports_chunks_inside_a_window(tmp_path, bert_tokenizer,
                                                                                        monkeypatch):
    """Issue 22: a 100,000-word passage showed no progress for a minute, then '0.0 rows/s'."""
    from pipeline.engines.report import RunSummary, rate

    assert rate(0.0172) == "0.017" and rate(12.34) == "12.3" and rate(0.0) == "0.0"
    line = RunSummary(output="o", rows=1, rows_this_run=1, elapsed_s=58.0, rows_per_s=0.0172,
                      chunks_per_s=31.0).line()
    assert "0.017 rows/s" in line
    seen: list[int] = []
    text, _ = passage_with_answer_at(bert_tokenizer, 3000, 2000)
    src = write_parquet(tmp_path / "in.parquet", {"passage": [text], "question": ["q?"]})
    config = RunConfig(inputs=(src,), output=str(tmp_path / "o.parquet"), quiet=True, model="planted",
                       max_seq_len=64, doc_stride=16, batch_size=4)
    from pipeline.engines import loop as loop_module

    real = loop_module.answer_ranges

    def spy(*a, **kw):  # the local engine's progress callback, per batch of one long passage
        inner = kw["on_batch"]
        kw["on_batch"] = lambda n: (seen.append(n), inner(n))
        return real(*a, **kw)

    import pipeline.engines.local as local

    monkeypatch.setattr(local, "answer_ranges", spy)
    run(config, loaded=planted(bert_tokenizer))
    assert len(seen) > 10 and sum(seen) == pq.read_table(config.output)["chunks"][0].as_py()
