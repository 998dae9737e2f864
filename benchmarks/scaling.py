"""Scaling on one machine: 1 versus 2 workers, for each way qa-batch spreads work.

    python benchmarks/scaling.py                      # CPU: the small checkpoint, short and long inputs
    python benchmarks/scaling.py --device cuda        # a multi-GPU node: 1 GPU versus all of them

Runs `qa-batch run` as a user does (Parquet in, Parquet out; model loading, Ray start-up
and assembly included in the time) with:
  local engine, one process  (CPU: --cpu-workers 1 and 2, threads in one process)
  --devices                  (one worker process per device)
  --engine ray               (a local Ray instance, 1 and 2 actors)
and prints a Markdown table of rows/s and speed-up over one worker. Inputs and checkpoints
come from benchmarks/run.py's work folder (run that first, or pass --input/--model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(HERE, "work")


def run(args: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix="qa-scaling-")
    report = os.path.join(out, "report.json")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "run", *args, "-o", os.path.join(out, "answers"),
                        "--report", report, "--quiet"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"qa-batch failed: {' '.join(args)}\n{r.stderr}")
    summary = json.load(open(report)) if os.path.exists(report) else {}
    shutil.rmtree(out)
    return {"rows": summary.get("rows"), "chunks": summary.get("chunks"), "wall_s": round(wall, 2)}


def short_x4() -> str:
    """Enough paragraph rows that start-up (imports, model load, Ray) is not most of the time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(WORK, "short-x4.parquet")
    if not os.path.exists(path):
        table = pq.read_table(os.path.join(WORK, "short.parquet"))
        pq.write_table(pa.concat_tables([table] * 4), path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=os.path.join(WORK, "bert-small-qa"))
    p.add_argument("--input", action="append",
                   help="default: work/short.parquet repeated 4 times (2,504 paragraphs) and work/long-40.parquet")
    p.add_argument("--rows-per-window", type=int, help="default: 4 for long inputs, 128 for others")
    p.add_argument("--gpus", type=int, default=2, help="with --device cuda: GPUs for the multi-GPU rows")
    p.add_argument("--output", default=os.path.join(HERE, "results", "scaling.json"))
    a = p.parse_args()
    inputs = a.input or [short_x4(), os.path.join(WORK, "long-40.parquet")]
    common = ["--model", a.model, "--max-seq-len", "384", "--doc-stride", "128"]
    if a.device == "cpu":
        ways = [
            ("local, 1 worker", ["--device", "cpu", "--cpu-workers", "1"], "local, 1 worker"),
            ("local, 2 workers (threads)", ["--device", "cpu", "--cpu-workers", "2"], "local, 1 worker"),
            ("--devices cpu,cpu (2 processes)", ["--devices", "cpu,cpu", "--cpu-workers", "2"], "local, 1 worker"),
            # actors reserve 0.5 CPU (the default) so Ray's own tasks fit beside them on 2 cores
            ("ray, 1 actor", ["--engine", "ray", "--device", "cpu", "--cpu-workers", "1"], "ray, 1 actor"),
            ("ray, 2 actors", ["--engine", "ray", "--device", "cpu", "--cpu-workers", "2"], "ray, 1 actor"),
        ]
    else:
        gpus = ",".join(f"cuda:{i}" for i in range(a.gpus))
        ways = [
            ("local, 1 GPU", ["--device", "cuda:0"], "local, 1 GPU"),
            (f"--devices {gpus}", ["--devices", gpus], "local, 1 GPU"),
            ("ray, 1 GPU actor", ["--engine", "ray", "--num-gpus", "1"], "ray, 1 GPU actor"),
            (f"ray, {a.gpus} GPU actors", ["--engine", "ray", "--num-gpus", str(a.gpus)], "ray, 1 GPU actor"),
        ]
    results = []
    for inp in inputs:
        base: dict[str, float] = {}
        # Work is shared out in whole windows: enough of them (about 10-20) for every worker.
        window = ["--rows-per-window", str(a.rows_per_window or (4 if "long" in os.path.basename(inp) else 128))]
        for name, extra, baseline in ways:
            m = run([inp, *common, *window, *extra])
            rate = m["rows"] / m["wall_s"]
            base.setdefault(name, rate)
            results.append({"input": os.path.basename(inp), "way": name, **m, "rows_per_s": round(rate, 2),
                            "speedup": round(rate / base[baseline], 2)})
            print(json.dumps(results[-1]), flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    lines = [f"Scaling on {machine} ({a.device}; model {os.path.basename(a.model)}; wall time of the whole "
             "command, start-up included)", "", "| input | way | rows | chunks | wall s | rows/s | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['input']} | {r['way']} | {r['rows']} | {r['chunks']} | {r['wall_s']} | {r['rows_per_s']} | "
              f"{r['speedup']}x |" for r in results]
    print("\n".join(lines))
    os.makedirs(os.path.dirname(a.output), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump({"machine": machine, "device": a.device, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
