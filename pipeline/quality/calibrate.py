"""Calibration: a null bias and a logistic calibrator fitted on labelled rows, applied to any run.

A row's raw `confidence` is a softmax share: it spreads over overlapping spans that are all
right and depends on passage length, so it is not the probability that the answer is right.
A calibration, fitted by `qa-batch eval --fit-calibration` on a labelled sample, turns it
into one:

1. **Null bias** b: the --null-threshold that maximises F1 on the sample. It is applied to
   the null score itself, n' = null_score - b, so the row is null exactly when n' beats the
   best span (null_score - span_score > b, the --null-threshold rule), and the null
   candidate's softmax share agrees with that decision.
2. **Calibrator**: logistic (Platt) regression to the probability that the row's answer is
   right (F1 >= 0.5 against a gold answer, or null for an unanswerable question):

       p = sigmoid(intercept + sum_j weight_j * (feature_j - mean_j) / scale_j)

   Two candidates, and the fit keeps the one that predicts better on held-out rows
   (5-fold cross-validated log-loss) without ranking answers worse (held-out area under the
   ROC curve): `share`, Platt scaling of logit(share) alone with a weight kept positive, a
   monotone map of the raw softmax share, so it ranks answers exactly as the raw confidence
   does and can only fix its scale; and `features`, the four features below, kept only where
   they win on both counts. A weak model leaves little to rank: the fit then says so.

   Features (FEATURES), from the logits every output row carries (score or the first of
   `answers`, runner_up_score, null_score, log_norm), with n' the biased null score:
   - share: the answer's softmax share among every candidate span and n';
   - margin: |span_score - n'|, how far the decision was from flipping;
   - is_null: 1 for a null answer;
   - gap: span_score - runner_up_score, the lead of the best span over the best distinct
     other span (capped at GAP_CAP; the cap when there is no other span).

Everything here is plain numpy: the fit is Newton's method (IRLS) with an L2 penalty whose
strength is chosen by 5-fold cross-validation on the labelled rows (held-out log-loss): on a
small sample whose features say little, a strong penalty pulls the calibrator towards the
sample's share of right answers instead of fitting noise (measured in BENCHMARKS.md).
Expected calibration error (ECE) and Brier score measure the result.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UsageError

if TYPE_CHECKING:  # for type hints only
    from ..config import RunConfig
    from ..models.checkpoint import LoadedModel

FORMAT = "qa-batch-calibration/1"
FEATURES = ("share", "margin", "is_null", "gap")
CALIBRATORS = {"share": ("share_logit",), "features": FEATURES}  # the inputs of each kind of calibrator
SHARE_EPS = 1e-6  # logit(share) of a share of 0 or 1 stays finite
# `features` is kept only where its held-out log-loss is lower than `share`'s by more than this many
# standard errors of the per-row difference (a paired test: on a sample whose features say
# nothing, noise alone lets them win by a few thousandths), and its held-out AUC is not lower
# by more than AUC_SLACK (pooled over folds fitted apart, AUCs of the same ranking differ a little)
SELECT_SE = 2.0
AUC_SLACK = 0.005
L2_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)
GAP_CAP = 20.0  # logits: beyond this the runner-up no longer matters
MARGIN_CAP = 40.0
# Options that change the logits a calibration reads; a run with other values is refused.
FITTED_OPTIONS = ("max_seq_len", "doc_stride", "max_answer_len", "truncate_question", "max_question_len",
                  "dtype", "quantize", "backend")


@dataclass(frozen=True)
class RowLogits:
    """Per row (arrays of one length): what the features are computed from."""

    span_score: np.ndarray  # the best span's logit sum
    runner_up: np.ndarray  # the best distinct other span's (NaN: none)
    null_score: np.ndarray
    log_norm: np.ndarray  # logsumexp of every candidate span's score, the null candidate excluded

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, np.asarray(getattr(self, f.name), dtype=np.float64))

    def __len__(self) -> int:
        return len(self.span_score)


def is_null(logits: RowLogits, null_bias: float | None) -> np.ndarray:
    """The --null-threshold rule with the bias as threshold: null_score - span_score > b."""
    if null_bias is None:
        return np.zeros(len(logits), bool)
    return (logits.null_score - logits.span_score) > null_bias


def features(logits: RowLogits, null_bias: float | None) -> np.ndarray:
    """[rows, len(FEATURES)] feature matrix (see the module docstring)."""
    null = is_null(logits, null_bias)
    biased = logits.null_score - null_bias if null_bias is not None else np.full(len(logits), -np.inf)
    chosen = np.where(null, biased, logits.span_score)
    share = np.exp(chosen - np.logaddexp(logits.log_norm, biased))
    margin = np.minimum(np.abs(logits.span_score - biased), MARGIN_CAP)
    gap = np.clip(np.nan_to_num(logits.span_score - logits.runner_up, nan=GAP_CAP), 0.0, GAP_CAP)
    return np.stack([np.clip(share, 0.0, 1.0), margin, null.astype(np.float64), gap], axis=1)


def design(logits: RowLogits, null_bias: float | None, calibrator: str) -> np.ndarray:
    """The calibrator's inputs: logit(share) for `share`, the FEATURES for `features`."""
    x = features(logits, null_bias)
    if calibrator == "share":
        s = np.clip(x[:, 0], SHARE_EPS, 1 - SHARE_EPS)
        return np.log(s / (1 - s))[:, None]
    return x


