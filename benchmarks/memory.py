"""Peak memory against table length: the same run over 10,000 and 1,000,000 rows.

Rows repeat a few SQuAD-sized paragraphs, so only the row count changes. The model is a
tiny random BERT (tests/tiny_models.py) so the run is bound by the pipeline, not the
model, and its memory is measured apart: the report's `model_rss_mb` is the resident
memory once the model is loaded, and the growth is peak RSS minus that.

Usage: python benchmarks/memory.py [--rows 10000,1000000]
       python benchmarks/memory.py --rows 1000000 --documents 10
           the same rows answered as pairs, then as documents of 10 rows each (--document-col):
           one answer per document, reduced from every pair's candidates at assembly
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

PARAGRAPHS = [
    ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
     "a region in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway."),
    ("Computational complexity theory is a branch of the theory of computation in theoretical computer "
     "science that focuses on classifying computational problems according to their inherent difficulty."),
    "Paris is the capital and most populous city of France, with an estimated population of two million.",
]
DOC_ROWS = 10  # rows per document with --documents (consecutive ids; the question is the same within one)
QUESTIONS = ["Who gave their name to Normandy?", "What does complexity theory classify?", "What is the capital?"]


def make_input(path: str, rows: int) -> None:
    block = 10_000
    schema = pa.schema([("id", pa.int64()), ("doc", pa.int64()), ("passage", pa.string()), ("question", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            w.write_table(pa.table({
                "id": pa.array(range(start, start + n), pa.int64()),
                "doc": pa.array([i // DOC_ROWS for i in range(start, start + n)], pa.int64()),
                "passage": [PARAGRAPHS[i % 3] for i in range(start, start + n)],
                "question": [QUESTIONS[(i // DOC_ROWS) % 3] for i in range(start, start + n)],
            }, schema=schema))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="10000,1000000")
    ap.add_argument("--documents", action="store_true",
                    help=f"for each row count: as pairs, then as documents of {DOC_ROWS} rows (--document-col doc)")
    args = ap.parse_args()
    from tiny_models import make_checkpoint

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_checkpoint(os.path.join(tmp, "tiny"), "bert")
        for rows in map(int, args.rows.split(",")):
            inp = os.path.join(tmp, f"{rows}.parquet")
            make_input(inp, rows)
            for grouped in ((False, True) if args.documents else (False,)):
                out, rep = (os.path.join(tmp, f"{rows}-{grouped}.{x}") for x in ("out.parquet", "json"))
                extra = ["--document-col", "doc"] if grouped else []
                subprocess.run([sys.executable, "-m", "jobs.cli", "run", inp, "-o", out, "--model", model, "--quiet",
                                "--batch-size", "64", "--report", rep, *extra], check=True, cwd=ROOT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
                with open(rep) as f:
                    r = json.load(f)
                r["growth_mb"] = r["peak_rss_mb"] - r["model_rss_mb"]
                r["as"] = f"documents of {DOC_ROWS} rows" if grouped else "pairs"
                results.append(r)
                print(json.dumps({k: r[k] for k in ("as", "rows", "documents", "chunks", "elapsed_s", "rows_per_s",
                                                     "peak_rss_mb", "model_rss_mb", "growth_mb", "stage_seconds")}),
                      flush=True)
                os.unlink(out)
            os.unlink(inp)
    if args.documents:
        return
    small, big = results[0], results[-1]
    print(f"peak RSS beyond the model: {small['rows']} rows {small['growth_mb']:.0f} MB, "
          f"{big['rows']} rows {big['growth_mb']:.0f} MB: {big['growth_mb'] / small['growth_mb']:.2f}x")


if __name__ == "__main__":
    main()
