"""Answer quality with a trained model: qa-batch, the old pipeline, the faster paths, calibration.

    python benchmarks/quality.py                   # everything below on the CPU; tables on stdout
    python benchmarks/quality.py --append          # also append them to BENCHMARKS.md

The model is `../shared/models/minilm-squad2` (trained weights: random ones give near-tie
logits, which say little about answers), the data the two SQuAD 2.0 dev articles of
`../shared/data/squad_v2_dev_2articles.json` in two settings: **paragraphs** (each question
asked of its own paragraph, one chunk) and **articles** (of its whole article, paragraphs
joined: about 22 chunks a row). Every run uses max_seq_len 384, stride 128, answers of at
most 30 tokens and allows "no answer"; everything is scored by `qa-batch eval` (official
SQuAD 2.0 EM/F1, split into has-answer and no-answer rows).

1. qa-batch float32 (`--allow-null --top-k 2`: the second span changes nothing but lets
   eval search the null threshold and fit a calibration over every row).
2. The old transformers 5.2 `QuestionAnsweringPipeline` on the same model, inputs and
   lengths (`handle_impossible_answer=True`, its default `align_to_words=True`), in its own
   environment (`--ref-python`), scored the same way.
3. Each `--variants` entry (faster paths: `--dtype bfloat16`, `--quantize int8`): F1 and
   the share of rows whose answer (span or null) is the float32 answer.
4. Calibration, per setting: `qa-batch eval --fit-calibration` on one article, then
   `qa-batch eval --calibration` on the other (ECE, Brier and F1 before and after), and the
   reverse; on paragraphs `qa-batch run --calibration` is also run on the held-out article
   and must give the figures eval computed offline.
5. Transfer (`--steps transfer`, after step 4): why a calibration fitted on one article does or
   does not carry to the other. Under the fitted article's null bias, the share of right
   answers among null answers and among span answers in each article (rows a calibrator
   cannot tell apart, right at different rates, bound what it can reach), and the same fit
   and check with no null bias (every question answered), where the model's span scores rank.
6. Documents (`--steps documents`): every question of an article asked of that article as
   one document made of its paragraphs (`--document-col`, one row per question and
   paragraph) against the same article as one long passage: F1, HasAns F1 and answers per
   second, side by side.

Quality figures are not timing-sensitive: others may use the machine meanwhile.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared")
DEFAULT_MODEL = os.path.join(SHARED, "models", "minilm-squad2")
DEFAULT_SQUAD = os.path.join(SHARED, "data", "squad_v2_dev_2articles.json")
LENGTHS = ["--max-seq-len", "384", "--doc-stride", "128", "--max-answer-len", "30"]
SETTINGS = ("paragraphs", "articles")


def qa_batch(args: argparse.Namespace, *cli: str) -> subprocess.CompletedProcess:
    """`qa-batch ...` as a user runs it, from --qa-root (a clean checkout keeps long runs safe)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": args.qa_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "jobs.cli", *cli], capture_output=True, text=True, env=env,
                       cwd=args.qa_root)
    if r.returncode != 0:
        raise SystemExit(f"qa-batch {' '.join(cli[:1])} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def evaluate(args, answers: str, gold: str, *extra: str) -> dict:
    out = answers + ".eval.json"
    qa_batch(args, "eval", answers, gold, "--json", out, *extra)
    with open(out) as f:
        return json.load(f)


def build_inputs(args) -> dict[str, str]:
    from pipeline.quality.squad import convert

    gold = {}
    for setting in SETTINGS:
        path = os.path.join(args.work, f"gold-{setting}.parquet")
        if not os.path.exists(path):
            convert(args.squad, path, join_article=setting == "articles")
        gold[setting] = path
    return gold


def run_qa_batch(args, setting: str, gold: str, name: str, extra: list[str]) -> str:
    suffix = "" if gold.endswith(f"gold-{setting}.parquet") else "-" + gold.rsplit("-", 1)[-1].removesuffix(".parquet")
    out = os.path.join(args.work, f"answers-{setting}-{name}{suffix}.parquet")
    if not (args.reuse and os.path.exists(out)):
        qa_batch(args, "run", gold, "-o", out, "--overwrite", "--quiet", "--model", args.model, "--device", args.device,
                 "--allow-null", "--top-k", "2", "--keep-columns", "title", *LENGTHS, *extra)
    return out


def run_reference(args, setting: str, gold: str) -> str:
    """The old pipeline's answers as a qa-batch-like table (id, title, answer, offsets, score)."""
    suffix = "" if gold.endswith(f"gold-{setting}.parquet") else "-" + gold.rsplit("-", 1)[-1].removesuffix(".parquet")
    out = os.path.join(args.work, f"answers-{setting}-old{suffix}.parquet")
    if args.reuse and os.path.exists(out):
        return out
    cmd = [args.ref_python, os.path.join(HERE, "reference_pipeline.py"), args.model, gold, "--batch-size", "8",
           "--handle-impossible-answer", "--align-to-words", *LENGTHS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"the old pipeline failed:\n{r.stderr[-3000:]}")
    ref = json.loads(r.stdout.strip().splitlines()[-1])
    g = pq.read_table(gold)
    null = [t == "" for t in ref["texts"]]
    pq.write_table(pa.table({
        "id": g["id"], "title": g["title"],
        "answer": pa.array([None if n else t for t, n in zip(ref["texts"], null)], pa.large_string()),
        "answer_start": pa.array([None if n else s for (s, _), n in zip(ref["answers"], null)], pa.int64()),
        "answer_end": pa.array([None if n else e for (_, e), n in zip(ref["answers"], null)], pa.int64()),
        "old_pipeline_score": pa.array(ref["scores"], pa.float32()),
    }), out)
    return out


def spans(path: str) -> dict:
    t = pq.read_table(path, columns=["id", "answer_start", "answer_end"])
    return dict(zip(t["id"].to_pylist(), zip(t["answer_start"].to_pylist(), t["answer_end"].to_pylist())))


def same_span(a: str, b: str) -> float:
    """Share of a's rows whose answer is b's: the same character span, or both null."""
    x, y = spans(a), spans(b)
    return sum(y.get(i) == v for i, v in x.items()) / max(len(x), 1)


def every_kth(gold: str, k: int) -> str:
    """Every k-th row of a gold table (both articles), for the slow runs on whole articles."""
    if k <= 1:
        return gold
    out = gold.replace(".parquet", f"-every{k}.parquet")
    t = pq.read_table(gold)
    pq.write_table(t.take(list(range(0, t.num_rows, k))), out)
    return out


def split_by_title(path: str, title: str, out: str) -> str:
    """The rows of one article, keeping the file's qa-batch metadata (model, options)."""
    t = pq.read_table(path)
    meta = pq.read_metadata(path).metadata or {}
    kept = {k: v for k, v in meta.items() if k == b"qa_batch"}
    pq.write_table(t.filter(pc.equal(t["title"], title)).replace_schema_metadata(kept or None), out)
    return out


def quality(args, gold: dict) -> dict:
    results = {}
    for setting in args.settings:
        res = results[setting] = {}
        base = run_qa_batch(args, setting, gold[setting], "float32", ["--dtype", "float32"])
        res["qa-batch"] = evaluate(args, base, gold[setting])
        k = args.articles_every if setting == "articles" else 1
        part = every_kth(gold[setting], k)  # the slow runs answer every k-th row; float32 is scored on them too
        if k > 1:
            res[f"qa-batch, every {k}th row"] = evaluate(args, base, part)
        if args.ref_python:
            old = run_reference(args, setting, part)
            res["old pipeline"] = evaluate(args, old, part)
            res["old pipeline"]["same_span_as_float32"] = same_span(old, base)
        for variant in args.variants:
            name = variant.strip("-").replace(" ", "-")
            path = run_qa_batch(args, setting, part, name, variant.split())
            res[variant] = evaluate(args, path, part)
            res[variant]["same_span_as_float32"] = same_span(path, base)
    return results


def calibration(args, gold: dict) -> dict:
    results = {}
    for setting in args.settings:
        answers = os.path.join(args.work, f"answers-{setting}-float32.parquet")
        titles = sorted(set(pq.read_table(gold[setting], columns=["title"])["title"].to_pylist()))
        parts = {}
        for t in titles:
            parts[t] = (split_by_title(answers, t, os.path.join(args.work, f"answers-{setting}-{t}.parquet")),
                        split_by_title(gold[setting], t, os.path.join(args.work, f"gold-{setting}-{t}.parquet")))
        res = results[setting] = []
        for fit_on in titles:
            for test_on in titles:
                if test_on == fit_on:
                    continue
                cal = os.path.join(args.work, f"calibration-{setting}-{fit_on}.json")
                qa_batch(args, "eval", *parts[fit_on], "--fit-calibration", cal)
                with open(cal) as f:
                    fitted = json.load(f)
                held_out = evaluate(args, *parts[test_on], "--calibration", cal,
                                    "--plot", os.path.join(args.work, f"reliability-{setting}-{test_on}.png"))
                row = {"fit_on": fit_on, "test_on": test_on, "fit_rows": fitted["fitted_on"]["rows"],
                       "null_bias": fitted["null_bias"], "fit": fitted["metrics"],
                       "test_rows": held_out["rows_matched"], "test": held_out["calibration"]}
                if setting == "paragraphs":  # the run path must give what eval computed offline
                    out = os.path.join(args.work, f"answers-{setting}-{test_on}-calibrated.parquet")
                    qa_batch(args, "run", parts[test_on][1], "-o", out, "--overwrite", "--quiet", "--model",
                             args.model, "--device", args.device, "--dtype", "float32", "--top-k", "2", *LENGTHS,
                             "--calibration", cal)
                    ran = evaluate(args, out, parts[test_on][1])
                    row["run_with_calibration"] = {"ece": ran["ece"], "brier": ran["brier"], "f1": ran["f1"]}
                res.append(row)
    return results


def transfer(args) -> dict:
    """Step 5: per setting and direction, what carries from the fitted article to the other."""
    sys.path.insert(0, args.qa_root)
    from pipeline.quality import calibrate as cal, evaluate as ev

    results = {}
    for setting in args.settings:
        titles = sorted(n[len(f"gold-{setting}-"):-len(".parquet")] for n in os.listdir(args.work)
                        if n.startswith(f"gold-{setting}-") and n.endswith(".parquet"))
        labelled = {}
        for t in titles:
            report = ev.evaluate(os.path.join(args.work, f"answers-{setting}-{t}.parquet"),
                                 os.path.join(args.work, f"gold-{setting}-{t}.parquet"))
            rows, logits = ev._row_logits(report, "transfer")
            has, span_f1, _, _ = ev._labels(rows)
            labelled[t] = (ev.best_f1_threshold(report), logits, has, span_f1)
        res = results[setting] = []
        for fit_on in titles:
            for test_on in [t for t in titles if t != fit_on]:
                bias = labelled[fit_on][0]
                row = {"fit_on": fit_on, "test_on": test_on, "null_bias": bias}
                for name, b in (("with_null_bias", bias), ("every_question_answered", None)):
                    out = row[name] = {}
                    for side, t in (("fit", fit_on), ("test", test_on)):
                        _, logits, has, span_f1 = labelled[t]
                        null = cal.is_null(logits, b)
                        right = cal.correct(null, has, span_f1)
                        out[side] = {"rows": int(len(right)), "right": round(float(right.mean()), 4),
                                     "null_answers": round(float(null.mean()), 4),
                                     "right_of_null": round(float(right[null].mean()), 4) if null.any() else None,
                                     "right_of_spans": round(float(right[~null].mean()), 4) if (~null).any() else None}
                    _, logits, has, span_f1 = labelled[fit_on]
                    fitted = cal.fit(logits, has, span_f1, b, model={}, options={},
                                     confidence_before=cal.softmax_share(logits, b),
                                     null_before=cal.is_null(logits, b), fitted_on={})
                    _, logits, has, span_f1 = labelled[test_on]
                    held = cal.compare(fitted, logits, has, span_f1, cal.softmax_share(logits, b),
                                       cal.is_null(logits, b))
                    out["calibrator"] = fitted.calibrator
                    out["held_out"] = {k: {m: held[k][m] for m in ("ece", "brier", "auc", "spread")}
                                       for k in ("null_bias_only", "after")}
                res.append(row)
    return results


def pages_input(args) -> str:
    """Every question of an article asked of the article as one document of its paragraphs: one row
    per (question, paragraph), the document key the question's id (so eval joins on it)."""
    import json as _json

    path = os.path.join(args.work, "pages.parquet")
    if os.path.exists(path):
        return path
    with open(args.squad) as f:
        data = _json.load(f)["data"]
    rows = {"id": [], "page": [], "passage": [], "question": []}
    for article in data:
        paragraphs = [p["context"] for p in article["paragraphs"]]
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                for i, text in enumerate(paragraphs):
                    rows["id"].append(qa["id"])
                    rows["page"].append(f"{article['title']}#{i}")
                    rows["passage"].append(text)
                    rows["question"].append(qa["question"])
    pq.write_table(pa.table(rows), path)
    return path


def documents(args, gold: dict) -> dict:
    """Issue 23's measure: an article as one document of paragraphs (--document-col) against the
    same article as one long passage; F1, HasAns F1, answers per second (the whole process)."""
    out = {}
    runs = {"one long passage (articles)": (gold["articles"], []),
            "a document of paragraphs (--document-col)": (pages_input(args), ["--document-col", "id", "--id-col", "page"])}
    for name, (source, extra) in runs.items():
        answers = os.path.join(args.work, f"answers-documents-{len(out)}.parquet")
        report = answers + ".report.json"
        if not (args.reuse and os.path.exists(report)):
            qa_batch(args, "run", source, "-o", answers, "--overwrite", "--quiet", "--model", args.model, "--device",
                     args.device, "--allow-null", "--report", report, *LENGTHS, *extra)
        with open(report) as f:
            rep = json.load(f)
        ev = evaluate(args, answers, gold["articles"])
        answered = rep["documents"] or rep["rows"]
        out[name] = {"rows": rep["rows"], "chunks": rep["chunks"], "answers": answered, "elapsed_s": rep["elapsed_s"],
                     "answers_per_s": round(answered / rep["elapsed_s"], 2), "f1": ev["f1"],
                     "has_answer_f1": ev["has_answer"]["f1"], "no_answer_exact": ev["no_answer"]["exact"],
                     "peak_rss_mb": rep["peak_rss_mb"]}
    return out


def pct(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def markdown(quality_res: dict, cal_res: dict, args, doc_res: dict | None = None) -> str:
    lines = [f"### {args.device_name}, {dt.date.today().isoformat()} (commit {args.commit})", ""]
    if doc_res:
        lines += ["| every question of an article asked of | rows | chunks | answers | F1 | HasAns F1 | NoAns EM | "
                  "answers/s | peak RSS |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in doc_res.items():
            lines.append(f"| {name} | {r['rows']:,} | {r['chunks']:,} | {r['answers']} | {pct(r['f1'])} | "
                         f"{pct(r['has_answer_f1'])} | {pct(r['no_answer_exact'])} | {r['answers_per_s']:.2f} | "
                         f"{r['peak_rss_mb']:.0f} MB |")
        lines.append("")
    if quality_res:
        lines += ["| setting | system | EM | F1 | HasAns EM / F1 | NoAns EM | best F1 (threshold) | "
                  "same span as float32 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for setting, res in quality_res.items():
            for system, r in res.items():
                same = r.get("same_span_as_float32")
                best = (f"{r['best_f1']:.2f} ({r['best_f1_threshold']:.2f})" if r.get("best_f1") is not None
                        else "—")
                lines.append(
                    f"| {setting} | {'qa-batch float32' if system == 'qa-batch' else system} | {pct(r['exact'])} | "
                    f"{pct(r['f1'])} | {pct(r['has_answer']['exact'])} / {pct(r['has_answer']['f1'])} | "
                    f"{pct(r['no_answer']['exact'])} | {best} | "
                    f"{'—' if same is None else f'{100 * same:.1f}%'} |")
        lines.append("")
    if cal_res:
        lines += ["| setting | fit on (rows) | evaluated on (rows) | null bias | ECE as run → null bias only → "
                  "calibrated | Brier as run → calibrated | F1 as run → with the null bias | share right after | "
                  "ECE of `run --calibration` |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for setting, rows in cal_res.items():
            for r in rows:
                b, m, a = r["test"]["before"], r["test"]["null_bias_only"], r["test"]["after"]
                ran = r.get("run_with_calibration")
                lines.append(
                    f"| {setting} | {r['fit_on']} ({r['fit_rows']}) | {r['test_on']} ({r['test_rows']}) | "
                    f"{pct(r['null_bias'])} | {b['ece']:.3f} → {m['ece']:.3f} → {a['ece']:.3f} | "
                    f"{b['brier']:.3f} → {a['brier']:.3f} | {b['f1']:.2f} → {a['f1']:.2f} | {a['right']:.2f} | "
                    f"{'—' if ran is None else format(ran['ece'], '.3f')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (then e.g. --variants '--dtype float16;--dtype bfloat16')")
    ap.add_argument("--squad", default=DEFAULT_SQUAD)
    ap.add_argument("--work", default=os.path.join(HERE, "work", "quality"))
    ap.add_argument("--settings", default="paragraphs,articles")
    ap.add_argument("--variants", default="--dtype bfloat16;--quantize int8",
                    help="faster paths, ';'-separated qa-batch run options")
    ap.add_argument("--ref-python", default=os.path.join(HERE, "work", "ref-venv", "bin", "python"),
                    help="Python of an environment with transformers==5.2.0 ('' to skip the old pipeline)")
    ap.add_argument("--articles-every", type=int, default=1,
                    help="on whole articles, run the old pipeline and the faster paths on every k-th row only "
                         "(float32 is then also scored on those rows): they take an hour each on 2 CPU cores")
    ap.add_argument("--qa-root", default=ROOT, help="checkout whose qa-batch runs (default: this one)")
    ap.add_argument("--steps", default="quality,calibration")
    ap.add_argument("--reuse", action="store_true", help="keep answers already in --work")
    ap.add_argument("--append", action="store_true", help="append the tables to BENCHMARKS.md")
    ap.add_argument("--results", default=os.path.join(HERE, "results", "quality-cpu.json"))
    args = ap.parse_args()
    args.settings = [s for s in args.settings.split(",") if s]
    args.variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    if args.ref_python and not os.path.exists(args.ref_python):
        raise SystemExit(f"--ref-python {args.ref_python} does not exist: make it (BENCHMARKS.md, How to run) "
                         "or pass --ref-python '' to skip the old pipeline")
    os.makedirs(args.work, exist_ok=True)
    args.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip() or "unknown"
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "CPU")
    args.device_name = f"CPU {model}, {os.cpu_count()} cores"
    if args.device.startswith("cuda"):
        import torch

        args.device_name = torch.cuda.get_device_name(0)
    gold = build_inputs(args)
    steps = args.steps.split(",")
    q = quality(args, gold) if "quality" in steps else {}
    c = calibration(args, gold) if "calibration" in steps else {}
    d = documents(args, gold) if "documents" in steps else {}
    t = transfer(args) if "transfer" in steps else {}
    text = markdown(q, c, args, d)
    print(text)
    if t:
        print(json.dumps(t, indent=1))
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump({"device": args.device_name, "commit": args.commit, "date": dt.date.today().isoformat(),
                   "quality": q, "calibration": c, "documents": d, **({"transfer": t} if t else {})}, f, indent=2)
    if args.append:
        with open(os.path.join(ROOT, "BENCHMARKS.md"), "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
