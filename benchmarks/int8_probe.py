"""Where --quantize int8 loses answers: logit error of dynamic int8 variants against float32.

    python benchmarks/int8_probe.py [--rows 48] [--sweep]

The trained model (../shared/models/minilm-squad2) on the first --rows SQuAD 2.0 dev
paragraphs, one chunk each, one thread. For each variant: the mean and largest absolute
change of the start/end logits over real tokens, and the share of rows whose best start
token and best end token both stay float32's. --sweep also quantizes one linear layer at a
time (per-channel) and lists the layers by the error they add alone.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import torch
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "..", "shared", "models", "minilm-squad2")
SQUAD = os.path.join(HERE, "..", "..", "shared", "data", "squad_v2_dev_2articles.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import sys

    sys.path.insert(0, os.path.dirname(HERE))
    from pipeline.quality.squad import squad_rows

    rows = squad_rows(SQUAD)[: args.rows]
    tok = AutoTokenizer.from_pretrained(args.model)
    enc = tok([r["question"] for r in rows], [r["passage"] for r in rows], truncation="only_second",
              max_length=384, padding=True, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    base = AutoModelForQuestionAnswering.from_pretrained(args.model).eval()

    def logits(model):
        with torch.inference_mode():
            outs = [model(**{k: v[i:i + 16] for k, v in enc.items()}) for i in range(0, len(mask), 16)]
        return torch.cat([o.start_logits for o in outs]), torch.cat([o.end_logits for o in outs])

    s0, e0 = logits(base)

    def best(x):
        return x.masked_fill(~mask, -1e9).argmax(1)

    def report(name, model):
        t0 = time.perf_counter()
        s, e = logits(model)
        d = torch.cat([(s - s0)[mask].abs(), (e - e0)[mask].abs()])
        same = ((best(s) == best(s0)) & (best(e) == best(e0))).float().mean()
        print(f"| {name} | {float(d.mean()):.3f} | {float(d.max()):.2f} | {100 * float(same):.0f}% | "
              f"{time.perf_counter() - t0:.1f} |", flush=True)

    def quantized(qconfig, keep=lambda n: False):
        m = copy.deepcopy(base)
        spec = {n: qconfig for n, mod in m.named_modules()
                if isinstance(mod, torch.nn.Linear) and not n.endswith("qa_outputs") and not keep(n)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(m, spec, dtype=torch.qint8)

    def ffn(n, layers):
        return any(f"layer.{i}." in n for i in layers) and (
            "intermediate" in n or (n.endswith("output.dense") and "attention" not in n))

    print(f"{len(rows)} paragraphs, quantized engine {torch.backends.quantized.engine}\n")
    print("| variant | mean abs logit change | largest | same best start and end | seconds |\n|---|---:|---:|---:|---:|")
    report("float32", base)
    report("int8, one weight scale per matrix (before)", quantized(default_dynamic_qconfig))
    report("int8, one weight scale per output channel (now)", quantized(per_channel_dynamic_qconfig))
    report("… and feed-forward blocks of layers 0-2 in float32", quantized(per_channel_dynamic_qconfig,
                                                                         lambda n: ffn(n, range(3))))
    report("… and every feed-forward block in float32", quantized(per_channel_dynamic_qconfig,
                                                                  lambda n: ffn(n, range(99))))
    if args.sweep:
        names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("qa_outputs")]
        errors = []
        for n in names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = quantize_dynamic(copy.deepcopy(base), {n: per_channel_dynamic_qconfig}, dtype=torch.qint8)
            s, e = logits(m)
            errors.append((float(torch.cat([(s - s0)[mask].abs(), (e - e0)[mask].abs()]).mean()), n))
        print("\nmean abs logit change with only this layer in int8:")
        for err, n in sorted(errors, reverse=True):
            print(f"  {err:.4f}  {n}")


if __name__ == "__main__":
    main()
