"""The CUDA path's checks, run by gpu_check.sh on a GPU machine: each check passes or fails
loudly, the reports go under $OUT, and the exit code is 1 if any failed.

    python3 benchmarks/gpu_checks.py --tiny /tmp/tiny --out $OUT [--trained DIR --cpu-answers DIR]
    python3 benchmarks/gpu_checks.py --tiny /tmp/tiny --device cpu     # a dry run of the plumbing, no GPU
    python3 benchmarks/gpu_checks.py --only trained --trained DIR --inputs DIR --cpu-answers DIR

With --device cpu every check runs with cpu in place of cuda (the synchronisation check,
which needs CUDA, is skipped): it proves the script itself before GPU time is spent on it.

Checks (issue 27): no host read in a padded or unpadded forward and span search on CUDA
(torch.cuda.set_sync_debug_mode), `--devices cuda,cuda` (and cuda:0,cuda:1 on two GPUs)
against cuda:0, the position-table cap (a tiny BERT with 100 positions), an out-of-memory
inside the engine (local and Ray) equal to a clean run with oom_splits > 0, a Ray GPU actor
against the local CUDA run, and on the trained model float16/bfloat16 with --top-k 3
--allow-null against CPU float32 answers made before the call (same-span share, confidence
differences, identical errors, finite scores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

RESULTS: dict[str, dict] = {}
DEVICE = "cuda"  # --device cpu: the dry run


def check(name):
    def wrap(fn):
        def run(*a, **kw):
            try:
                detail = fn(*a, **kw) or {}
                ok = detail.pop("ok", True)
            except Exception as e:  # noqa: BLE001 - every check reports, none stops the others
                ok, detail = False, {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            RESULTS[name] = {"ok": bool(ok), **detail}
            print(f"{'PASS' if ok else 'FAIL'} {name}: {json.dumps({k: v for k, v in detail.items() if k != 'trace'})}",
                  flush=True)
        return run
    return wrap


def cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}: {r.stderr[-1500:]}")
    return r


def same_answers(a, b) -> dict:
    from conftest import assert_same_answers

    assert_same_answers(pq.read_table(a), pq.read_table(b))
    return {}


@check("no host read in the forward and span search (padded and unpadded)")
def no_sync(tiny: str) -> dict:
    from pipeline.config import RunConfig
    from pipeline.engines.chain import Stages
    from pipeline.models.checkpoint import load_model
    from pipeline.stages.chunk import Chunker
    from tiny_models import CORPUS
    import numpy as np

    loaded = load_model(tiny, "cuda", "float16", "none")
    stages = Stages.build(RunConfig(inputs=("x",), model=tiny, max_seq_len=48, doc_stride=16), loaded, 1, None)
    chunks = Chunker(loaded.tokenizer, 48, 16, None)([" ".join(CORPUS[:3]), " ".join(CORPUS * 2)], ["who?", "what?"])
    batches = [stages.collate(chunks, np.arange(len(chunks))), stages.collate(chunks, np.array([len(chunks) - 1]))]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        handles = [stages.predictor.submit(b) for b in batches]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for h in handles:
        stages.predictor.collect(h)
    return {"mask_4d": loaded.mask_4d, "mask_always": loaded.mask_always}


@check("--devices cuda,cuda equals cuda:0")
def two_workers(tiny: str, sample: str, work: str) -> dict:
    common = ["--model", tiny, "--dtype", "float32", "--top-k", "2", "--rows-per-window", "8", "--overwrite"]
    cli("run", sample, "-o", f"{work}/one.parquet", "--device", f"{DEVICE}:0" if DEVICE == "cuda" else DEVICE,
        *common)
    pairs = [f"{DEVICE},{DEVICE}"] + (["cuda:0,cuda:1"] if DEVICE == "cuda" and torch.cuda.device_count() > 1 else [])
    for devices in pairs:
        cli("run", sample, "-o", f"{work}/{devices}.parquet", "--devices", devices, *common)
        same_answers(f"{work}/{devices}.parquet", f"{work}/one.parquet")
    return {"checked": pairs}


@check("padding stops at a position table of 100")
def position_cap(work: str, sample: str) -> dict:
    from tiny_models import make_checkpoint

    short = make_checkpoint(f"{work}/short", "bert", max_position_embeddings=100)
    for name, device in (("reference", "cpu"), ("device", DEVICE)):
        cli("run", sample, "-o", f"{work}/short-{name}.parquet", "--model", short, "--device", device,
            "--dtype", "float32", "--max-seq-len", "100", "--doc-stride", "32", "--overwrite")
    return same_answers(f"{work}/short-device.parquet", f"{work}/short-reference.parquet")


@check("out of memory inside the engine: same answers, oom_splits > 0 (local and Ray)")
def oom_in_engine(tiny: str, sample: str, work: str) -> dict:
    common = ["--model", tiny, "--dtype", "float32", "--batch-size", "16", "--overwrite"]
    cli("run", sample, "-o", f"{work}/clean.parquet", "--device", DEVICE, *common)
    splits = {}
    ray_gpus = ["--num-gpus", "1"] if DEVICE == "cuda" else ["--num-gpus", "0", "--cpu-workers", "1"]
    for engine, extra in (("local", ["--device", DEVICE]), ("ray", ["--engine", "ray", *ray_gpus])):
        out, report = f"{work}/oom-{engine}", f"{work}/oom-{engine}.json"
        cli("run", sample, "-o", out, *common, *extra, "--report", report, env={"QA_BATCH_OOM_ABOVE": "2"})
        same_answers(out, f"{work}/clean.parquet")
        splits[engine] = json.load(open(report))["oom_splits"]
    real = subprocess.run([sys.executable, os.path.join(HERE, "oom_check.py"), tiny], capture_output=True, text=True,
                          cwd=ROOT)  # without CUDA it says so and exits 0
    return {"ok": all(v > 0 for v in splits.values()) and real.returncode == 0, "oom_splits": splits,
            "real_oom": real.stdout.strip()[-400:] + real.stderr[-400:]}


@check("a Ray GPU actor answers as the local CUDA run")
def ray_gpu(tiny: str, sample: str, work: str) -> dict:
    common = ["--model", tiny, "--dtype", "float32", "--top-k", "2", "--overwrite"]
    ray_gpus = ["--num-gpus", "1"] if DEVICE == "cuda" else ["--num-gpus", "0", "--cpu-workers", "1"]
    cli("run", sample, "-o", f"{work}/local-dev.parquet", "--device", DEVICE, *common)
    cli("run", sample, "-o", f"{work}/ray-dev", "--engine", "ray", *ray_gpus, "--overwrite", *common[:-1])
    return same_answers(f"{work}/ray-dev", f"{work}/local-dev.parquet")


@check("trained model: float16 and bfloat16 on CUDA against CPU float32 (--top-k 3 --allow-null)")
def trained(model: str, inputs: str, cpu_answers: str, work: str) -> dict:
    """`cpu_answers`: <name>.parquet made on the CPU before the call for every input <name>.parquet."""
    import math

    out = {}
    ok = True
    for name in sorted(os.listdir(inputs)):
        for dtype in ("float32", "float16", "bfloat16") if DEVICE == "cuda" else ("float32",):
            got = f"{work}/{dtype}-{name}"
            cli("run", f"{inputs}/{name}", "-o", got, "--model", model, "--device", DEVICE, "--dtype", dtype,
                "--top-k", "3", "--allow-null", "--overwrite", timeout=900)
            a, b = pq.read_table(f"{cpu_answers}/{name}").to_pylist(), pq.read_table(got).to_pylist()
            same = sum((x["answer_start"], x["answer_end"]) == (y["answer_start"], y["answer_end"]) for x, y in zip(a, b))
            conf = max((abs(x["confidence"] - y["confidence"]) for x, y in zip(a, b)
                        if x["confidence"] is not None and y["confidence"] is not None), default=0.0)
            errors_same = [x["error"] for x in a] == [y["error"] for y in b]
            finite = all(math.isfinite(y[k]) for y in b for k in ("score", "null_score", "log_norm")
                         if y[k] is not None)
            share = same / max(1, len(a))
            need = 0.995 if dtype == "float32" else 0.95
            out[f"{name}/{dtype}"] = {"rows": len(a), "same_span": round(share, 4), "max_conf_diff": round(conf, 4),
                                      "errors_same": errors_same, "finite": finite}
            ok &= len(a) == len(b) and share >= need and errors_same and finite
    return {"ok": ok, **out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", help="a tiny checkpoint (tests/tiny_models.py DIR); not for --only trained")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/qa-out"))
    ap.add_argument("--work", default="/tmp/gpu-checks")
    ap.add_argument("--trained", help="the trained checkpoint")
    ap.add_argument("--inputs", help="folder of input .parquet files for the trained model")
    ap.add_argument("--cpu-answers", help="their CPU float32 answers (same file names), made before the call")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the plumbing")
    ap.add_argument("--only", choices=["tiny", "trained"], help="the tiny model's checks, or the trained model's")
    args = ap.parse_args()
    if args.only != "trained" and not args.tiny:
        ap.error("--tiny is needed, but for --only trained")
    if args.only == "trained" and not (args.trained and args.inputs and args.cpu_answers):
        ap.error("--only trained needs --trained, --inputs and --cpu-answers")
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("FAIL: no CUDA device")
        return 1
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    sample = os.path.join(ROOT, "data", "sample.parquet")
    if args.only != "trained":
        if DEVICE == "cuda":
            no_sync(args.tiny)
        two_workers(args.tiny, sample, args.work)
        position_cap(args.work, sample)
        oom_in_engine(args.tiny, sample, args.work)
        ray_gpu(args.tiny, sample, args.work)
    if args.trained and args.only != "tiny":
        trained(args.trained, args.inputs, args.cpu_answers, args.work)
    with open(os.path.join(args.out, "gpu_checks.json"), "w") as f:
        name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
        json.dump({"device": name, "torch": torch.__version__, "checks": RESULTS}, f, indent=2)
    failed = [k for k, v in RESULTS.items() if not v["ok"]]
    print(f"gpu checks: {len(RESULTS) - len(failed)} passed, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
