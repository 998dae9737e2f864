"""Answer quality against gold answers: the official SQuAD v1.1/v2.0 metrics, the null
threshold that maximises them, and how well `confidence` predicts a right answer (ECE, Brier),
before and after a calibration; fitting one (calibrate.py does the maths). Polars joins the
answers with the gold table."""

from __future__ import annotations

import collections
import re
import string
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl

from .. import __version__, storage
from ..errors import UsageError
from ..wording import plural
from . import calibrate

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # an empty answer (no answer) only matches an empty one
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_gold(metric, prediction: str, golds: list[str]) -> float:
    """Max over the gold answers; an unanswerable question's only gold answer is ''."""
    return max(metric(prediction, g) for g in (golds or [""]))


@dataclass
class EvalReport:
    rows_matched: int
    missing_in_answers: int  # gold rows with no answer row
    missing_in_gold: int  # answer rows with no gold row
    exact: float  # percentages, as the official script prints them
    f1: float
    has_answer: dict = field(default_factory=dict)  # {"rows", "exact", "f1"}
    no_answer: dict = field(default_factory=dict)
    best_exact: float | None = None  # with the best --null-threshold (SQuAD 2.0-style data)
    best_exact_threshold: float | None = None
    best_f1: float | None = None
    best_f1_threshold: float | None = None
    threshold_note: str | None = None
    # confidence against correctness (F1 >= 0.5, or null for an unanswerable row); rows with a confidence
    ece: float | None = None  # expected calibration error, 10 equal-width bins
    brier: float | None = None
    calibration: dict | None = None  # with a calibration: its path, null bias, before/after metrics, notes
    # for plots, not in as_dict(): per-row results, and (threshold, %) curves per metric
    per_row: list[dict] = field(default_factory=list, repr=False)
    curves: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("per_row")
        d.pop("curves")
        return d


def threshold_curve(margins: list[float], gains: list[float], base: float) -> list[tuple[float, float]]:
    """(threshold, total) at every distinct null margin, in one sorted sweep. Rows are answered iff
    null margin <= t (the --null-threshold rule); below every margin all rows are null (`base`)."""
    pairs = sorted(zip(margins, gains))
    curve, total = [(pairs[0][0] - 1.0 if pairs else 0.0, base)], base
    for i, (margin, gain) in enumerate(pairs):
        total += gain
        if i + 1 == len(pairs) or pairs[i + 1][0] != margin:  # rows with equal margins move together
            curve.append((margin, total))
    return curve


