"""Calibration: the fit recovers a known law, the null bias is eval's best threshold, a
calibration for another run is refused, and applying one changes only confidence and nulls."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from conftest import ROOT, SAMPLE, assert_same_answers, run_cli, same_values
from pipeline.quality import calibrate
from pipeline.quality.calibrate import RowLogits
from pipeline.quality.evaluate import evaluate


def synthetic_logits(rng: np.random.Generator, n: int) -> RowLogits:
    span = rng.normal(4.0, 3.0, n)
    return RowLogits(span_score=span, runner_up=np.where(rng.random(n) < 0.05, np.nan, span - rng.exponential(2.0, n)),
                     null_score=rng.normal(3.0, 4.0, n), log_norm=span + rng.exponential(1.5, n))


def planted_labels(rng, logits: RowLogits, bias: float, p_true: np.ndarray):
    """has_answer and span F1 such that each row is right with probability p_true."""
    right = rng.random(len(p_true)) < p_true
    null = calibrate.is_null(logits, bias)
    has_answer = np.where(null, ~right, True)  # a null answer is right iff the question is unanswerable
    span_f1 = np.where(right, 1.0, 0.0)
    return has_answer, span_f1


@given(st.lists(st.floats(-1.5, 1.5), min_size=4, max_size=4), st.floats(-1.0, 1.0), st.integers(0, 2**31))
def test_fit_recovers_a_known_logistic_law(weights, intercept, seed):
    rng = np.random.default_rng(seed)
    bias = -1.0
    train, test = synthetic_logits(rng, 40_000), synthetic_logits(rng, 40_000)
    x_train = calibrate.features(train, bias)
    mean, scale = x_train.mean(0), x_train.std(0)

    def law(lg):  # the true probability of a right answer, logistic in the standardised features
        return calibrate._sigmoid(intercept + ((calibrate.features(lg, bias) - mean) / scale) @ np.array(weights))

    has, f1 = planted_labels(rng, train, bias, law(train))
    cal = calibrate.fit(train, has, f1, bias, model={"id": "m"}, options={}, confidence_before=np.full(len(f1), 0.5),
                        null_before=np.zeros(len(f1), bool), fitted_on={})
    p_true, p_fit = law(test), cal.probability(test)
    assert np.max(np.abs(p_fit - p_true)) < 0.06
    has_t, f1_t = planted_labels(rng, test, bias, p_true)
    right = calibrate.correct(calibrate.is_null(test, bias), has_t, f1_t)
    assert calibrate.ece(p_fit, right) < 0.02
    # the uncalibrated softmax share follows another law: it is measurably off (the test can fail)
    assert calibrate.ece(np.full(len(right), 0.99), right) > 0.2


def test_penalty_chosen_by_cross_validation():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4))
    noise = (rng.random(300) < 0.55).astype(float)  # features say nothing: the base rate is the best guess
    signal = (rng.random(300) < calibrate._sigmoid(3 * x[:, 0])).astype(float)
    assert calibrate.choose_l2(x, noise) >= 100.0
    assert calibrate.choose_l2(x, signal) <= 1.0


def test_ece_and_brier_by_hand():
    conf = np.array([0.05, 0.15, 0.95, 0.95, 1.0])
    right = np.array([0, 1, 1, 0, 1])
    # bins: [0,.1): 0.05 vs 0; [.1,.2): 0.15 vs 1; [.9,1]: mean .9667 vs 2/3
    expected = (0.05 + 0.85 + 3 * abs(2.9 / 3 - 2 / 3)) / 5
    assert calibrate.ece(conf, right) == pytest.approx(expected)
    assert calibrate.brier(conf, right) == pytest.approx(np.mean((conf - right) ** 2))
    assert [b["rows"] for b in calibrate.reliability(conf, right)] == [1, 1, 3]


def qa_output(path, rng: np.random.Generator, n: int = 300, model=None, options=None):
    """An answers table as qa-batch writes it (metadata included), all rows answered (no --allow-null)."""
    span = rng.normal(5.0, 2.0, n)
    null = span + rng.normal(0.0, 3.0, n)
    words = ["alpha", "beta", "gamma", "delta"]
    answer = [words[i % 4] for i in range(n)]
    meta = {"model": model or {"id": "m", "revision": "sha256:abc"},
            "options": {"max_seq_len": 384, "doc_stride": 128, "max_answer_len": 30, "truncate_question": False,
                        "max_question_len": 64, "dtype": "auto", "quantize": "none", **(options or {})},
            "dtype": "float32"}
    table = pa.table({
        "id": [f"q{i}" for i in range(n)], "answer": answer,
        "score": pa.array(span, pa.float32()), "confidence": pa.array(rng.uniform(0, 1, n), pa.float32()),
        "null_score": pa.array(null, pa.float32()),
        "runner_up_score": pa.array(span - rng.exponential(1.0, n), pa.float32()),
        "log_norm": pa.array(span + rng.exponential(1.0, n), pa.float32()),
    }).replace_schema_metadata({b"qa_batch": json.dumps(meta).encode()})
    pq.write_table(table, path)
    return path


def test_null_bias_is_evals_best_f1_threshold(tmp_path):
    rng = np.random.default_rng(7)
    answers = qa_output(tmp_path / "a.parquet", rng)
    t = pq.read_table(answers)
    span, null = np.array(t["score"].to_pylist()), np.array(t["null_score"].to_pylist())
    answerable = rng.random(len(span)) < 1 / (1 + np.exp((null - span) / 2))
    gold = [([a] if rng.random() < 0.7 else ["epsilon"]) if ok else []
            for a, ok in zip(t["answer"].to_pylist(), answerable)]
    pq.write_table(pa.table({"id": t["id"], "answers": pa.array(gold, pa.list_(pa.string()))}), tmp_path / "g.parquet")
    r = run_cli("eval", answers, tmp_path / "g.parquet", "--fit-calibration", tmp_path / "cal.json",
                "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    cal = json.loads((tmp_path / "cal.json").read_text())
    report = json.loads((tmp_path / "e.json").read_text())
    assert cal["null_bias"] == pytest.approx(report["best_f1_threshold"], abs=1e-4)
    # applying the bias gives eval's best F1 (the decision and the threshold agree exactly)
    assert cal["metrics"]["after"]["f1"] == pytest.approx(report["best_f1"], abs=1e-6)
    assert report["calibration"]["after"]["f1"] == pytest.approx(report["best_f1"], abs=1e-6)
    assert cal["model"] == {"id": "m", "revision": "sha256:abc"}
    assert cal["options"]["dtype"] == "float32" and cal["options"]["max_seq_len"] == 384
    assert cal["fitted_on"]["rows"] == len(span) and len(cal["fitted_on"]["ids"]) == len(span)
    assert "ECE" in r.stdout and "fitted calibration" in r.stdout
    # the fit on these rows is calibrated (in-sample), and at least as well as before
    assert cal["metrics"]["after"]["ece"] < 0.08
    assert cal["metrics"]["after"]["brier"] <= cal["metrics"]["null_bias_only"]["brier"]


def test_fit_needs_every_rows_best_span(tmp_path):
    rng = np.random.default_rng(1)
    answers = qa_output(tmp_path / "a.parquet", rng, n=20)
    t = pq.read_table(answers)
    meta = pq.read_metadata(answers).metadata
    nulled = t.set_column(1, "answer", pa.array([None] * 3 + t["answer"].to_pylist()[3:], pa.string()))
    pq.write_table(nulled.replace_schema_metadata({b"qa_batch": meta[b"qa_batch"]}), answers)
    pq.write_table(pa.table({"id": t["id"], "answers": pa.array([[] for _ in range(20)], pa.list_(pa.string()))}),
                   tmp_path / "g.parquet")
    r = run_cli("eval", answers, tmp_path / "g.parquet", "--fit-calibration", tmp_path / "cal.json")
    assert r.returncode == 2 and "3 rows" in r.stderr and "--top-k 2" in r.stderr
    assert not (tmp_path / "cal.json").exists()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, checkpoints):
    """A real run of the sample with a tiny model (every row keeps its best span), and a
    calibration fitted on it against the sample's gold answers."""
    d = tmp_path_factory.mktemp("calibrated")
    sample = str(shutil.copy(SAMPLE, d / "sample.parquet"))
    model = checkpoints["bert"]
    common = ["--model", model, "--max-seq-len", 128, "--doc-stride", 32, "--top-k", 2]
    r = run_cli("run", sample, "-o", d / "plain.parquet", *common)
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", d / "plain.parquet", sample, "--fit-calibration", d / "cal.json")
    assert r.returncode == 0, r.stderr
    return {"dir": d, "sample": sample, "model": model, "common": common,
            "cal": json.loads((d / "cal.json").read_text())}


