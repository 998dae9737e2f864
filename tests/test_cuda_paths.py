"""The CUDA path's plain-code parts, checked on the CPU (issue 27): device names resolved before
workers start, batches never padded past the position table, the out-of-memory split on every
engine. What only a GPU can show is in benchmarks/gpu_check.sh."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import assert_same_answers, run_cli, write_parquet
from pipeline.config import RunConfig
from pipeline.engines.chain import Stages
from pipeline.errors import UsageError
from pipeline.models.checkpoint import load_model, resolve_devices
from pipeline.stages.read import plan_inputs, read_windows
from pipeline.stages.shape import PerPair
from tiny_models import CORPUS, make_checkpoint


@pytest.fixture
def two_gpus(monkeypatch):
    """No GPU here: CUDA pretends to hold two, current device 0 (device names are plain code)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_device_names_are_indexed_before_any_worker_starts(two_gpus):
    """`--devices cuda,cuda` crashed every worker: torch.cuda.set_device refuses an unindexed device."""
    assert resolve_devices(("cuda", "cuda")) == ("cuda:0", "cuda:0")
    assert resolve_devices(("cuda:1", "cuda")) == ("cuda:1", "cuda:0")
    assert resolve_devices(("auto",)) == ("cuda:0",)
    assert resolve_devices(("cpu", "cpu")) == ("cpu", "cpu")
    for name in resolve_devices(("cuda", "cuda:1")):
        assert torch.device(name).index is not None  # what set_device needs
    with pytest.raises(UsageError, match=r"--device cuda:2: only 2 CUDA device\(s\) visible"):
        resolve_devices(("cuda:0", "cuda:2"))


def test_cuda_padding_stops_at_the_position_table(tmp_path):
    """A model whose position table is not a multiple of 8 (here 100): batches padded to a multiple
    of 8, as on CUDA, must not pass it; the answers equal unpadded batches'."""
    model_dir = make_checkpoint(str(tmp_path / "short"), "bert", max_position_embeddings=100)
    src = write_parquet(tmp_path / "in.parquet", {"passage": [" ".join(CORPUS * 3)] * 3, "question": ["who?"] * 3})
    config = RunConfig(inputs=(src,), model=model_dir, max_seq_len=100, doc_stride=32, quiet=True)
    loaded = load_model(model_dir, "cpu", "auto", "none")
    assert loaded.max_positions == 100
    plan = plan_inputs(config.inputs, "passage", "question", None, (), None)
    shape = PerPair.build(plan, 1, wide=False)
    rows = next(read_windows(plan, 16, plan.total_rows, 0))
    tables = {}
    for multiple in (1, 8):
        stages = Stages.build(config, loaded, 1, None)
        stages.pad_multiple = multiple
        chunks = stages.chunker(rows.passages, rows.questions)
        widths = [stages.collate(chunks, index).inputs["input_ids"].shape[1] for index in stages.batch_plan(chunks)]
        assert max(widths) == 100 and (multiple == 1 or all(w % 8 == 0 or w == 100 for w in widths))
        tables[multiple] = stages.answer_window(rows, shape)
        stages.predictor.close()
    assert_same_answers(tables[8], tables[1])


@pytest.fixture(scope="module")
def oom_job(tmp_path_factory, checkpoints):
    tmp = tmp_path_factory.mktemp("oom")
    passages = [" ".join(np.random.default_rng(i).choice(CORPUS, 60)) for i in range(12)]
    src = write_parquet(tmp / "in.parquet", {"passage": passages, "question": ["who?"] * 12})
    ref = tmp / "ref.parquet"
    args = ["--model", checkpoints["bert"], "--max-seq-len", "32", "--doc-stride", "8", "--batch-size", "8",
            "--rows-per-window", "4"]
    r = run_cli("run", str(src), "-o", str(ref), *args)
    assert r.returncode == 0, r.stderr
    return {"input": src, "args": args, "reference": pq.read_table(ref), "tmp": tmp}


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_out_of_memory_inside_the_engine_splits_and_answers_as_a_clean_run(oom_job, engine):
    """QA_BATCH_OOM_ABOVE=1: every forward of more than one chunk runs out of memory, so each batch
    is halved down to single chunks; the output equals the clean run's and the report counts
    the splits (the Ray engine dropped its actors' counts)."""
    out = oom_job["tmp"] / f"{engine}.out"
    report = oom_job["tmp"] / f"{engine}.json"
    extra = ["--engine", "ray", "--num-gpus", "0", "--cpu-workers", "1"] if engine == "ray" else []
    r = run_cli("run", str(oom_job["input"]), "-o", str(out), *oom_job["args"], *extra, "--report", str(report),
                env={"QA_BATCH_OOM_ABOVE": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(out), oom_job["reference"])
    summary = json.loads(report.read_text())
    assert summary["oom_splits"] > 0
    if engine == "ray":
        success = json.loads((out / "_SUCCESS").read_text())
        assert success["oom_splits"] == summary["oom_splits"]
    assert not os.path.exists(str(out) + ".partial")


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "deberta-v2"])
def test_the_forward_and_span_search_read_nothing_back_to_the_host(tmp_path, family):
    """Issue 27 item 6: transformers checked a 2D padding mask with `mask.all()`, a host read that
    on CUDA waits for the stream, so 'two batches in flight' was one. The mask now goes in as
    [B, 1, 1, T] bool where that gives the same logits (checked at load): a padded and an unpadded
    batch, forward and span search, make no host read, and answer as the 2D mask does."""
    from pipeline.models.checkpoint import HostReads
    from pipeline.stages.chunk import Chunker

    model_dir = make_checkpoint(str(tmp_path / family), family)
    loaded = load_model(model_dir, "cpu", "auto", "none")
    assert loaded.mask_4d
    config = RunConfig(inputs=("x",), model=model_dir, max_seq_len=48, doc_stride=16, quiet=True)
    stages = Stages.build(config, loaded, 1, None)
    chunker = Chunker(loaded.tokenizer, 48, 16, None)
    chunks = chunker([" ".join(CORPUS[:3]), " ".join(CORPUS * 2)], ["who?", "what was it?"])
    padded = stages.collate(chunks, np.arange(len(chunks)))
    unpadded = stages.collate(chunks, np.array([len(chunks) - 1]))
    assert "attention_mask" in padded.inputs and "attention_mask" not in unpadded.inputs
    spans = {}
    for mask_4d in (True, False):
        stages.predictor.mask_4d, stages.predictor.mask_always = mask_4d, mask_4d and loaded.mask_always
        for batch in (padded, unpadded):
            with HostReads() as reads:
                got = stages.predictor(batch)
            if mask_4d:
                assert reads.count == 0, (family, batch.inputs["input_ids"].shape)
            spans.setdefault(mask_4d, []).append(got)
    stages.predictor.close()
    for a, b in zip(spans[True], spans[False]):
        assert torch.equal(a.start, b.start) and torch.equal(a.end, b.end)
        assert torch.allclose(a.score, b.score, rtol=1e-4, atol=1e-5)