def softmax_share(logits: RowLogits, null_bias: float | None) -> np.ndarray:
    """The uncalibrated confidence under the null bias: the answer's share with n' as the null."""
    return features(logits, null_bias)[:, 0]


def correct(null: np.ndarray, has_answer: np.ndarray, span_f1: np.ndarray) -> np.ndarray:
    """Whether each row's answer is right: null for an unanswerable row, else F1 >= 0.5."""
    return np.where(null, ~has_answer, has_answer & (span_f1 >= 0.5))


# ---- the logistic fit ----

def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 100, monotone: bool = False):
    """Weights minimising the log-loss + l2/2 |w|^2 (intercept free) over standardised x.

    Returns (intercept, weights, mean, scale). Newton steps (IRLS) converge in a few
    iterations; the penalty keeps them finite when the data separate. `monotone` (one
    feature): its weight is kept positive, so the fitted map keeps the feature's order; a
    sample where more of it means less often right gets the base rate, tilted by a hair.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0  # a constant feature (e.g. no null answer at all) gets weight 0
    z = np.c_[np.ones(len(x)), (x - mean) / scale]
    penalty = l2 * np.diag(np.r_[0.0, np.ones(x.shape[1])])
    w = np.zeros(z.shape[1])
    w[0] = np.log((y.sum() + 0.5) / (len(y) - y.sum() + 0.5))  # start at the base rate
    for _ in range(iterations):
        p = _sigmoid(z @ w)
        grad = z.T @ (p - y) + penalty @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z + penalty
        step = np.linalg.solve(hess + 1e-9 * np.eye(len(w)), grad)
        w -= step
        if np.max(np.abs(step)) < 1e-9:
            break
    if monotone and w[1] <= 0:
        w[1] = 1e-6
        w[0] = np.log((y.sum() + 0.5) / (len(y) - y.sum() + 0.5))
    return float(w[0]), w[1:], mean, scale


def held_out(x: np.ndarray, y: np.ndarray, l2: float, monotone: bool = False, folds: int = 5,
             seed: int = 0) -> np.ndarray:
    """Each row's probability from a calibrator fitted on the other folds (fixed seed)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    out = np.full(len(y), float(np.mean(y)) if len(y) else 0.5)
    if len(y) < 2 * folds:
        return out
    for held in np.array_split(np.random.default_rng(seed).permutation(len(y)), folds):
        train = np.ones(len(y), bool)
        train[held] = False
        intercept, w, mean, scale = fit_logistic(x[train], y[train], l2, monotone=monotone)
        out[held] = _sigmoid(intercept + ((x[held] - mean) / scale) @ w)
    return out


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.asarray(p, np.float64), 1e-9, 1 - 1e-9)
    y = np.asarray(y, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan")


def auc(score: np.ndarray, right: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a right answer scores above a wrong one (ties
    count half). NaN when the rows are all right or all wrong."""
    s, y = np.asarray(score, np.float64), np.asarray(right, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def choose_calibrator(logits: RowLogits, y: np.ndarray, null_bias: float | None) -> tuple[str, float, dict]:
    """(calibrator, its l2, what each candidate scored held out): `features` only where it beats
    `share` on held-out log-loss by more than SELECT_SE standard errors without a lower held-out
    AUC (AUC_SLACK); else `share`."""
    scored, losses = {}, {}
    for kind in ("share", "features"):
        x = design(logits, null_bias, kind)
        l2 = choose_l2(x, y, monotone=kind == "share")
        p = np.clip(held_out(x, y, l2, monotone=kind == "share"), 1e-9, 1 - 1e-9)
        losses[kind] = -(y * np.log(p) + (1 - y) * np.log(1 - p))
        scored[kind] = {"l2": l2, "cv_log_loss": round(float(losses[kind].mean()), 5), "cv_auc": round(auc(p, y), 4)}
    diff = losses["share"] - losses["features"]  # > 0 where the features predicted the row better
    se = float(diff.std() / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    gain = float(diff.mean()) if len(diff) else 0.0
    f, sh = scored["features"], scored["share"]
    better = gain > SELECT_SE * se and not (f["cv_auc"] < sh["cv_auc"] - AUC_SLACK)  # NaN AUC: not lower
    scored["features_gain"] = {"log_loss": round(gain, 5), "standard_error": round(se, 5)}
    kind = "features" if better else "share"
    return kind, scored[kind]["l2"], scored


def choose_l2(x: np.ndarray, y: np.ndarray, grid=L2_GRID, folds: int = 5, seed: int = 0,
              monotone: bool = False) -> float:
    """The penalty of the grid with the least held-out log-loss over `folds` folds (fixed seed:
    the same rows give the same calibration)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(y) < 2 * folds:
        return max(grid)
    parts = np.array_split(np.random.default_rng(seed).permutation(len(y)), folds)
    losses = []
    for l2 in grid:
        loss = 0.0
        for held in parts:
            train = np.ones(len(y), bool)
            train[held] = False
            intercept, w, mean, scale = fit_logistic(x[train], y[train], l2, monotone=monotone)
            p = np.clip(_sigmoid(intercept + ((x[held] - mean) / scale) @ w), 1e-9, 1 - 1e-9)
            loss -= float(np.sum(y[held] * np.log(p) + (1 - y[held]) * np.log(1 - p)))
        losses.append(loss)
    return float(grid[int(np.argmin(losses))])  # the first (weakest) among equals


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))  # no overflow warnings for large |t|