def test_run_with_a_calibration_changes_only_confidence_and_null_decisions(fitted):
    d, cal = fitted["dir"], fitted["cal"]
    assert cal["null_bias"] is not None  # the sample has unanswerable questions
    r = run_cli("run", fitted["sample"], "-o", d / "calibrated.parquet", *fitted["common"],
                "--calibration", d / "cal.json")
    assert r.returncode == 0, r.stderr
    # the same null decisions, made by hand with the bias as --null-threshold
    r = run_cli("run", fitted["sample"], "-o", d / "threshold.parquet", *fitted["common"], "--allow-null",
                "--null-threshold", repr(cal["null_bias"]))
    assert r.returncode == 0, r.stderr
    calibrated, by_hand = pq.read_table(d / "calibrated.parquet"), pq.read_table(d / "threshold.parquet")
    plain = pq.read_table(d / "plain.parquet")
    # (three processes: scores agree to the last float32 bits, see conftest.same_values)
    assert_same_answers(calibrated.drop_columns(["confidence", "answers"]), by_hand.drop_columns(["confidence",
                                                                                                  "answers"]))
    for a, b in zip(calibrated["answers"].to_pylist(), by_hand["answers"].to_pylist()):
        assert [(x["text"], x["start"], x["end"]) for x in a] == [(x["text"], x["start"], x["end"]) for x in b]
        assert same_values([x["score"] for x in a], [x["score"] for x in b])
    # against the run without null answers: every answered row keeps its span and raw scores
    for c, p in zip(calibrated.to_pylist(), plain.to_pylist()):
        assert same_values([c["null_score"], c["runner_up_score"], c["log_norm"]],
                           [p["null_score"], p["runner_up_score"], p["log_norm"]])
        if c["answer"] is not None:
            assert (c["answer"], c["answer_start"]) == (p["answer"], p["answer_start"])
            assert same_values(c["score"], p["score"])
        else:
            assert p["null_score"] - p["score"] > cal["null_bias"] and c["score"] == c["null_score"]
    # confidence is the calibrator's probability, not the softmax share
    logits = RowLogits(span_score=[a[0]["score"] for a in calibrated["answers"].to_pylist()],
                       runner_up=calibrated["runner_up_score"].to_pylist(),
                       null_score=calibrated["null_score"].to_pylist(),
                       log_norm=calibrated["log_norm"].to_pylist())
    expected = calibrate.load(str(d / "cal.json")).probability(logits)
    np.testing.assert_allclose(calibrated["confidence"].to_numpy(), expected, rtol=1e-5)
    assert calibrated["confidence"].to_pylist() != by_hand["confidence"].to_pylist()
    # recorded in the metadata; and eval's offline application gives the run's own figures
    meta = json.loads(pq.read_metadata(d / "calibrated.parquet").metadata[b"qa_batch"])
    assert meta["calibration"]["null_bias"] == cal["null_bias"] and meta["calibration"]["digest"].startswith("sha256:")
    assert meta["options"]["calibration"] == str(d / "cal.json")
    offline = evaluate(str(d / "plain.parquet"), fitted["sample"])
    from pipeline.quality.evaluate import apply_calibration

    apply_calibration(offline, calibrate.load(str(d / "cal.json")), "cal.json", str(d / "plain.parquet"))
    ran = evaluate(str(d / "calibrated.parquet"), fitted["sample"])
    assert ran.ece == pytest.approx(offline.calibration["after"]["ece"], abs=1e-4)
    assert ran.f1 == pytest.approx(offline.calibration["after"]["f1"], abs=1e-3)


