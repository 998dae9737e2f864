"""A real CUDA out-of-memory, recovered: run by gpu_check.sh on a GPU machine.

Most of the card is taken by a ballast tensor, then one batch far larger than what is left
goes to the Predictor. It must run out of memory for real (in the forward, not before it),
split, answer every chunk, give the same spans as a run without ballast, and hand its
memory back (the failed forward's tensors freed before the retry: infer.py leaves the
`except` block first). Prints one line of figures; exit 1 if any check fails.

    python3 benchmarks/oom_check.py CHECKPOINT_DIR
"""

from __future__ import annotations

import sys

import torch

from pipeline.stages.batch import collate
from pipeline.stages.chunk import Chunker
from pipeline.stages.infer import Predictor
from pipeline.models.checkpoint import load_model


def main(checkpoint: str) -> int:
    if not torch.cuda.is_available():
        print("oom check: no CUDA device, skipped")
        return 0
    loaded = load_model(checkpoint, "cuda", "float32")
    chunker = Chunker(loaded.tokenizer, 512, 128)
    passages = ["the normans were descended from norse raiders " * 400] * 64
    chunks = chunker(passages, ["who were the normans?"] * 64)
    tok = loaded.tokenizer
    batch = collate(chunks, torch.arange(len(chunks)).numpy(), loaded.input_names, tok.pad_token_id or 0, pin=True)
    predictor = Predictor(loaded.model, loaded.device, 30, 2)
    clean = predictor.collect(predictor.submit(batch))
    assert predictor.stats.oom_splits == 0, "the clean run already split: lower the chunk count"

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated()  # what one forward of the whole batch took
    base = torch.cuda.memory_allocated()
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(max(0, free - (peak - base) // 4), dtype=torch.uint8, device="cuda")  # a quarter left
    squeezed = predictor.collect(predictor.submit(batch))
    splits = predictor.stats.oom_splits
    del ballast
    torch.cuda.synchronize()
    held_mb = (torch.cuda.memory_allocated() - base) / 2**20
    same = all(torch.equal(getattr(clean, f), getattr(squeezed, f)) for f in ("start", "end"))
    close = torch.allclose(clean.score, squeezed.score, atol=1e-4)
    print(f"oom check: {len(chunks)} chunks, peak {peak / 2**20:.0f} MiB, {splits} splits, same spans {same}, "
          f"scores close {close}, memory held after recovery {held_mb:.1f} MiB")
    return 0 if splits > 0 and same and close and held_mb < 64 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
