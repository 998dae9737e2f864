"""Batching: token budgets, padding on either side, and batched answers equal one-at-a-time answers."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import SAMPLE
from pipeline.stages.batch import collate, plan_batches
from pipeline.stages.chunk import Chunker
from pipeline.config import RunConfig
from pipeline.engines.local import run
from pipeline.stages.spans import search_spans


def test_plan_batches_respects_both_limits_and_takes_every_chunk_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 384, size=1000)
    batches = plan_batches(lengths, batch_size=32, max_batch_tokens=4096)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    for b in batches:
        assert len(b) <= 32
        assert len(b) * lengths[b].max() <= 4096 or len(b) == 1
    # sorted by length: little padding
    real = sum(lengths[b].sum() for b in batches)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert real / padded > 0.95
    # few chunks of very different lengths: a batch stops before padding short chunks to long ones
    few = np.array([384] * 10 + [100] * 30)
    cut = plan_batches(few, batch_size=64, max_batch_tokens=64 * 384)
    assert [len(b) for b in cut] == [16, 24]  # a quarter of 64 at least, then the short ones apart
    assert [len(b) for b in plan_batches(few, 256, 10**9, max_waste=1.0)] == [40]
    # a chunk longer than the budget still gets a batch of its own
    assert [len(b) for b in plan_batches(np.array([100, 10]), 8, 50)] == [1, 1]


@pytest.mark.parametrize("pad_left", [False, True])
def test_padding_side_changes_no_span(bert_tokenizer, pad_left):
    cs = Chunker(bert_tokenizer, 64, 16)(["the normans " * 30, "paris is in france"], ["who?", "where is paris?"])
    index = np.arange(len(cs))
    hb = collate(cs, index, ("input_ids", "token_type_ids", "attention_mask"), 0, pad_left=pad_left, pad_multiple=8)
    ids = hb.inputs["input_ids"]
    assert ids.shape[1] % 8 == 0
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
    # logits tied to token ids, so both paddings must choose the same tokens
    start, end = start[0][ids % start.shape[1]], end[0][ids % end.shape[1]]
    out = search_spans(start, end, hb.rules, 30)
    for b, c in enumerate(index):
        s = int(out.start[b, 0]) - int(hb.ctx_start[b])
        assert 0 <= s < cs.ctx_len[c]
        assert ids[b, int(hb.rules.cls_pos[b])] == bert_tokenizer.cls_token_id
        mask = hb.inputs.get("attention_mask", torch.ones_like(ids))[b]
        assert int(mask.sum()) == cs.lengths[c]
        assert ids[b][mask.bool()].tolist() == cs.chunk_ids(c)[0].tolist()


def test_batched_answers_equal_one_chunk_at_a_time(tmp_path, bert_dir):
    src = pq.read_table(SAMPLE).slice(18, 20)  # article and paragraph rows
    path = tmp_path / "in.parquet"
    pq.write_table(src, path)
    tables = {}
    for bs in (1, 16):
        config = RunConfig(inputs=(str(path),), output=str(tmp_path / f"out{bs}.parquet"), model=bert_dir,
                           batch_size=bs, top_k=2, quiet=True, max_seq_len=128, doc_stride=32)
        run(config)
        tables[bs] = pq.read_table(config.output).to_pylist()
    for one, many in zip(tables[1], tables[16]):
        assert one["chunks"] == many["chunks"]
        assert one["score"] == pytest.approx(many["score"], abs=1e-4)
        assert one["confidence"] == pytest.approx(many["confidence"], rel=1e-3)
        margin = one["answers"][0]["score"] - one["answers"][1]["score"]
        if margin > 1e-4:  # random weights make near-ties; only those may flip with float rounding
            assert (one["answer_start"], one["answer_end"]) == (many["answer_start"], many["answer_end"])


def test_parallel_cpu_workers_give_the_same_answers(tmp_path, bert_dir):
    src = pq.read_table(SAMPLE).slice(0, 16)
    path = tmp_path / "in.parquet"
    pq.write_table(src, path)
    threads = torch.get_num_threads()
    tables = {}
    for workers in (1, 3):
        config = RunConfig(inputs=(str(path),), output=str(tmp_path / f"out{workers}.parquet"), model=bert_dir,
                           cpu_workers=workers, batch_size=3, top_k=2, quiet=True, max_seq_len=96, doc_stride=32)
        summary = run(config)
        assert summary.chunks > 16
        tables[workers] = pq.read_table(config.output).to_pylist()
    assert torch.get_num_threads() == threads  # restored after the run
    for one, many in zip(tables[1], tables[3]):
        assert one["id"] == many["id"]
        assert one["score"] == pytest.approx(many["score"], abs=1e-4)
        if one["answers"][0]["score"] - one["answers"][1]["score"] > 1e-4:
            assert (one["answer_start"], one["answer_end"]) == (many["answer_start"], many["answer_end"])


def test_batches_without_padding_carry_no_mask(bert_tokenizer):
    cs = Chunker(bert_tokenizer, 32, 8)(["the normans " * 40], ["who?"])
    names = ("input_ids", "token_type_ids", "attention_mask")
    full = np.flatnonzero(cs.lengths == 32)
    assert len(full) >= 2
    assert "attention_mask" not in collate(cs, full, names, 0).inputs
    assert "attention_mask" in collate(cs, np.arange(len(cs)), names, 0).inputs  # the last chunk is short
    assert "attention_mask" in collate(cs, full, names, 0, pad_multiple=48).inputs