@pytest.mark.parametrize("change, named", [
    (["--max-seq-len", 96], "--max-seq-len 96, fitted with 128"),
    (["--doc-stride", 16], "--doc-stride 16, fitted with 32"),
    (["--quantize", "int8", "--device", "cpu"], "--quantize int8, fitted with none"),
    (["--backend", "onnxruntime", "--quantize", "int8", "--device", "cpu"], "--backend onnxruntime, fitted with torch"),
    (["--null-threshold", 1.5], "drop --null-threshold"),
    ("other model", "fitted for"),
])
def test_a_calibration_for_another_run_is_refused(fitted, checkpoints, tmp_path, change, named):
    d = fitted["dir"]
    args = ["run", fitted["sample"], "-o", tmp_path / "refused.parquet", *fitted["common"],
            "--calibration", d / "cal.json"]
    if change == "other model":
        args[args.index(fitted["model"])] = checkpoints["distilbert"]
    else:
        args = args[:-2] + list(change) + args[-2:]  # later options override: --max-seq-len 96 wins
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert named in r.stderr and not (tmp_path / "refused.parquet").exists()
    if change != ["--null-threshold", 1.5]:
        assert "--force-calibration" in r.stderr
    if change in ("other model", ["--max-seq-len", 96]):
        r = run_cli(*args, "--force-calibration")
        assert r.returncode == 0, r.stderr
        meta = json.loads(pq.read_metadata(tmp_path / "refused.parquet").metadata[b"qa_batch"])
        assert meta["calibration"]["path"] == str(d / "cal.json")


