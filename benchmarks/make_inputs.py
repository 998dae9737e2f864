"""Benchmark inputs from SQuAD 2.0 dev JSON (CC BY-SA 4.0).

long:   every question asked of its whole article, paragraphs joined ("\\n\\n"): ~5,000-token
        passages, about 20 chunks each at max_seq_len 384, stride 128;
short:  every question asked of its own paragraph: one chunk each;
manyq:  10 questions per paragraph (paragraphs with fewer repeat theirs), for tokenization.

Usage: python benchmarks/make_inputs.py SQUAD_JSON OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def build(squad_path: str, out_dir: str) -> dict[str, str]:
    with open(squad_path) as f:
        articles = json.load(f)["data"]
    long, short, manyq = [], [], []
    for art in articles:
        joined = "\n\n".join(p["context"] for p in art["paragraphs"])
        for p in art["paragraphs"]:
            qs = [q["question"] for q in p["qas"]]
            for q in p["qas"]:
                long.append({"id": q["id"], "passage": joined, "question": q["question"]})
                short.append({"id": q["id"], "passage": p["context"], "question": q["question"]})
            for i in range(10):
                manyq.append({"id": f"{p['qas'][0]['id']}-{i}", "passage": p["context"],
                              "question": qs[i % len(qs)]})
    paths = {}
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in (("long", long), ("short", short), ("manyq", manyq)):
        paths[name] = os.path.join(out_dir, f"{name}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), paths[name])
    return paths


if __name__ == "__main__":
    for name, path in build(sys.argv[1], sys.argv[2]).items():
        print(name, path, pq.read_metadata(path).num_rows)
