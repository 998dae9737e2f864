"""Model loading: position limits per family, slow tokenizers refused, devices and dtypes."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import SAMPLE, run_cli
from pipeline.errors import UsageError
from pipeline.models.checkpoint import load_model, resolve_device, resolve_dtype
from tiny_models import make_checkpoint


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "albert", "electra", "deberta-v2"])
def test_position_limit_and_inputs_per_family(checkpoints, family):
    m = load_model(checkpoints[family], "cpu")
    assert m.max_positions == 512  # RoBERTa: 514 positions less padding_idx + 1
    expected = {"bert": ("input_ids", "token_type_ids", "attention_mask"),
                "roberta": ("input_ids", "attention_mask"),
                "distilbert": ("input_ids", "attention_mask"),
                "albert": ("input_ids", "token_type_ids", "attention_mask"),
                "electra": ("input_ids", "token_type_ids", "attention_mask"),
                "deberta-v2": ("input_ids", "attention_mask")}[family]  # type_vocab_size 0
    assert m.input_names == expected
    assert m.dtype == torch.float32 and m.device.type == "cpu"
    assert not m.model.training


def test_max_seq_len_above_the_model_limit_exits_2(tmp_path):
    short = make_checkpoint(str(tmp_path / "short"), "bert", max_position_embeddings=128)
    r = run_cli("run", SAMPLE, "-o", tmp_path / "out.parquet", "--model", short)
    assert r.returncode == 2
    assert "--max-seq-len 384 is above" in r.stderr and "128" in r.stderr
    assert not (tmp_path / "out.parquet").exists()


def test_slow_tokenizer_is_refused_with_advice(tmp_path, bert_dir, bert_tokenizer):
    from transformers import BertTokenizerLegacy

    d = tmp_path / "slow"
    shutil.copytree(bert_dir, d)
    for name in os.listdir(d):
        if name.startswith(("tokenizer", "special_tokens")):
            os.unlink(d / name)
    vocab = bert_tokenizer.get_vocab()
    (d / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)))
    BertTokenizerLegacy(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    with pytest.raises(UsageError, match=r"not a fast \(Rust\) tokenizer.*save the checkpoint with a "
                                         r"tokenizer.json \(AutoTokenizer.from_pretrained\(..., use_fast=True\)"):
        load_model(str(d), "cpu")  # the advice: how to save a fast tokenizer


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float16
    with pytest.raises(UsageError, match="--dtype float16 is slow or unsupported on the CPU: use float32 or bfloat16"):
        resolve_dtype("float16", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_not_a_checkpoint_directory_exits_2(tmp_path):
    (tmp_path / "empty-model").mkdir()
    r = run_cli("run", SAMPLE, "-o", tmp_path / "out.parquet", "--model", tmp_path / "empty-model")
    assert r.returncode == 2 and "not a loadable question-answering checkpoint" in r.stderr