def test_not_a_calibration_file_exits_2(tmp_path, fitted):
    (tmp_path / "x.json").write_text('{"weights": [1]}')
    r = run_cli("run", fitted["sample"], "-o", tmp_path / "o.parquet", "--model", fitted["model"],
                "--calibration", tmp_path / "x.json")
    assert r.returncode == 2 and "not a qa-batch calibration" in r.stderr


def test_eval_of_answers_without_scores_searches_no_threshold(tmp_path):
    """Answers with no scores (e.g. another system's): F1 and no threshold, rather than a best F1 of 0."""
    pq.write_table(pa.table({"id": ["a", "b"], "answer": ["x", None]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "answers": pa.array([["x"], []], pa.list_(pa.string()))}),
                   tmp_path / "g.parquet")
    rep = evaluate(str(tmp_path / "a.parquet"), str(tmp_path / "g.parquet"))
    assert rep.f1 == 100.0 and rep.best_f1 is None and rep.ece is None
    assert "lack a best span" in rep.threshold_note


def test_a_calibration_applies_to_the_answers_of_documents(fitted):
    """--document-col with --calibration: the documents' null decisions are those of the bias as
    --null-threshold, and their confidence the calibrator's probability of the document's logits."""
    d, cal = fitted["dir"], fitted["cal"]
    grouped = ["--document-col", "title", "--question", "When were the Normans in Normandy?", "--question",
               "What is a complexity class?", *fitted["common"]]
    r = run_cli("run", fitted["sample"], "-o", d / "docs-calibrated.parquet", *grouped, "--calibration", d / "cal.json")
    assert r.returncode == 0, r.stderr
    r = run_cli("run", fitted["sample"], "-o", d / "docs-threshold.parquet", *grouped, "--allow-null",
                "--null-threshold", repr(cal["null_bias"]))
    assert r.returncode == 0, r.stderr
    calibrated, by_hand = pq.read_table(d / "docs-calibrated.parquet"), pq.read_table(d / "docs-threshold.parquet")
    assert calibrated.num_rows == 4 and min(calibrated["passages"].to_pylist()) > 1  # 2 articles x 2 questions
    assert_same_answers(calibrated.drop_columns(["confidence", "answers"]),
                        by_hand.drop_columns(["confidence", "answers"]))
    logits = RowLogits(span_score=[a[0]["score"] for a in calibrated["answers"].to_pylist()],
                       runner_up=calibrated["runner_up_score"].to_pylist(),
                       null_score=calibrated["null_score"].to_pylist(), log_norm=calibrated["log_norm"].to_pylist())
    expected = calibrate.load(str(d / "cal.json")).probability(logits)
    np.testing.assert_allclose(calibrated["confidence"].to_numpy(), expected, rtol=1e-5)


def test_a_calibration_refitted_between_a_kill_and_the_rerun_is_not_mixed_in(fitted, tmp_path):
    """Parts answered with one calibration are never assembled with parts answered with another
    under the same path: the manifest holds the calibration's digest, not only its path."""
    d = fitted["dir"]
    cal = tmp_path / "cal.json"
    shutil.copy(d / "cal.json", cal)
    out = tmp_path / "out.parquet"
    args = ["run", fitted["sample"], "-o", out, *fitted["common"], "--rows-per-window", 8, "--calibration", cal]
    r = run_cli(*args, env={"QA_BATCH_CRASH_AT": "part_written:2"})
    assert r.returncode == -9, r.stderr
    refitted = json.loads(cal.read_text())
    refitted["intercept"] += 0.5  # what a refit on new labels does: other parameters, same file
    cal.write_text(json.dumps(refitted))
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert f"the calibration {cal} was refitted since the interrupted run" in r.stderr and "--restart" in r.stderr
    assert not out.exists()
    r = run_cli(*args, "--restart")
    assert r.returncode == 0, r.stderr
    meta = json.loads(pq.read_metadata(out).metadata[b"qa_batch"])
    assert meta["calibration"]["digest"] == calibrate.load(str(cal)).digest