def evaluate(answers_path: str, gold_path: str, id_col: str = "id", gold_col: str = "answers") -> EvalReport:
    try:
        answers = pl.from_arrow(storage.read_table(answers_path))
        gold = pl.from_arrow(storage.read_table(gold_path))
    except Exception as e:  # polars raises several kinds for unreadable files
        raise UsageError(f"cannot read the tables: {e}") from None
    for name, table, cols in (("answers", answers, [id_col, "answer"]), ("gold", gold, [id_col, gold_col])):
        missing = [c for c in cols if c not in table.columns]
        if missing:
            hints = {id_col: "; name the id column with --id-col",
                     gold_col: "; name the gold answers' column with --gold-col"} if name == "gold" else {}
            hint = hints.get(missing[0], "")
            raise UsageError(f"{answers_path if name == 'answers' else gold_path}: column {missing[0]!r} is missing "
                             f"(columns found: {', '.join(table.columns)}){hint}")
    if not isinstance(gold.schema[gold_col], pl.List):
        raise UsageError(f"{gold_path}: column {gold_col!r} is {gold.schema[gold_col]}, not a list of gold answer "
                         "strings (empty for an unanswerable question)")
    keep = [id_col, "answer"] + [c for c in ("score", "null_score", "confidence", "runner_up_score", "log_norm",
                                             "answers") if c in answers.columns]
    answers = answers.select(keep).rename({"answers": "top"} if "answers" in keep else {})
    gold = gold.select([id_col, pl.col(gold_col).alias("gold")])
    joined = gold.join(answers, on=id_col, how="inner")
    missing_in_answers = gold.join(answers, on=id_col, how="anti").height
    missing_in_gold = answers.join(gold, on=id_col, how="anti").height
    if joined.height == 0:
        raise UsageError(f"no {id_col!r} is in both tables: check --id-col")

    ems, f1s, has = [], [], []
    span_em, span_f1, margins, logits = [], [], [], []
    for row in joined.iter_rows(named=True):
        golds = [g for g in (row["gold"] or []) if g] or []
        pred = row["answer"] or ""
        ems.append(best_over_gold(exact_match, pred, golds))
        f1s.append(best_over_gold(f1, pred, golds))
        has.append(bool(golds))
        # The best span, whether or not it was chosen: the answer, or the first of top-k.
        span = row["answer"] if row["answer"] is not None else ((row.get("top") or [{}])[0].get("text"))
        span_em.append(best_over_gold(exact_match, span or "", golds))
        span_f1.append(best_over_gold(f1, span or "", golds))
        if row.get("null_score") is not None and row.get("score") is not None and span is not None:
            span_score = row["score"] if row["answer"] is not None else row["top"][0]["score"]
            margins.append(row["null_score"] - span_score)
            logits.append((span_score, _runner_up(row), row["null_score"], row.get("log_norm")))
        else:
            margins.append(None)
            logits.append(None)

    def pct(xs):
        return round(100.0 * sum(xs) / len(xs), 4) if xs else None

    per_row = [{"id": i, "exact": e, "f1": f, "span_f1": sf, "has_answer": h, "answered": a is not None,
                "confidence": c, "logits": lg}
               for i, e, f, sf, h, a, c, lg in zip(joined[id_col].to_list(), ems, f1s, span_f1, has,
                                                   joined["answer"].to_list(),
                                                joined["confidence"].to_list() if "confidence" in joined.columns
                                                else [None] * joined.height, logits)]
    rep = EvalReport(
        rows_matched=joined.height, missing_in_answers=missing_in_answers, missing_in_gold=missing_in_gold,
        exact=pct(ems), f1=pct(f1s),
        has_answer={"rows": sum(has), "exact": pct([e for e, h in zip(ems, has) if h]),
                    "f1": pct([f for f, h in zip(f1s, has) if h])},
        no_answer={"rows": len(has) - sum(has), "exact": pct([e for e, h in zip(ems, has) if not h]),
                   "f1": pct([f for f, h in zip(f1s, has) if not h])},
        per_row=per_row,
    )
    if not all(has):  # SQuAD 2.0-style: find the null threshold
        usable = [m is not None for m in margins]
        if not all(usable):
            lacking = usable.count(False)
            rep.threshold_note = (f"{plural(lacking, 'row')} {'lacks' if lacking == 1 else 'lack'} a best span "
                                  "or null score (null answers written without --top-k): run without "
                                  "--allow-null, or with --top-k 2, to search the threshold over every row")
        idx = [i for i, u in enumerate(usable) if u]
        base = sum(not has[i] for i in idx)  # every row null: unanswerable rows right
        for metric, values in (("exact", span_em), ("f1", span_f1)) if idx else ():  # no scores: no search
            gains = [values[i] - (0.0 if has[i] else 1.0) for i in idx]
            curve = [(t, 100.0 * total / max(len(idx), 1))
                     for t, total in threshold_curve([margins[i] for i in idx], gains, base)]
            t, best = max(curve, key=lambda point: point[1])  # the lowest threshold among equals
            rep.curves[metric] = curve
            setattr(rep, f"best_{metric}", round(best, 4))
            setattr(rep, f"best_{metric}_threshold", round(t, 4))
    rated = [r for r in per_row if r["confidence"] is not None]
    if rated:
        conf = np.array([r["confidence"] for r in rated], np.float64)
        right = calibrate.correct(np.array([not r["answered"] for r in rated]),
                                  np.array([r["has_answer"] for r in rated]), np.array([r["f1"] for r in rated]))
        rep.ece, rep.brier = round(calibrate.ece(conf, right), 4), round(calibrate.brier(conf, right), 4)
    return rep


def _runner_up(row: dict) -> float | None:
    """The best distinct span after the best one: its column, else the second of top-k."""
    if "runner_up_score" in row:
        return row["runner_up_score"]
    top = row.get("top") or []
    return top[1]["score"] if len(top) > 1 else None


def best_f1_threshold(report: EvalReport) -> float | None:
    """The exact --null-threshold that maximises F1 (the report prints it rounded)."""
    if "f1" not in report.curves:
        return None
    return max(report.curves["f1"], key=lambda point: point[1])[0]


def _row_logits(report: EvalReport, what: str) -> tuple[list[dict], calibrate.RowLogits]:
    """The rows a calibration can be fitted on or applied to: those with a null score (errors
    have none), each with its best span's score and text, runner-up and log_norm."""
    rows = [r for r in report.per_row if r["logits"] is not None or r["confidence"] is not None]
    lacking = [r for r in rows if r["logits"] is None or r["logits"][3] is None]
    if lacking:
        no_norm = sum(r["logits"] is not None for r in lacking)
        why = ("the answers have no log_norm column: answer them again with this version of qa-batch"
               if no_norm else "null answers were written without their best span: answer the labelled rows "
               "without --allow-null, or with --top-k 2")
        raise UsageError(f"{what}: {plural(len(lacking), 'row')} cannot be used ({why})")
    lg = np.array([r["logits"] for r in rows], dtype=np.float64)  # None (no runner-up) becomes NaN
    return rows, calibrate.RowLogits(span_score=lg[:, 0], runner_up=lg[:, 1], null_score=lg[:, 2],
                                     log_norm=lg[:, 3])


