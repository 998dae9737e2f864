"""CPU engines side by side on the same chunks: which one runs a QA encoder fastest at float32's logits.

    python benchmarks/cpu_engines.py                 # the trained MiniLM, one thread, Markdown on stdout
    python benchmarks/cpu_engines.py --threads 2

Issue 21 asked for the attention fused into one kernel on the CPU and for the engines made for
that to be measured on the same chunks before any becomes a backend. This script measures the
forward pass alone (no tokenizing, span search or writing: `benchmarks/run.py` times whole runs)
over the same real chunks, padded to one length, in batches of 16:

- PyTorch float32 (SDPA attention), bfloat16 and dynamic int8 (`quantize_dynamic`);
- ONNX Runtime float32 on qa-batch's export, and on that export passed through
  `onnxruntime.transformers.optimizer` (model_type bert), whose fusion statistics are printed
  (Attention 0: it does not match transformers 5's attention); ONNX Runtime dynamic int8;
- OpenVINO float32 and bfloat16 (precision hints) on the same export, and int8 by NNCF's
  post-training quantization (calibrated on 64 of the chunks: a number for what static int8
  could reach, not a path qa-batch offers);
- CTranslate2's encoder (float32, int8) with the QA head applied to its hidden states.

Each family (PyTorch, ONNX Runtime, OpenVINO, CTranslate2) runs in a process of its own: engines
left loaded in one process (thread pools, allocators) slowed the next ones by up to 2x.

Each line: chunks/s, the speed over PyTorch float32, the share of chunks whose best start and end
tokens are PyTorch float32's, and the largest start-logit difference. Engines not installed are
skipped (pip install openvino nncf ctranslate2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "..", "..", "shared", "models", "minilm-squad2")
DEFAULT_SQUAD = os.path.join(HERE, "..", "..", "shared", "data", "squad_v2_dev_2articles.json")
NAMES = ("input_ids", "attention_mask", "token_type_ids")


def chunks(model_dir: str, squad: str, seq: int, stride: int, per_article: int):
    """Questions asked of their whole article (paragraphs joined): many overlapping chunks each."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    qs, ctxs = [], []
    for art in json.load(open(squad))["data"]:
        text = " ".join(p["context"] for p in art["paragraphs"])
        asked = [qa["question"] for p in art["paragraphs"] for qa in p["qas"]][:per_article]
        qs += asked
        ctxs += [text] * len(asked)
    enc = tok(qs, ctxs, truncation="only_second", max_length=seq, stride=stride, return_overflowing_tokens=True,
              padding="max_length", return_tensors="np")
    return [enc[n].astype(np.int64) for n in NAMES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--squad", default=DEFAULT_SQUAD)
    ap.add_argument("--threads", type=int, default=1, help="threads per engine (qa-batch's CPU workers use one each)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--per-article", type=int, default=6, help="questions per article")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # torch|ort|ov|ct2, in a process of its own
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--export", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.only is None:
        return compare(args)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForQuestionAnswering

    ids, mask, types = chunks(args.model, args.squad, 384, 128, args.per_article)
    n = len(ids) // args.batch * args.batch
    batches = [tuple(x[i:i + args.batch] for x in (ids, mask, types)) for i in range(0, n, args.batch)]
    work = tempfile.mkdtemp(prefix="cpu-engines-")
    results = []
    export = args.export

    def bench(name, fn):
        fn(*batches[0])  # warm-up: first-call allocations, kernel selection
        t = time.perf_counter()
        outs = [fn(*b) for b in batches]
        dt = time.perf_counter() - t
        results.append((name, n / dt, np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])))
        print(f"  {name}: {n / dt:.1f} chunks/s", file=sys.stderr)

    def torch_fn(m):
        def f(a, b, c):
            with torch.inference_mode():
                o = m(input_ids=torch.from_numpy(a), attention_mask=torch.from_numpy(b), token_type_ids=torch.from_numpy(c))
            return o.start_logits.float().numpy(), o.end_logits.float().numpy()
        return f

    model = AutoModelForQuestionAnswering.from_pretrained(args.model, dtype=torch.float32).eval()
    if args.only == "torch":
        bench("PyTorch float32 (SDPA)", torch_fn(model))
        bench("PyTorch bfloat16", torch_fn(AutoModelForQuestionAnswering.from_pretrained(args.model,
                                                                                      dtype=torch.bfloat16).eval()))
        bench("PyTorch dynamic int8", torch_fn(torch.ao.quantization.quantize_dynamic(
            AutoModelForQuestionAnswering.from_pretrained(args.model, dtype=torch.float32).eval(), {torch.nn.Linear},
            dtype=torch.qint8)))

    if args.only == "ort":
        import onnxruntime as ort

        from pipeline.config import RunConfig
        from pipeline.models import onnx_backend
        from pipeline.models.checkpoint import load_model

        def ort_fn(path):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = args.threads, 1, 3
            s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            return lambda a, b, c: tuple(s.run(["start_logits", "end_logits"], dict(zip(NAMES, (a, b, c)))))

        bench("ONNX Runtime float32 (qa-batch's export)", ort_fn(export))
        from onnxruntime.transformers.optimizer import optimize_model

        cfg = model.config
        opt = optimize_model(export, model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size)
        stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        print(f"  onnxruntime.transformers.optimizer fusions: {stats}", file=sys.stderr)
        opt.save_model_to_file(os.path.join(work, "optimized.onnx"))
        bench(f"ONNX Runtime float32, transformers optimizer (Attention fused: {stats.get('Attention', 0)})",
              ort_fn(os.path.join(work, "optimized.onnx")))
        q = onnx_backend.prepared(load_model(args.model, "cpu"),
                                  RunConfig(inputs=(), backend="onnxruntime", quantize="int8"))  # from the cache
        bench("ONNX Runtime dynamic int8 (qa-batch's --quantize int8)", ort_fn(q.model.path))

    if args.only == "ov":
        import openvino as ov

        core = ov.Core()

        def ov_fn(m, hint):
            c = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": args.threads,
                                              "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False})
            r = c.create_infer_request()
            outs = [c.output("start_logits"), c.output("end_logits")]
            def f(a, b, cc):
                got = r.infer(dict(zip(NAMES, (a, b, cc))))  # once: its buffers are reused by the next call
                return tuple(got[p].copy() for p in outs)
            return f

        bench("OpenVINO float32 (qa-batch's --backend openvino)", ov_fn(core.read_model(export), "f32"))
        bench("OpenVINO bfloat16 (--backend openvino --dtype bfloat16)", ov_fn(core.read_model(export), "bf16"))
        if importlib.util.find_spec("nncf") is not None:
            import nncf

            calib = [dict(zip(NAMES, (ids[i:i + 4], mask[i:i + 4], types[i:i + 4]))) for i in range(0, 64, 4)]
            q = nncf.quantize(core.read_model(export), nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calib))
            bench("OpenVINO static int8 (NNCF, 64 calibration chunks; not offered)", ov_fn(q, "f32"))

    if args.only == "ct2":
        import ctranslate2
        from ctranslate2.converters import TransformersConverter

        out = os.path.join(work, "ct2")
        try:
            TransformersConverter(args.model).convert(out, force=True)
        except Exception as e:  # converters follow transformers releases with a delay
            print(f"  CTranslate2 cannot convert {args.model}: {e}", file=sys.stderr)
            out = None
        head_w = model.qa_outputs.weight.detach().numpy()
        head_b = model.qa_outputs.bias.detach().numpy()
        for compute in ("float32", "int8") if out else ():
            enc = ctranslate2.Encoder(out, device="cpu", intra_threads=args.threads, compute_type=compute)

            def ct2_fn(a, b, c, enc=enc):
                lens = b.sum(1)
                hidden = np.array(enc.forward_batch([r[:k].tolist() for r, k in zip(a, lens)],
                                                    token_type_ids=[r[:k].tolist() for r, k in zip(c, lens)])
                                  .last_hidden_state, dtype=np.float32)
                logits = np.zeros((len(a), a.shape[1], 2), np.float32)
                logits[:, :hidden.shape[1]] = hidden @ head_w.T + head_b
                return logits[..., 0], logits[..., 1]

            bench(f"CTranslate2 encoder {compute} (QA head in NumPy)", ct2_fn)

    shutil.rmtree(work, ignore_errors=True)
    np.savez(args.out, names=np.array([r[0] for r in results]), cps=np.array([r[1] for r in results]),
             **{f"s{i}": r[2] for i, r in enumerate(results)}, **{f"e{i}": r[3] for i, r in enumerate(results)})