def test_every_engine_applies_the_one_calibration_the_job_loaded(fitted, tmp_path):
    """Worker processes and Ray actors apply the calibration the job loaded (passed to them, not
    read again from the file): the same output as one process, with the same digest recorded."""
    pytest.importorskip("ray.data")
    d = fitted["dir"]
    cal = os.path.relpath(d / "cal.json", ROOT)  # a relative path, as users give it
    common = [fitted["sample"], *fitted["common"], "--rows-per-window", 8, "--calibration", cal]
    r = run_cli("run", *common, "-o", tmp_path / "one.parquet")
    assert r.returncode == 0, r.stderr
    one = pq.read_table(tmp_path / "one.parquet")
    r = run_cli("run", *common, "-o", tmp_path / "two.parquet", "--devices", "cpu,cpu")
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(tmp_path / "two.parquet"), one)
    r = run_cli("run", *common, "-o", tmp_path / "ray", "--engine", "ray", "--num-gpus", "0", "--cpu-workers", "1",
                timeout=600)
    assert r.returncode == 0, r.stderr
    got = pq.read_table(tmp_path / "ray").sort_by("id")
    assert_same_answers(got.select(one.column_names), one.sort_by("id"))
    meta = json.loads(pq.read_metadata(tmp_path / "two.parquet").metadata[b"qa_batch"])
    assert meta["calibration"]["digest"] == calibrate.load(str(d / "cal.json")).digest


def test_a_manifest_from_before_calibration_digests_is_a_different_job():
    from pipeline.engines.resume import describe_difference

    old = {"inputs": [], "model": {}, "options": {"calibration": "cal.json", "top_k": 1}}
    new = {"inputs": [], "model": {}, "options": {"calibration": {"path": "cal.json", "digest": "sha256:1"},
                                                  "top_k": 1}}
    assert "did not record its parameters" in describe_difference(old, new)
    refit = {**new, "options": {**new["options"], "calibration": {"path": "cal.json", "digest": "sha256:2"}}}
    assert describe_difference(new, refit) == \
        "the calibration cal.json was refitted since the interrupted run (its parameters differ)"
    elsewhere = {**new, "options": {**new["options"], "calibration": {"path": "b.json", "digest": "sha256:1"}}}
    assert describe_difference(new, elsewhere).startswith("option calibration differs")


def test_an_option_the_fitted_run_did_not_record_is_not_compared(fitted):
    cal = calibrate.load(str(fitted["dir"] / "cal.json"))
    assert cal.options["backend"] == "torch"
    older = dataclasses.replace(cal, options={k: v for k, v in cal.options.items() if k != "backend"})
    unrecorded = dataclasses.replace(cal, options={**cal.options, "backend": None})
    run = {**cal.options, "backend": "onnxruntime", "quantize": "int8"}
    assert cal.mismatches(None, run) == ["--quantize int8, fitted with none", "--backend onnxruntime, fitted with torch"]
    assert older.mismatches(None, run) == unrecorded.mismatches(None, run) == ["--quantize int8, fitted with none"]


def test_a_float32_calibration_applies_to_both_float32_backends(fitted):
    """Issue 22: ONNX Runtime float32 gives PyTorch float32's spans (208/208 measured): no
    --force-calibration between them; int8 paths keep different answers and stay refused."""
    cal = calibrate.load(str(fitted["dir"] / "cal.json"))
    assert cal.mismatches(None, {**cal.options, "backend": "onnxruntime"}) == []
    assert cal.mismatches(None, {**cal.options, "backend": "onnxruntime", "quantize": "int8"}) != []


# ---- issue 22: a calibrator that never ranks worse than the raw confidence; README's
# definitions worked by hand, not through the code under test (issue 26 item 2) ----

def test_the_four_features_by_hand():
    """README: share among every candidate and n' = null - b; margin |span - n'|; is_null; gap."""
    logits = RowLogits(span_score=[5.0], runner_up=[3.0], null_score=[1.0], log_norm=[math.log(math.e ** 5 +
                                                                                              math.e ** 3)])
    share, margin, null, gap = calibrate.features(logits, null_bias=0.5)[0]
    assert share == pytest.approx(math.e ** 5 / (math.e ** 5 + math.e ** 3 + math.e ** 0.5))
    assert (margin, null, gap) == (pytest.approx(4.5), 0.0, pytest.approx(2.0))
    # null when null - span > b: 1 - (-1) = 2 > 0.5; its share is n' over every candidate and n'
    logits = RowLogits(span_score=[-1.0], runner_up=[float("nan")], null_score=[1.0], log_norm=[-1.0])
    share, margin, null, gap = calibrate.features(logits, null_bias=0.5)[0]
    assert share == pytest.approx(math.e ** 0.5 / (math.e ** -1 + math.e ** 0.5))
    assert (margin, null, gap) == (pytest.approx(1.5), 1.0, calibrate.GAP_CAP)  # no runner-up: the cap


