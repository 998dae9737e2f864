"""What an analyst asks first of a run's output: counts, error reasons, confidence, and which
questions rarely find an answer. Polars does the aggregation."""

from __future__ import annotations

import polars as pl

from .. import storage
from ..errors import UsageError
from ..stages.wide import long_form
from ..wording import plural

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def summarize(path: str, by: str | None = None, top: int = 20) -> dict:
    try:
        df = pl.from_arrow(long_form(storage.read_table(path), path))  # a file or a directory, local or s3://
    except Exception as e:
        raise UsageError(f"{path}: cannot read it as Parquet ({e})") from None
    for col in ("answer", "error", "confidence"):
        if col not in df.columns:
            raise UsageError(f"{path}: column {col!r} is missing: is this a qa-batch output?")
    if top < 1:
        raise UsageError(f"--top {top}: must be at least 1")
    if by is not None and by not in df.columns:
        raise UsageError(f"--by {by!r}: no such column; columns found: {', '.join(df.columns)}")
    df = df.with_columns(
        pl.col("answer").is_not_null().alias("_answered"),
        pl.col("error").is_not_null().alias("_error"),
    )
    rows = df.height
    answered = int(df["_answered"].sum())
    errors = int(df["_error"].sum())
    reasons = (df.filter(pl.col("_error"))
               .with_columns(pl.col("error").str.split(":").list.first().alias("reason"))
               .group_by("reason").len().sort(["len", "reason"], descending=[True, False]))
    conf = df.filter(pl.col("_answered"))["confidence"].drop_nulls()
    tenths = (conf * 10).floor().cast(pl.Int32).clip(0, 9)  # confidence 1.0 falls in the last bin
    counts = dict(tenths.value_counts().iter_rows())
    hist = [counts.get(i, 0) for i in range(10)]
    out = {
        "rows": rows, "answered": answered, "null": rows - answered - errors, "errors": errors,
        "errors_by_reason": {r: n for r, n in reasons.iter_rows()},
        "confidence_quantiles": {str(q): (round(float(conf.quantile(q)), 4) if len(conf) else None)
                                 for q in QUANTILES},
        "confidence_histogram": {f"{i / 10:.1f}-{(i + 1) / 10:.1f}": n for i, n in enumerate(hist)},
    }
    if by is not None:
        groups = (df.group_by(by)
                  .agg(pl.len().alias("rows"), pl.col("_answered").sum().alias("answered"),
                       pl.col("_error").sum().alias("errors"),
                       pl.col("confidence").filter(pl.col("_answered")).mean().alias("mean_confidence"))
                  .with_columns((pl.col("answered") / pl.col("rows")).alias("answered_share"))
                  .sort(["answered_share", "rows"], descending=[False, True]))  # rarely answered first
        out["by"] = by
        out["groups"] = groups.head(top).to_dicts()
        out["group_count"] = groups.height
    return out


def render(s: dict) -> str:
    lines = [f"rows {s['rows']}: answered {s['answered']}, null {s['null']}, errors {s['errors']}"]
    for reason, n in s["errors_by_reason"].items():
        lines.append(f"  error {reason}: {n}")
    q = ", ".join(f"p{int(float(k) * 100)} {v:.3f}" for k, v in s["confidence_quantiles"].items() if v is not None)
    lines.append(f"confidence of answers: {q or 'no answers'}")
    peak = max(s["confidence_histogram"].values()) or 1
    for label, n in s["confidence_histogram"].items():
        lines.append(f"  {label} {'#' * round(30 * n / peak):<30} {n}")
    if "groups" in s:
        n, shown = s["group_count"], len(s["groups"])
        cut = f"; the first {shown} shown, --top {n} shows all" if shown < n else ""
        lines.append(f"by {s['by']} ({plural(n, 'group')}, rarely answered first{cut}):")
        lines.append(f"  {'answered':>8} {'rows':>6} {'conf':>6}  {s['by']}")
        for g in s["groups"]:
            conf = f"{g['mean_confidence']:.3f}" if g["mean_confidence"] is not None else "-"
            lines.append(f"  {g['answered_share']:>8.0%} {g['rows']:>6} {conf:>6}  {str(g[s['by']])[:70]}")
    return "\n".join(lines)
