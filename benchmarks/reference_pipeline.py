"""The old transformers `QuestionAnsweringPipeline` (transformers <= 5.2) on a benchmark input.

Run with the Python of an environment that has transformers==5.2.0. Prints one JSON line:
rows, chunks, seconds (the pipeline call alone, model loaded), peak RSS, and the answers
(`answers`: [start, end] character offsets; `texts` and `scores`: the answer text, '' for
"no answer", and the pipeline's score).

Usage: python reference_pipeline.py CHECKPOINT INPUT.parquet --rows N --batch-size B
       [--device cpu|cuda] [--dtype float32|float16] [--max-seq-len 384] [--doc-stride 128]
       [--handle-impossible-answer] [--align-to-words]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import pyarrow.parquet as pq
import torch
import transformers
from transformers import pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("input")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-seq-len", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--max-answer-len", type=int, default=30)
    ap.add_argument("--handle-impossible-answer", action="store_true",
                    help="let the pipeline answer '' (SQuAD 2.0-style models)")
    ap.add_argument("--align-to-words", action="store_true",
                    help="the pipeline's default; off here unless given, for span-for-span comparisons")
    args = ap.parse_args()

    table = pq.read_table(args.input)
    if args.rows:
        table = table.slice(0, args.rows)
    passages, questions = table["passage"].to_pylist(), table["question"].to_pylist()
    qa = pipeline("question-answering", model=args.checkpoint, tokenizer=args.checkpoint,
                  device=args.device, dtype=getattr(torch, args.dtype))
    tok = qa.tokenizer
    chunks = sum(len(tok(q, p, truncation="only_second", max_length=args.max_seq_len, stride=args.doc_stride,
                         return_overflowing_tokens=True)["input_ids"]) for q, p in zip(questions, passages))
    kwargs = dict(batch_size=args.batch_size, max_seq_len=args.max_seq_len, doc_stride=args.doc_stride,
                  max_answer_len=args.max_answer_len, align_to_words=args.align_to_words, top_k=1,
                  handle_impossible_answer=args.handle_impossible_answer)
    qa(question=questions[:2], context=passages[:2], **kwargs)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = qa(question=questions, context=passages, **kwargs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = out if isinstance(out, list) else [out]
    print(json.dumps({
        "transformers": transformers.__version__, "rows": len(questions), "chunks": chunks,
        "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "answers": [[a["start"], a["end"]] for a in out],
        "texts": [a["answer"] for a in out], "scores": [float(a["score"]) for a in out],
    }))


if __name__ == "__main__":
    main()
