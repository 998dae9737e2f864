"""Answer quality against gold answers: the official SQuAD v1.1/v2.0 metrics, and the null
threshold that maximises them. Polars joins the answers with the gold table."""

from __future__ import annotations

import collections
import re
import string
from dataclasses import asdict, dataclass, field

import polars as pl

from . import storage
from .errors import UsageError
from .wording import plural

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
    keep = [id_col, "answer"] + [c for c in ("score", "null_score", "confidence", "answers") if c in answers.columns]
    answers = answers.select(keep).rename({"answers": "top"} if "answers" in keep else {})
    gold = gold.select([id_col, pl.col(gold_col).alias("gold")])
    joined = gold.join(answers, on=id_col, how="inner")
    missing_in_answers = gold.join(answers, on=id_col, how="anti").height
    missing_in_gold = answers.join(gold, on=id_col, how="anti").height
    if joined.height == 0:
        raise UsageError(f"no {id_col!r} is in both tables: check --id-col")

    ems, f1s, has = [], [], []
    span_em, span_f1, margins = [], [], []
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
            margins.append(row["null_score"] - (row["score"] if row["answer"] is not None
                                                else row["top"][0]["score"]))
        else:
            margins.append(None)

    def pct(xs):
        return round(100.0 * sum(xs) / len(xs), 4) if xs else None

    per_row = [{"exact": e, "answered": a is not None, "confidence": c}
               for e, a, c in zip(ems, joined["answer"].to_list(),
                                  joined["confidence"].to_list() if "confidence" in joined.columns
                                  else [None] * joined.height)]
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
        for metric, values in (("exact", span_em), ("f1", span_f1)):
            gains = [values[i] - (0.0 if has[i] else 1.0) for i in idx]
            curve = [(t, 100.0 * total / max(len(idx), 1))
                     for t, total in threshold_curve([margins[i] for i in idx], gains, base)]
            t, best = max(curve, key=lambda point: point[1])  # the lowest threshold among equals
            rep.curves[metric] = curve
            setattr(rep, f"best_{metric}", round(best, 4))
            setattr(rep, f"best_{metric}_threshold", round(t, 4))
    return rep


def plot(report: EvalReport, path: str) -> None:
    """F1 and EM against the null threshold, and accuracy against confidence (reliability)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'qa-batch[plot]'") from None
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
    answered = [r for r in rows if r["answered"] and r["confidence"] is not None]
    edges = [i / 10 for i in range(11)]
    xs, ys, ns = [], [], []
    for lo, hi in zip(edges, edges[1:]):
        inside = [r for r in answered if lo <= r["confidence"] < hi or (hi == 1.0 and r["confidence"] == 1.0)]
        if inside:
            xs.append(sum(r["confidence"] for r in inside) / len(inside))
            ys.append(sum(r["exact"] for r in inside) / len(inside))
            ns.append(len(inside))
    right.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    right.plot(xs, ys, marker="o", label="exact match rate")
    for x, y, n in zip(xs, ys, ns):
        right.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    right.set_xlabel("confidence (bin mean)")
    right.set_ylabel("answers that match gold")
    right.set_title("Reliability of confidence (answered rows)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
