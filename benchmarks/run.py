"""One command for the throughput benchmark: qa-batch against the old transformers pipeline.

    python benchmarks/run.py --device cpu            # this machine
    python benchmarks/run.py --device cuda           # a GPU machine: also the bare forward loop

It builds the inputs from SQuAD 2.0 dev JSON (long articles, single paragraphs, and 10
questions per paragraph for tokenization), saves random-weight BERT checkpoints of each
size with a real BERT tokenizer, then in the same invocation runs the old
`QuestionAnsweringPipeline` (transformers==5.2.0, in its own environment: --ref-python) at
each --ref-batch-sizes and `qa-batch run` (Parquet in, Parquet out) on the same
checkpoint, inputs, max_seq_len and stride; on CUDA also a bare forward loop over
pre-tokenized length-sorted batches and the card's measured bf16 matmul peak. It prints a
Markdown table and appends it to BENCHMARKS.md (unless --no-append).

The CPU paths side by side, with answer quality on the trained model (--quality runs
benchmarks/quality.py with the same variants: F1 and same-span share against float32):

    python benchmarks/run.py --device cpu --quality \
        --variants "--quantize int8;--backend onnxruntime;--backend onnxruntime --quantize int8"

A variant that runs the ONNX export (`--backend onnxruntime`, `openvino` or `auto`, `--quantize int8`)
first answers one row, untimed, so that its export is made
(into $QA_BATCH_CACHE, by default <--work>/onnx-cache) before the timed run takes it from the cache.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import pyarrow.parquet as pq  # noqa: E402

from make_checkpoints import SHAPES, make as make_checkpoint  # noqa: E402
from make_inputs import build as build_inputs  # noqa: E402

DEFAULT_SQUAD = os.path.join(ROOT, "..", "shared", "data", "squad_v2_dev_2articles.json")


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    return f"CPU {model or platform.processor()}, {os.cpu_count()} cores"


def subset(path: str, rows: int, out: str) -> str:
    pq.write_table(pq.read_table(path).slice(0, rows), out)
    return out


def run_reference(ref_python: str, ckpt: str, inp: str, bs: int, device: str, dtype: str, seq: int, stride: int) -> dict:
    cmd = [ref_python, os.path.join(HERE, "reference_pipeline.py"), ckpt, inp, "--batch-size", str(bs),
           "--device", device, "--dtype", dtype, "--max-seq-len", str(seq), "--doc-stride", str(stride)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    # Where the old transformers lives in a path of its own rather than a venv (GPU machines).
    env.pop("PYTHONPATH", None)
    if os.environ.get("QA_BENCH_REF_PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["QA_BENCH_REF_PYTHONPATH"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"reference pipeline failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_qa_batch(ckpt: str, inp: str, out: str, device: str, seq: int, stride: int, extra: list[str]) -> dict:
    report = out + ".report.json"
    cmd = [sys.executable, "-m", "jobs.cli", "run", inp, "-o", out, "--overwrite", "--quiet", "--model", ckpt,
           "--device", device, "--max-seq-len", str(seq), "--doc-stride", str(stride), "--report", report, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    exported = {"onnxruntime", "openvino", "auto", "int8"} & set(extra)  # --quantize int8 runs ONNX Runtime's
    if exported:  # the export (once per checkpoint) is not part of the timed run; its compile (load_model) is shown
        warm = subprocess.run(cmd[:-len(extra) - 2] + ["--limit", "1", *extra], capture_output=True, text=True,
                              env=env, cwd=ROOT)
        if warm.returncode != 0:
            raise SystemExit(f"qa-batch failed:\n{warm.stderr[-3000:]}")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"qa-batch failed:\n{r.stderr[-3000:]}")
    with open(report) as f:
        rep = json.load(f)
    t = pq.read_table(out)
    rep["answers"] = list(zip(t["answer_start"].to_pylist(), t["answer_end"].to_pylist()))
    rep["seconds"] = rep["elapsed_s"] - rep["stage_seconds"].get("load_model", 0.0)
    return rep


NO_REFERENCE = {"rows": 0, "chunks": 0, "seconds": 0.0, "answers": [], "peak_rss_mb": None}  # --ref-python ''


def same_spans(a: list, b: list) -> float:
    """Share of rows whose answer has the same character offsets."""
    n = min(len(a), len(b))  # the reference may have answered only the first rows
    return sum(tuple(x) == tuple(y) for x, y in zip(a[:n], b[:n])) / max(n, 1)


def bare_loop(ckpt: str, inp: str, seq: int, stride: int, batch: int = 256) -> float:
    """Pre-tokenized, length-sorted batches, one fp16 forward each: the GPU's ceiling here."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForQuestionAnswering.from_pretrained(ckpt, dtype=torch.float16).cuda().eval()
    t = pq.read_table(inp)
    enc = tok(t["question"].to_pylist(), t["passage"].to_pylist(), truncation="only_second", max_length=seq,
              stride=stride, return_overflowing_tokens=True)
    ids = sorted(enc["input_ids"], key=len, reverse=True)
    batches = []
    for i in range(0, len(ids), batch):
        part = ids[i : i + batch]
        width = len(part[0])
        x = torch.zeros(len(part), width, dtype=torch.long)
        m = torch.zeros(len(part), width, dtype=torch.long)
        for j, row in enumerate(part):
            x[j, : len(row)] = torch.tensor(row)
            m[j, : len(row)] = 1
        batches.append((x.cuda(), m.cuda()))
    with torch.inference_mode():
        model(input_ids=batches[0][0], attention_mask=batches[0][1])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x, m in batches:
            model(input_ids=x, attention_mask=m)
        torch.cuda.synchronize()
    return len(ids) / (time.perf_counter() - t0)


