"""--questions against the same pairs built by hand: answers per second and peak memory.

    python benchmarks/questions.py                      # SQuAD 2.0 dev paragraphs x 10 questions
    python benchmarks/questions.py --repeat 100         # 100 times the documents: is memory flat?
    python benchmarks/questions.py --model DIR --device cuda

Documents are the paragraphs of SQuAD 2.0 dev JSON (../shared/data/squad_v2_dev_2articles.json),
asked 10 questions each: the same 10 of every paragraph (one every few questions of the file, so
they have SQuAD's lengths). The same job runs twice, each `qa-batch run` in its own process:
`docs.parquet --questions fields.txt` (one row per paragraph), and `pairs.parquet`, the cross
product written out by hand (each paragraph copied 10 times). Windows match (--rows-per-window W
documents against 10 W pairs), so the answers must be identical, and the script checks it.
It prints one JSON line per run (answers, seconds, answers/s, peak RSS, RSS beyond the model,
input size) and a Markdown table. The default model is tests/tiny_models.py's random BERT, which
makes the run bound by the pipeline (reading, tokenizing, merging, writing) rather than the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
DEFAULT_SQUAD = os.path.join(ROOT, "..", "shared", "data", "squad_v2_dev_2articles.json")
ANSWER_COLUMNS = ["question", "answer", "answer_start", "answer_end", "score", "confidence", "null_score", "error"]


def build(squad: str, out_dir: str, questions: int, repeat: int) -> dict[str, str]:
    with open(squad) as f:
        articles = json.load(f)["data"]
    paragraphs = [p["context"] for a in articles for p in a["paragraphs"]]
    every = [q["question"].strip() for a in articles for p in a["paragraphs"] for q in p["qas"]]
    step = max(1, len(every) // questions)
    asked = list(dict.fromkeys(every[::step]))[:questions]
    ids = [f"p{r}-{i}" for r in range(repeat) for i in range(len(paragraphs))]
    passages = paragraphs * repeat
    paths = {k: os.path.join(out_dir, f"{k}.{ext}") for k, ext in
             (("docs", "parquet"), ("pairs", "parquet"), ("fields", "txt"))}
    pq.write_table(pa.table({"id": ids, "passage": passages}), paths["docs"])
    with open(paths["fields"], "w") as f:
        f.write("\n".join(asked) + "\n")
    schema = pa.schema([("id", pa.string()), ("passage", pa.string()), ("question", pa.string())])
    with pq.ParquetWriter(paths["pairs"], schema) as w:  # written in blocks: the cross product may be large
        block = 10_000
        for start in range(0, len(ids), block):
            sl = range(start, min(start + block, len(ids)))
            w.write_table(pa.table({"id": [ids[i] for i in sl for _ in asked],
                                    "passage": [passages[i] for i in sl for _ in asked],
                                    "question": asked * len(sl)}, schema=schema))
    return paths


def run(args: list[str], report: str) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.cli", "run", *args, "--quiet", "--overwrite", "--report", report],
                   check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    with open(report) as f:
        r = json.load(f)
    return {"answers": r["rows"], "chunks": r["chunks"], "wall_s": round(wall, 2), "elapsed_s": r["elapsed_s"],
            "answers_per_s": r["rows_per_s"], "peak_rss_mb": r["peak_rss_mb"], "model_rss_mb": r["model_rss_mb"],
            "growth_mb": round(r["peak_rss_mb"] - r["model_rss_mb"], 1), "bottleneck": r["bottleneck"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--squad", default=DEFAULT_SQUAD)
    ap.add_argument("--questions", type=int, default=10, help="questions asked of every paragraph")
    ap.add_argument("--repeat", type=int, default=1, help="copies of the paragraphs (more documents)")
    ap.add_argument("--model", help="a QA checkpoint directory; default: tests/tiny_models.py's random BERT")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows-per-window", type=int, default=100, help="documents per window (pairs: x questions)")
    ap.add_argument("--runs", type=int, default=1, help="runs of each, alternating; the best is reported")
    ap.add_argument("--keep", help="keep the inputs and outputs in this directory")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        model = args.model
        if model is None:
            from tiny_models import make_checkpoint

            model = make_checkpoint(os.path.join(work, "tiny-bert"), "bert")
        paths = build(args.squad, work, args.questions, args.repeat)
        m = sum(1 for line in open(paths["fields"]) if line.strip())
        common = ["--model", model, "--device", args.device]
        jobs = {
            "--questions": [paths["docs"], "--questions", paths["fields"], "-o", os.path.join(work, "q.parquet"),
                            "--rows-per-window", str(args.rows_per_window), *common],
            "pairs by hand": [paths["pairs"], "-o", os.path.join(work, "p.parquet"),
                              "--rows-per-window", str(args.rows_per_window * m), *common],
        }
        best: dict[str, dict] = {}
        for i in range(args.runs):
            for name, job in jobs.items():
                r = run(job, os.path.join(work, f"report-{i}.json"))
                input_path = paths["docs"] if name == "--questions" else paths["pairs"]
                r["input_mb"] = round(os.path.getsize(input_path) / 2**20, 2)
                print(json.dumps({"run": name, "try": i, **r}), flush=True)
                if name not in best or r["answers_per_s"] > best[name]["answers_per_s"]:
                    best[name] = r
        q = pq.read_table(os.path.join(work, "q.parquet"))
        p = pq.read_table(os.path.join(work, "p.parquet"))
        same = all(q[c].equals(p[c]) for c in ["id", *ANSWER_COLUMNS])
        docs = pq.read_metadata(paths["docs"]).num_rows
        print(f"\n{docs} documents x {m} questions = {docs * m} answers; model {model}, device {args.device}; "
              f"identical answers: {same}\n")
        print("| input | answers | input MB | wall s | answers/s | peak RSS MB | RSS beyond the model MB |")
        print("|---|---|---|---|---|---|---|")
        for name, r in best.items():
            print(f"| {name} | {r['answers']} | {r['input_mb']} | {r['wall_s']} | {r['answers_per_s']} | "
                  f"{r['peak_rss_mb']} | {r['growth_mb']} |")
        if not same:
            sys.exit("the two runs' answers differ")


if __name__ == "__main__":
    main()