def compare(args) -> None:
    """Every family in its own process, then one table against PyTorch float32."""
    import subprocess

    from pipeline.config import RunConfig
    from pipeline.models import onnx_backend
    from pipeline.models.checkpoint import load_model

    work = tempfile.mkdtemp(prefix="cpu-engines-")
    os.environ["QA_BATCH_CACHE"] = os.path.join(work, "cache")
    families = ["torch"]
    export = None
    if importlib.util.find_spec("onnxruntime") is not None:  # qa-batch's export, also int8, made once
        export = onnx_backend.prepared(load_model(args.model, "cpu"), RunConfig(inputs=(), backend="onnxruntime")).model.path
        onnx_backend.prepared(load_model(args.model, "cpu"), RunConfig(inputs=(), backend="onnxruntime", quantize="int8"))
        families.append("ort")
        if importlib.util.find_spec("openvino") is not None:
            families.append("ov")
    if importlib.util.find_spec("ctranslate2") is not None:
        families.append("ct2")
    results = []
    for family in families:
        out = os.path.join(work, f"{family}.npz")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--only", family, "--out", out,
                        "--model", args.model, "--squad", args.squad, "--threads", str(args.threads),
                        "--batch", str(args.batch), "--per-article", str(args.per_article),
                        *(["--export", export] if export else [])], check=True, env=os.environ)
        got = np.load(out)
        results += [(str(name), float(got["cps"][i]), got[f"s{i}"], got[f"e{i}"]) for i, name in enumerate(got["names"])]
    ids, mask, types = chunks(args.model, args.squad, 384, 128, args.per_article)
    n = len(ids) // args.batch * args.batch
    shutil.rmtree(work, ignore_errors=True)

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "CPU")
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    print(f"\n{cpu}, {os.cpu_count()} cores ({'AMX' if 'amx_bf16' in flags else 'no AMX'}), {args.threads} thread(s), "
          f"{n} chunks of 384 tokens in batches of {args.batch}, torch {torch.__version__}\n")
    print("| engine | chunks/s | vs PyTorch float32 | same best start and end | max start-logit difference |")
    print("|---|---:|---:|---:|---:|")
    valid = mask[:n].astype(bool)
    _, base_cps, base_s, base_e = results[0]

    def best(x):
        return np.where(valid, x, -1e9).argmax(1)

    for name, cps, s, e in results:
        same = np.mean((best(s) == best(base_s)) & (best(e) == best(base_e)))
        diff = float(np.abs(np.where(valid, s - base_s, 0)).max())
        print(f"| {name} | {cps:.1f} | {cps / base_cps:.2f}x | {same:.1%} | {diff:.1e} |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()