def matmul_peak() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def forward_flops_per_chunk(size: str, tokens: float) -> float:
    s = SHAPES[size]
    h, f, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    per_layer = 2 * tokens * (4 * h * h + 2 * h * f) + 4 * tokens * tokens * h
    return layers * per_layer


def tokenization_benchmark(ckpt: str, inp: str, seq: int, stride: int) -> dict:
    """Chunker (each distinct text once) against encoding every pair on its own."""
    from transformers import AutoTokenizer

    from pipeline.stages.chunk import Chunker

    tok = AutoTokenizer.from_pretrained(ckpt)
    t = pq.read_table(inp)
    passages, questions = t["passage"].to_pylist(), t["question"].to_pylist()
    chunker = Chunker(tok, seq, stride)
    best_pair = best_ours = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        ref = [tok(q, p, truncation="only_second", max_length=seq, stride=stride,
                   return_overflowing_tokens=True, return_offsets_mapping=True) for q, p in zip(questions, passages)]
        best_pair = min(best_pair, time.perf_counter() - t0)
        t0 = time.perf_counter()
        cs = chunker(passages, questions)
        assembled = [cs.chunk_ids(c)[0] for c in range(len(cs))]  # counted: collate does this work
        best_ours = min(best_ours, time.perf_counter() - t0)
    flat_ref = [ids for enc in ref for ids in enc["input_ids"]]
    identical = flat_ref == [x.tolist() for x in assembled]
    return {"rows": len(questions), "chunks": len(cs), "pair_s": best_pair, "qa_batch_s": best_ours,
            "speedup": best_pair / best_ours, "identical_input_ids": identical}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default=None, help="small,base,large (default: small on CPU, base,large on CUDA)")
    ap.add_argument("--datasets", default="long,short")
    ap.add_argument("--rows", default=None, help="rows per dataset, e.g. long=24,short=200")
    ap.add_argument("--ref-rows", default=None,
                    help="rows the old pipeline answers per dataset (default: as --rows); on a GPU it is "
                         "30x slower, so fewer rows keep the run short while qa-batch gets enough to warm up")
    ap.add_argument("--ref-python", default=os.path.join(HERE, "work", "ref-venv", "bin", "python"),
                    help="Python of an environment with transformers==5.2.0 ('' to skip the old pipeline)")
    ap.add_argument("--ref-batch-sizes", default=None, help="default: 1,8,64 on CPU, 64 on CUDA")
    ap.add_argument("--variants", default=None,
                    help="extra qa-batch option sets, ';'-separated, e.g. '--dtype bfloat16;--quantize int8'")
    ap.add_argument("--squad", default=DEFAULT_SQUAD)
    ap.add_argument("--work", default=os.path.join(HERE, "work"))
    ap.add_argument("--max-seq-len", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--json", default=None, help="also write every measurement here")
    ap.add_argument("--quality", action="store_true",
                    help="also run benchmarks/quality.py on the trained model with the same --variants "
                         "(F1 and same-span share against float32; --quality-args passes it more options)")
    ap.add_argument("--quality-args", default="", help="extra options for benchmarks/quality.py, e.g. '--settings paragraphs'")
    args = ap.parse_args()
    os.environ.setdefault("QA_BATCH_CACHE", os.path.join(args.work, "onnx-cache"))  # --backend onnxruntime exports
    if args.ref_python and not os.path.exists(args.ref_python):
        raise SystemExit(f"--ref-python {args.ref_python} does not exist: make it (BENCHMARKS.md, How to run) "
                         "or pass --ref-python '' to skip the old pipeline")

    cuda = args.device == "cuda"
    sizes = (args.sizes or ("base,large" if cuda else "small")).split(",")
    ref_bs = [int(b) for b in (args.ref_batch_sizes or ("64" if cuda else "1,8,64")).split(",")]
    rows = dict(kv.split("=") for kv in (args.rows or ("long=200,short=626" if cuda else "long=24,short=200")).split(","))
    ref_rows = {**rows, **dict(kv.split("=") for kv in args.ref_rows.split(","))} if args.ref_rows else rows
    variants = [v.split() for v in args.variants.split(";")] if args.variants else []
    seq, stride = args.max_seq_len, args.doc_stride
    dtype = "float16" if cuda else "float32"

    inputs = build_inputs(args.squad, args.work)
    results = {"device": device_name(args.device), "date": dt.date.today().isoformat(), "runs": []}
    if cuda:
        results["matmul_peak_tflops"] = matmul_peak()
    small_ckpt = make_checkpoint(args.work, sizes[0])
    results["tokenization"] = tokenization_benchmark(small_ckpt, inputs["manyq"], seq, stride)
    print(json.dumps(results["tokenization"]), flush=True)

    for size in sizes:
        ckpt = make_checkpoint(args.work, size)
        for ds in args.datasets.split(","):
            inp = subset(inputs[ds], int(rows[ds]), os.path.join(args.work, f"{ds}-{rows[ds]}.parquet"))
            ref_inp = subset(inputs[ds], int(ref_rows[ds]), os.path.join(args.work, f"{ds}-{ref_rows[ds]}.parquet"))
            refs = {bs: run_reference(args.ref_python, ckpt, ref_inp, bs, args.device, dtype, seq, stride)
                    for bs in ref_bs} if args.ref_python else {}
            best_bs = max(refs, key=lambda b: refs[b]["rows"] / refs[b]["seconds"]) if refs else None
            ref = refs[best_bs] if refs else NO_REFERENCE
            float32_answers = None
            for extra in [[]] + variants:
                ours = run_qa_batch(ckpt, inp, os.path.join(args.work, f"out-{size}-{ds}.parquet"),
                                    args.device, seq, stride, extra)
                agree = same_spans(ours["answers"], ref["answers"]) if refs else None
                float32_answers = float32_answers or ours["answers"]
                run = {
                    "size": size, "dataset": ds, "variant": " ".join(extra) or "default", "rows": ours["rows"],
                    "ref_rows": ref["rows"], "chunks": ours["chunks"], "ref_batch_size": best_bs,
                    "ref_rows_per_s": {b: r["rows"] / r["seconds"] for b, r in refs.items()},
                    "ref_chunks_per_s": ref["chunks"] / ref["seconds"] if refs else None,
                    "ref_peak_rss_mb": ref["peak_rss_mb"],
                    "qa_rows_per_s": ours["rows"] / ours["seconds"], "qa_chunks_per_s": ours["chunks"] / ours["seconds"],
                    # chunks/s: equal to the rows/s ratio on the same rows, and fair when the old
                    # pipeline answered only the first rows (they need a different number of chunks)
                    "ratio": (ours["chunks"] / ours["seconds"]) / (ref["chunks"] / ref["seconds"]) if refs else None,
                    "agreement": agree, "agreement_vs_default": same_spans(ours["answers"], float32_answers),
                    "padding_efficiency": ours["padding_efficiency"],
                    "stage_seconds": ours["stage_seconds"], "bottleneck": ours.get("bottleneck", ""), "qa_peak_rss_mb": ours.get("peak_rss_mb"),
                }
                if cuda and not extra:
                    run["bare_chunks_per_s"] = bare_loop(ckpt, inp, seq, stride)
                    mean_len = seq  # upper bound on tokens per chunk; long documents fill it
                    run["mfu"] = run["qa_chunks_per_s"] * forward_flops_per_chunk(size, mean_len) / 1e12 \
                        / results["matmul_peak_tflops"]
                results["runs"].append(run)
                print(json.dumps(run), flush=True)

    table = markdown(results, cuda)
    print(table, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not args.no_append:
        with open(os.path.join(ROOT, "BENCHMARKS.md"), "a") as f:
            f.write("\n" + table + "\n")
    if args.quality:  # the same variants on trained weights: F1 and same-span share against float32
        cmd = [sys.executable, os.path.join(HERE, "quality.py"), "--steps", "quality", "--squad", args.squad,
               "--variants", args.variants or "", "--ref-python", args.ref_python,
               *(["--append"] if not args.no_append else []), *args.quality_args.split()]
        subprocess.run(cmd, check=True, cwd=ROOT)


def markdown(results: dict, cuda: bool) -> str:
    lines = [f"### {results['device']} — {results['date']}", ""]
    if cuda:
        lines.append(f"Measured bf16 matmul peak: {results['matmul_peak_tflops']:.0f} TFLOP/s.")
    tk = results["tokenization"]
    lines.append(f"Tokenization, 10 questions per paragraph ({tk['rows']} rows, {tk['chunks']} chunks): "
                 f"each pair encoded {tk['pair_s'] * 1000:.0f} ms, qa-batch {tk['qa_batch_s'] * 1000:.0f} ms, "
                 f"{tk['speedup']:.1f}x; identical input_ids: {tk['identical_input_ids']}.")
    lines.append("")
    head = ("| model | data | qa-batch variant | rows (old pipeline's) | chunks | old pipeline rows/s by batch size | old chunks/s (best) "
            "| qa-batch rows/s | qa-batch chunks/s | ratio | same span as old / as default | padding eff. | stage share (s) | bottleneck | peak RSS old / qa-batch (MB) |")
    if cuda:
        head += " bare loop chunks/s | qa-batch / bare | MFU |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results["runs"]:
        refs = ", ".join(f"{b}: {v:.2f}" for b, v in r["ref_rows_per_s"].items()) or "—"
        ref_chunks = "—" if r["ref_chunks_per_s"] is None else f"{r['ref_chunks_per_s']:.1f}"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        agree = "—" if r["agreement"] is None else f"{r['agreement'] * 100:.0f}%"
        ref_rss = "—" if r["ref_peak_rss_mb"] is None else f"{r['ref_peak_rss_mb']:.0f}"
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items() if v >= 0.05)
        line = (f"| {r['size']} | {r['dataset']} | {r['variant']} | {r['rows']} ({r['ref_rows']}) | {r['chunks']} | {refs} | "
                f"{ref_chunks} | {r['qa_rows_per_s']:.2f} | {r['qa_chunks_per_s']:.1f} | "
                f"{ratio} | {agree} / {r['agreement_vs_default'] * 100:.0f}% | {r['padding_efficiency']:.2f} | {stages} | "
                f"{r.get('bottleneck', '')} | {ref_rss} / {r['qa_peak_rss_mb'] or 0:.0f} |")
        if cuda:
            if "bare_chunks_per_s" in r:
                line += (f" {r['bare_chunks_per_s']:.0f} | {r['qa_chunks_per_s'] / r['bare_chunks_per_s'] * 100:.0f}% | "
                         f"{r['mfu'] * 100:.0f}% |")
            else:
                line += " | | |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