# ---- measuring calibration ----

def ece(confidence: np.ndarray, right: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: over 10 equal-width bins of confidence, the mean gap between
    the bin's average confidence and its share of right answers, weighted by the bin's rows."""
    p, y = np.asarray(confidence, np.float64), np.asarray(right, np.float64)
    if len(p) == 0:
        return float("nan")
    b = np.minimum((p * bins).astype(np.int64), bins - 1)
    n = np.bincount(b, minlength=bins)
    gap = np.abs(np.bincount(b, p, bins) - np.bincount(b, y, bins))  # per bin: |sum p - sum y|
    return float(gap.sum() / len(p)) if n.sum() else float("nan")


def brier(confidence: np.ndarray, right: np.ndarray) -> float:
    p, y = np.asarray(confidence, np.float64), np.asarray(right, np.float64)
    return float(np.mean((p - y) ** 2)) if len(p) else float("nan")


def reliability(confidence: np.ndarray, right: np.ndarray, bins: int = 10) -> list[dict]:
    """Per non-empty bin: rows, mean confidence, share right (the reliability diagram's points)."""
    p, y = np.asarray(confidence, np.float64), np.asarray(right, np.float64)
    b = np.minimum((p * bins).astype(np.int64), bins - 1)
    out = []
    for i in range(bins):
        m = b == i
        if m.any():
            out.append({"bin": [i / bins, (i + 1) / bins], "rows": int(m.sum()),
                        "confidence": float(p[m].mean()), "right": float(y[m].mean())})
    return out


# ---- the calibration ----

@dataclass(frozen=True)
class Calibration:
    """A fitted null bias and calibrator, with what it was fitted for (JSON: to_json/load)."""

    null_bias: float | None  # None: the sample had no unanswerable question; no null answers
    intercept: float
    weights: tuple[float, ...]  # per FEATURES, over standardised features
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    model: dict  # {"id", "revision"} of the model whose answers it was fitted on
    options: dict  # FITTED_OPTIONS as that run had them
    features: tuple[str, ...] = FEATURES  # the calibrator's inputs: CALIBRATORS[calibrator]
    l2: float = 1.0  # the penalty cross-validation chose
    calibrator: str = "features"  # "share" or "features" (files before the choice are "features")
    fitted_on: dict = field(default_factory=dict)  # answers, gold, rows, ids
    metrics: dict = field(default_factory=dict)  # on the fitted rows: before, null_bias_only, after
    created_at: str = ""
    qa_batch_version: str = ""

    def probability(self, logits: RowLogits) -> np.ndarray:
        """The calibrated probability that each row's answer (under the null bias) is right."""
        x = design(logits, self.null_bias, self.calibrator)
        t = self.intercept + ((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.weights)
        return _sigmoid(t)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps({"format": FORMAT, **d}, indent=2, default=_jsonable)

    @property
    def digest(self) -> str:
        """sha256 of the fitted parameters: names the calibration in output metadata and resume manifests."""
        params = [self.null_bias, self.intercept, list(self.weights), list(self.mean), list(self.scale),
                  list(self.features)] + ([self.calibrator] if self.calibrator != "features" else [])
        return "sha256:" + hashlib.sha256(json.dumps(params).encode()).hexdigest()

    def describe(self, path: str) -> dict:
        """What an output's metadata records about the calibration it applied."""
        return {"path": path, "digest": self.digest, "null_bias": self.null_bias, "model": self.model,
                "options": self.options, "rows": self.fitted_on.get("rows"), "created_at": self.created_at}

    def mismatches(self, model: dict | None, options: dict) -> list[str]:
        """How a run differs from what the calibration was fitted for (empty: it fits). The model
        is the same when the revisions (hub commit or content hash) are, else when the ids are;
        model None: not known yet, not compared."""
        out = []
        same_model = model is None or (
            self.model.get("revision") == model.get("revision") if self.model.get("revision") and
            model.get("revision") else self.model.get("id") == model.get("id"))
        if not same_model:
            out.append(f"model {model.get('id')} ({model.get('revision')}), fitted for {self.model.get('id')} "
                       f"({self.model.get('revision')})")
        for key in FITTED_OPTIONS:  # a key the fitted run did not record (an older qa-batch) is not compared
            if key == "backend" and options.get("quantize", "none") == "none" and \
                    self.options.get("quantize", "none") == "none":
                continue  # PyTorch, ONNX Runtime and OpenVINO give the same spans at one dtype (BENCHMARKS.md)
            if key in options and self.options.get(key) is not None and options[key] != self.options[key]:
                out.append(f"--{key.replace('_', '-')} {options[key]}, fitted with {self.options[key]}")
        return out


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON: {type(x)}")


def load(path: str) -> Calibration:
    """A calibration file written by `qa-batch eval --fit-calibration`; UsageError if it is not one."""
    from .. import storage

    try:
        d = json.loads(storage.read_bytes(path))
    except (OSError, FileNotFoundError) as e:
        raise UsageError(f"--calibration {path}: cannot read it ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--calibration {path}: not JSON ({e}); it may have been cut short: refit it with "
                         "qa-batch eval ANSWERS GOLD --fit-calibration PATH") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UsageError(f"--calibration {path}: not a qa-batch calibration (no \"format\": \"{FORMAT}\"); "
                         "make one with qa-batch eval ANSWERS GOLD --fit-calibration PATH")
    d.pop("format")
    try:
        cal = Calibration(**{k: tuple(v) if k in ("weights", "mean", "scale", "features") else v
                             for k, v in d.items()})
    except TypeError as e:
        raise UsageError(f"--calibration {path}: unexpected content ({e})") from None
    if tuple(cal.features) != CALIBRATORS.get(cal.calibrator):
        raise UsageError(f"--calibration {path}: a {cal.calibrator!r} calibrator of features {list(cal.features)} "
                         "is not one this version knows: fit it again with this version")
    return cal


def fit(logits: RowLogits, has_answer: np.ndarray, span_f1: np.ndarray, null_bias: float | None, *,
        model: dict, options: dict, confidence_before: np.ndarray, null_before: np.ndarray,
        fitted_on: dict, l2: float | None = None, version: str = "", calibrator: str | None = None) -> Calibration:
    """Fit the calibrator under the given null bias (eval's best F1 threshold); l2 None: chosen
    by cross-validation.

    `confidence_before` and `null_before` are the run's own confidence and null decisions, for
    the before/after metrics.
    """
    has_answer = np.asarray(has_answer, bool)
    span_f1 = np.asarray(span_f1, np.float64)
    null = is_null(logits, null_bias)
    y = correct(null, has_answer, span_f1)
    if calibrator is None:
        calibrator, chosen_l2, selection = choose_calibrator(logits, y, null_bias)
    else:
        chosen_l2, selection = choose_l2(design(logits, null_bias, calibrator), y,
                                         monotone=calibrator == "share"), {}
    l2 = chosen_l2 if l2 is None else l2
    intercept, w, mean, scale = fit_logistic(design(logits, null_bias, calibrator), y, l2,
                                             monotone=calibrator == "share")
    cal = Calibration(null_bias=null_bias, intercept=intercept, weights=tuple(map(float, w)),
                      mean=tuple(map(float, mean)), scale=tuple(map(float, scale)), model=model,
                      options={k: options.get(k) for k in FITTED_OPTIONS}, features=CALIBRATORS[calibrator],
                      l2=l2, calibrator=calibrator, fitted_on=fitted_on,
                      created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      qa_batch_version=version)
    metrics = compare(cal, logits, has_answer, span_f1, confidence_before, null_before)
    return dataclasses.replace(cal, metrics={**metrics, "selection": selection, "warnings": weak_signal(metrics)})


def weak_signal(metrics: dict) -> list[str]:
    """What a user should know before using the calibrated confidence for a threshold."""
    after = metrics["after"]
    out = []
    if after.get("spread") is not None and after["spread"] < 0.05:
        out.append(f"the calibrated confidence barely varies (standard deviation {after['spread']:.3f}): every "
                   "answer gets about the sample's share of right answers, so a confidence threshold keeps or "
                   "drops nearly all of them; the model's scores say little about which answers are right")
    if after.get("auc") is not None and not after["auc"] > 0.55:
        out.append(f"the confidence ranks right answers above wrong ones no better than chance (AUC "
                   f"{after['auc']:.2f}): no threshold separates them")
    return out


LEVELS = (0.5, 0.7, 0.9)  # confidence thresholds whose coverage and accuracy eval reports


def quality(confidence, null, has_answer, span_f1) -> dict:
    """One way of answering, summarised: F1 (%), ECE, Brier, AUC (does confidence rank right
    answers first?), its spread, share right, and for each level of LEVELS the share of rows
    at or above it and how many of those are right."""
    right = correct(null, has_answer, span_f1)
    conf = np.asarray(confidence, np.float64)
    f1 = np.where(null, ~has_answer, np.where(has_answer, span_f1, 0.0))
    a = auc(conf, right)
    levels = {}
    for level in LEVELS:
        kept = conf >= level
        levels[str(level)] = {"kept": round(float(kept.mean()), 4) if len(conf) else None,
                              "right": round(float(right[kept].mean()), 4) if kept.any() else None}
    return {"f1": round(100.0 * float(np.mean(f1)), 4) if len(f1) else None,
            "ece": round(ece(conf, right), 4), "brier": round(brier(conf, right), 4),
            "auc": None if np.isnan(a) else round(a, 4), "spread": round(float(conf.std()), 4) if len(conf) else None,
            "right": round(float(np.mean(right)), 4) if len(right) else None, "rows": int(len(right)),
            "levels": levels}


def compare(cal: Calibration, logits: RowLogits, has_answer, span_f1, confidence_before, null_before) -> dict:
    """Before (the run as it was), with the null bias only (softmax share), and calibrated."""
    null = is_null(logits, cal.null_bias)
    return {
        "before": quality(np.asarray(confidence_before, np.float64), np.asarray(null_before, bool), has_answer,
                          span_f1),
        "null_bias_only": quality(softmax_share(logits, cal.null_bias), null, has_answer, span_f1),
        "after": quality(cal.probability(logits), null, has_answer, span_f1),
    }


# ---- applying it to a run's answers ----

def apply_to_answers(cal: Calibration, answers: list) -> list:
    """Calibrated confidence for merged RowAnswers (merge_window already decided nulls with
    the bias as threshold). `score` and `null_score` stay raw; a top-k list's confidences
    become softmax shares with the biased null score, so they agree with the decision."""
    rows = [a for a in answers if a.span_score is not None]
    if not rows:
        return answers
    logits = RowLogits(
        span_score=[a.span_score for a in rows],
        runner_up=[np.nan if a.runner_up_score is None else a.runner_up_score for a in rows],
        null_score=[a.null_score for a in rows], log_norm=[a.log_norm for a in rows])
    p = cal.probability(logits)
    if cal.null_bias is not None:
        norm = np.logaddexp(logits.log_norm, logits.null_score - cal.null_bias)
    else:
        norm = logits.log_norm
    for a, prob, z in zip(rows, p, norm):
        a.confidence = float(prob)
        for t in a.top:
            t.confidence = float(min(1.0, np.exp(t.score - z)))
    return answers


def check_calibration(c: RunConfig, cal: Calibration, loaded: LoadedModel | None = None) -> None:
    """Before the model is loaded (loaded=None), what the options tell; after, model and dtype too."""
    where = f"--calibration {c.calibration}"
    if c.null_threshold != 0.0:
        raise UsageError(f"{where} sets the null threshold (its null bias): drop --null-threshold")
    if c.allow_null and cal.null_bias is None:
        raise UsageError(f"{where} was fitted on rows without unanswerable questions and gives no null answers: "
                         "drop --allow-null, or fit it on a sample with unanswerable questions")
    from ..models.checkpoint import content_hash

    options = {k: v for k, v in c.answer_options().items() if k != "dtype" or v != "auto"}
    if loaded is not None:
        options["dtype"] = loaded.dtype_name
        model = loaded.identity
    elif os.path.isdir(c.model):
        model = {"id": c.model, "revision": content_hash(c.model)}
    else:
        model = None  # a hub id: checked once loaded, when its revision is known
    differences = cal.mismatches(model, options)
    if differences and not c.force_calibration:
        raise UsageError(f"{where} was fitted for another run: " + "; ".join(differences) +
                         ". Fit one for this model and these options (qa-batch eval --fit-calibration), or "
                         "pass --force-calibration to apply it anyway")
    if differences and loaded is not None:
        import logging

        logging.getLogger("qa_batch").warning("applying %s fitted for another run (--force-calibration): %s",
                                              where, "; ".join(differences))


def plan_calibration(c: RunConfig) -> Calibration | None:
    """The run's calibration, loaded once and checked against the options before any model work;
    the run applies, records and names this copy (a file refitted during the run changes nothing)."""
    if not c.calibration:
        return None
    cal = load(c.calibration)
    check_calibration(c, cal)
    return cal


def calibration_identity(c: RunConfig, cal: Calibration | None) -> dict:
    """How a resume manifest names the calibration: its path and the digest of its parameters,
    so that a calibration file refitted between a kill and the rerun is not mixed into one output."""
    return {"calibration": {"path": c.calibration, "digest": cal.digest}} if cal is not None else {}


def calibration_metadata(c: RunConfig, cal: Calibration | None) -> dict:
    """What an output's metadata says about the calibration applied (nothing without one)."""
    return {"calibration": cal.describe(c.calibration)} if cal is not None else {}