def _labels(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    has = np.array([r["has_answer"] for r in rows], bool)
    span_f1 = np.array([r["span_f1"] for r in rows], np.float64)
    null_before = np.array([not r["answered"] for r in rows], bool)
    conf = np.array([np.nan if r["confidence"] is None else r["confidence"] for r in rows], np.float64)
    return has, span_f1, null_before, conf


def answers_metadata(answers_path: str) -> dict:
    """The qa-batch metadata of an output file (or of the first file of a Ray output directory)."""
    from ..stages.write import read_metadata

    path = answers_path
    if storage.is_dir(answers_path):
        files = sorted(f for f in storage.list_files(answers_path) if storage.basename(f).endswith(".parquet"))
        path = files[0] if files else answers_path
    try:
        return read_metadata(path)
    except (KeyError, OSError, ValueError):
        raise UsageError(f"{answers_path}: no qa-batch metadata (model, options): fit a calibration on the "
                         "output of qa-batch run") from None


def fit_calibration(report: EvalReport, answers_path: str, gold_path: str,
                    l2: float | None = None) -> calibrate.Calibration:
    """Fit a calibration on evaluated rows: the null bias is the report's best F1 threshold."""
    meta = answers_metadata(answers_path)
    rows, logits = _row_logits(report, "--fit-calibration")
    has, span_f1, null_before, conf = _labels(rows)
    if np.isnan(conf).any():
        conf = np.where(np.isnan(conf), calibrate.softmax_share(logits, None), conf)
    bias = best_f1_threshold(report) if not has.all() else None
    options = {**meta.get("options", {}), "dtype": meta.get("dtype", meta.get("options", {}).get("dtype"))}
    return calibrate.fit(
        logits, has, span_f1, bias, model=meta.get("model") or {}, options=options, confidence_before=conf,
        null_before=null_before, l2=l2, version=__version__,
        fitted_on={"answers": answers_path, "gold": gold_path, "rows": len(rows),
                   "has_answer": int(has.sum()), "no_answer": int((~has).sum()),
                   "ids": [r["id"] for r in rows] if rows and "id" in rows[0] else None})


def apply_calibration(report: EvalReport, cal: calibrate.Calibration, path: str, answers_path: str) -> None:
    """Before/after metrics of a calibration on the evaluated rows, in report.calibration."""
    rows, logits = _row_logits(report, f"--calibration {path}")
    has, span_f1, null_before, conf = _labels(rows)
    metrics = calibrate.compare(cal, logits, has, span_f1, np.nan_to_num(conf), null_before)
    notes, already = [], None
    try:
        meta = answers_metadata(answers_path)
        options = {**meta.get("options", {}), "dtype": meta.get("dtype")}
        notes = cal.mismatches(meta.get("model") or {}, options)
        already = (meta.get("calibration") or {}).get("path") or meta.get("options", {}).get("calibration")
    except UsageError:
        notes = ["the answers carry no qa-batch metadata: whether the calibration fits them is unknown"]
    right = calibrate.correct(calibrate.is_null(logits, cal.null_bias), has, span_f1)
    for r, p, y in zip(rows, cal.probability(logits), right):
        r["calibrated"] = (float(p), bool(y))  # for the plot
    report.calibration = {"path": path, "null_bias": cal.null_bias, "calibrator": cal.calibrator, "rows": len(rows),
                          **metrics, "mismatches": notes, "already_calibrated": already,
                          "warnings": calibrate.weak_signal(metrics)}  # on these rows, not the fitted ones


def plot(report: EvalReport, path: str) -> None:
    """F1 and EM against the null threshold, and accuracy against confidence (reliability)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (in a qa-batch checkout: pip install -e '.[plot]')") from None
    rows = report.per_row
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if report.curves:
        for metric, curve in report.curves.items():
            ts, ys = zip(*curve)
            left.step(ts, ys, where="post", label="F1" if metric == "f1" else "EM")
        for t in (report.best_f1_threshold,):
            left.axvline(t, color="grey", linestyle=":", label=f"best F1 threshold {t:.2f}")
        left.set_xlabel("--null-threshold")
        left.set_ylabel("score (%)")
        left.legend()
    else:
        left.text(0.5, 0.5, "no unanswerable questions:\nno threshold to tune", ha="center", va="center")
    left.set_title("Quality against the null threshold")
    rated = [r for r in rows if r["confidence"] is not None]
    right_before = calibrate.correct(np.array([not r["answered"] for r in rated], bool),
                                     np.array([r["has_answer"] for r in rated], bool),
                                     np.array([r["f1"] for r in rated], np.float64))
    series = [(f"as answered (ECE {report.ece:.3f})" if report.ece is not None else "as answered",
               [r["confidence"] for r in rated], right_before)]
    if report.calibration:
        cal = [r["calibrated"] for r in rows if "calibrated" in r]
        series.append((f"calibrated (ECE {report.calibration['after']['ece']:.3f})",
                       [p for p, _ in cal], [y for _, y in cal]))
    right.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for label, conf, ok in series:
        points = calibrate.reliability(np.array(conf, np.float64), np.array(ok, np.float64))
        right.plot([b["confidence"] for b in points], [b["right"] for b in points], marker="o", label=label)
        for b in points:
            right.annotate(str(b["rows"]), (b["confidence"], b["right"]), textcoords="offset points",
                           xytext=(4, 4), fontsize=7)
    right.set_xlabel("confidence (bin mean, 10 bins)")
    right.set_ylabel("share of right answers")
    right.set_title("Reliability: right = F1 >= 0.5, or null when unanswerable")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