def test_right_means_f1_at_least_a_half_or_null_when_unanswerable():
    null = np.array([False, False, True, True])
    has = np.array([True, True, False, True])
    f1 = np.array([0.5, 0.49, 0.0, 1.0])
    assert calibrate.correct(null, has, f1).tolist() == [True, False, True, False]


def test_auc_by_hand():
    assert calibrate.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert calibrate.auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # a tie counts half
    assert math.isnan(calibrate.auc([0.2, 0.3], [1, 1]))


def synthetic(n: int, seed: int, rule: str) -> tuple[RowLogits, np.ndarray]:
    """Rows with random logits and a label drawn from `rule`: right by share, by gap alone, or by chance."""
    rng = np.random.default_rng(seed)
    span = rng.normal(5, 2, n)
    runner = span - rng.exponential(2, n)
    null = rng.normal(0, 2, n)
    log_norm = np.logaddexp(span, runner) + rng.exponential(1, n)
    logits = RowLogits(span_score=span, runner_up=runner, null_score=null, log_norm=log_norm)
    share = calibrate.features(logits, None)[:, 0]
    p = {"share": share, "gap": 1 / (1 + np.exp(-(span - runner - 2) * 2)), "chance": np.full(n, 0.5)}[rule]
    return logits, rng.random(n) < p


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), rule=st.sampled_from(["share", "gap", "chance"]))
def test_the_share_calibrator_keeps_the_raw_ranking_and_features_must_win_held_out(seed, rule):
    logits, right = synthetic(400, seed, rule)
    kind, l2, scored = calibrate.choose_calibrator(logits, right, None)
    raw = calibrate.features(logits, None)[:, 0]
    x = calibrate.design(logits, None, "share")
    intercept, w, mean, scale = calibrate.fit_logistic(x, right, l2=1.0, monotone=True)
    p = calibrate._sigmoid(intercept + ((x - mean) / scale) @ w)
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(p[order]) >= -1e-12)  # a monotone map of the raw share: the same ranking
    assert w[0] > 0
    if kind == "features":  # kept only where it won held out on both counts
        assert scored["features"]["cv_log_loss"] < scored["share"]["cv_log_loss"]
        assert scored["features"]["cv_auc"] >= scored["share"]["cv_auc"] - calibrate.AUC_SLACK
        assert scored["features_gain"]["log_loss"] > calibrate.SELECT_SE * scored["features_gain"]["standard_error"]
    if rule == "gap":  # the share says little here, the gap a lot: the features win
        assert kind == "features"


def test_a_calibration_of_a_model_with_nothing_to_rank_says_so(tmp_path):
    logits, right = synthetic(300, 1, "chance")
    cal = calibrate.fit(logits, np.ones(300, bool), np.where(right, 1.0, 0.0), None, model={"id": "m"},
                        options={}, confidence_before=calibrate.features(logits, None)[:, 0],
                        null_before=np.zeros(300, bool), fitted_on={})
    assert cal.calibrator == "share"
    assert any("no better than chance" in w or "barely varies" in w for w in cal.metrics["warnings"])
    after = cal.metrics["after"]
    assert after["auc"] == pytest.approx(cal.metrics["null_bias_only"]["auc"], abs=1e-9)  # never ranks worse
    path = tmp_path / "cal.json"
    path.write_text(cal.to_json())
    again = calibrate.load(str(path))  # a share calibrator survives its file
    assert again.calibrator == "share" and again.features == ("share_logit",)
    np.testing.assert_allclose(again.probability(logits), cal.probability(logits))


def test_eval_draws_its_plot_through_the_cli(fitted):
    """README: `qa-batch eval ... --plot PNG` draws the threshold curve and the reliability diagram,
    before and after --calibration."""
    d = fitted["dir"]
    png = d / "eval.png"
    r = run_cli("eval", d / "plain.parquet", fitted["sample"], "--calibration", d / "cal.json", "--plot", png)
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # an image with two drawn panels
    from PIL import Image

    width, height = Image.open(png).size
    assert width > 2 * height * 0.9  # two panels side by side
