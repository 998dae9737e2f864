"""convert, eval, summary, --config, --log-format and the scheduled-job recipes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SAMPLE, run_cli
from pipeline.quality.evaluate import evaluate, exact_match, f1, normalize_answer

SQUAD = {
    "version": "v2.0",
    "data": [
        {"title": "Normans", "paragraphs": [
            {"context": "The Normans were the people who gave their name to Normandy, a region in France.",
             "qas": [
                 {"id": "q1", "question": "What region is named after the Normans?", "is_impossible": False,
                  "answers": [{"text": "Normandy", "answer_start": 51}, {"text": "Normandy, a region", "answer_start": 51}]},
                 {"id": "q2", "question": "Where is Normandy?", "is_impossible": False,
                  "answers": [{"text": "France", "answer_start": 73}]},
                 {"id": "q3", "question": "Who named Iceland?", "is_impossible": True, "answers": [],
                  "plausible_answers": [{"text": "Normans", "answer_start": 4}]},
             ]},
            {"context": "They came from Denmark, Iceland and Norway in the 10th century.",
             "qas": [
                 {"id": "q4", "question": "When did they come?", "is_impossible": False,
                  "answers": [{"text": "the 10th century", "answer_start": 46}]},
             ]},
        ]},
        {"title": "Complexity", "paragraphs": [
            {"context": "Complexity theory classifies problems by difficulty.",
             "qas": [{"id": "q5", "question": "What is the colour of P?", "is_impossible": True, "answers": []}]},
        ]},
    ],
}


@pytest.fixture
def gold(tmp_path):
    src = tmp_path / "squad.json"
    src.write_text(json.dumps(SQUAD))
    out = tmp_path / "gold.parquet"
    r = run_cli("convert", src, "-o", out)
    assert r.returncode == 0, r.stderr
    return out


def test_normalization_rules_by_hand():
    assert normalize_answer("The Cat") == "cat"  # lower case, article gone
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as words
    assert normalize_answer("U.S.A.!") == "usa"  # punctuation removed
    assert normalize_answer("  many \t spaces\n") == "many spaces"
    assert normalize_answer("Cat's, hat") == "cats hat"
    assert exact_match("the Normandy", "Normandy") == 1.0
    assert f1("the cat sat", "cat sat on mat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert f1("", "") == 1.0 and f1("x", "") == 0.0 and f1("", "x") == 0.0
    assert f1("a b c", "d e") == 0.0


def test_convert_squad_and_join_articles(tmp_path, gold):
    t = pq.read_table(gold)
    assert t.column_names == ["id", "title", "question", "passage", "answers", "answer_starts", "is_impossible"]
    assert t["id"].to_pylist() == ["q1", "q2", "q3", "q4", "q5"]
    assert t["is_impossible"].to_pylist() == [False, False, True, False, True]
    for row in t.to_pylist():
        for text, start in zip(row["answers"], row["answer_starts"]):
            assert row["passage"][start:start + len(text)] == text
    src = tmp_path / "squad.json"
    r = run_cli("convert", src, "-o", tmp_path / "joined.parquet", "--join-article")
    assert r.returncode == 0
    for row in pq.read_table(tmp_path / "joined.parquet").to_pylist():
        for text, start in zip(row["answers"], row["answer_starts"]):
            assert row["passage"][start:start + len(text)] == text  # offsets shifted into the article
    assert "\n\n" in pq.read_table(tmp_path / "joined.parquet")["passage"][3].as_py()


def test_convert_names_where_bad_input_broke(tmp_path):
    (tmp_path / "bad.json").write_text('{"data": [ {"paragraphs": [ }')
    r = run_cli("convert", tmp_path / "bad.json", "-o", tmp_path / "o.parquet")
    assert r.returncode == 2 and "bad.json" in r.stderr and "line 1" in r.stderr
    broken = json.loads(json.dumps(SQUAD))
    del broken["data"][0]["paragraphs"][1]["qas"][0]["question"]
    (tmp_path / "wrong.json").write_text(json.dumps(broken))
    r = run_cli("convert", tmp_path / "wrong.json", "-o", tmp_path / "o.parquet")
    assert r.returncode == 2 and "data[0].paragraphs[1].qas[0]" in r.stderr
    assert not (tmp_path / "o.parquet").exists()


def answers_table(path, answers: dict, scores=None, null_scores=None, confidence=None):
    ids = list(answers)
    pq.write_table(pa.table({
        "id": ids, "answer": [answers[i] for i in ids],
        "score": scores or [1.0] * len(ids), "null_score": null_scores or [0.0] * len(ids),
        "confidence": confidence or [0.9] * len(ids),
    }), path)
    return path


def test_gold_answers_score_100(tmp_path, gold):
    g = pq.read_table(gold).to_pylist()
    path = answers_table(tmp_path / "a.parquet", {r["id"]: (r["answers"][0] if r["answers"] else None) for r in g})
    rep = evaluate(str(path), str(gold))
    assert (rep.exact, rep.f1) == (100.0, 100.0)
    assert rep.has_answer == {"rows": 3, "exact": 100.0, "f1": 100.0}
    assert rep.no_answer == {"rows": 2, "exact": 100.0, "f1": 100.0}
    assert rep.missing_in_answers == rep.missing_in_gold == 0


def test_perturbed_answers_give_hand_computed_figures(tmp_path, gold):
    preds = {
        "q1": "Normandy, a region in France",  # EM 0; F1 vs "Normandy, a region": p 2/4, r 2/2 -> 2/3
        "q2": "France",  # EM 1
        "q3": "Normans",  # unanswerable but answered: 0
        "q4": "10th",  # vs "the 10th century": p 1, r 1/2 -> 2/3
        "extra": "x",  # not in gold: counted
    }  # q5 missing from answers: counted
    path = answers_table(tmp_path / "a.parquet", preds)
    rep = evaluate(str(path), str(gold))
    assert rep.rows_matched == 4 and rep.missing_in_answers == 1 and rep.missing_in_gold == 1
    assert rep.exact == pytest.approx(100 * 1 / 4)
    assert rep.f1 == pytest.approx(100 * (2 / 3 + 1 + 0 + 2 / 3) / 4)
    assert rep.has_answer["f1"] == pytest.approx(100 * (2 / 3 + 1 + 2 / 3) / 3)
    assert rep.no_answer == {"rows": 1, "exact": 0.0, "f1": 0.0}


def test_best_null_threshold_from_null_margins(tmp_path, gold):
    # Best spans for every row (a run without --allow-null) with null margins null_score - score:
    preds = {"q1": "Normandy", "q2": "Normans", "q3": "Normans", "q4": "the 10th century", "q5": "P"}
    margins = {"q1": -3.0, "q2": 1.0, "q3": 2.0, "q4": -1.0, "q5": 0.5}
    path = answers_table(tmp_path / "a.parquet", preds, scores=[0.0] * 5, null_scores=list(margins.values()))
    rep = evaluate(str(path), str(gold))
    # answering rows with margin <= t: t = -1 answers q1, q4 (right) and leaves q2, q3, q5 null:
    # q2 wrong (it has an answer), q3 and q5 right -> 4 of 5
    assert rep.best_exact == pytest.approx(80.0) and rep.best_exact_threshold == pytest.approx(-1.0)
    assert rep.best_f1 == pytest.approx(80.0)
    r = run_cli("eval", path, gold, "--json", tmp_path / "e.json", "--plot", tmp_path / "e.png")
    assert r.returncode == 0, r.stderr
    assert "best EM 80.00 at --null-threshold -1.000" in r.stdout
    assert json.loads((tmp_path / "e.json").read_text())["best_f1_threshold"] == pytest.approx(-1.0)
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gold_column_by_name(tmp_path, gold):
    g = pq.read_table(gold)
    renamed = tmp_path / "renamed.parquet"
    pq.write_table(g.rename_columns(["gold" if c == "answers" else c for c in g.column_names]), renamed)
    path = answers_table(tmp_path / "a.parquet", {r["id"]: (r["answers"][0] if r["answers"] else None)
                                                  for r in g.to_pylist()})
    r = run_cli("eval", path, renamed, "--gold-col", "gold")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^all +5 +100\.00 +100\.00$", r.stdout, re.M), r.stdout
    r = run_cli("eval", path, renamed)  # the default, 'answers', is not there
    assert r.returncode == 2
    assert "column 'answers' is missing" in r.stderr and "--gold-col" in r.stderr
    r = run_cli("eval", path, renamed, "--gold-col", "question")  # text, not a list of answers
    assert r.returncode == 2 and "'question' is String, not a list of gold answer strings" in r.stderr


def test_the_quick_tour_on_the_sample(tmp_path, bert_dir):
    """README's quick tour as shipped: run the sample, evaluate it against its own gold answers, summary by question."""
    sample = shutil.copy(SAMPLE, tmp_path / "sample.parquet")
    r = run_cli("run", sample, "--model", bert_dir)
    assert r.returncode == 0, r.stderr
    answers = tmp_path / "sample.answers.parquet"
    # the summary line alone (no warning that CUDA is absent), naming the device
    assert re.fullmatch(r"qa-batch: 45 rows \(45 answered, 0 null, 0 errors\), \d+ chunks in [\d.]+ s on cpu: "
                        rf"[\d.]+ rows/s, [\d.]+ chunks/s -> {re.escape(str(answers))}\n", r.stderr), r.stderr
    r = run_cli("eval", answers, sample)
    assert r.returncode == 0, r.stderr
    assert "rows evaluated 45 (missing from answers: 0, missing from gold: 0)" in r.stdout
    assert re.search(r"^has answer +29 ", r.stdout, re.M) and re.search(r"^no answer +16 ", r.stdout, re.M)
    assert "best F1" in r.stdout  # SQuAD 2.0-style: the null threshold is searched
    r = run_cli("summary", answers, "--by", "question")
    assert r.returncode == 0, r.stderr
    assert "by question (43 groups, rarely answered first; the first 20 shown, --top 43 shows all):" in r.stdout
    assert len(r.stdout.split("rarely answered first")[1].splitlines()) == 1 + 1 + 20  # header, columns, groups
    r = run_cli("summary", answers, "--by", "question", "--top", "45")
    assert r.returncode == 0, r.stderr
    assert "by question (43 groups, rarely answered first):" in r.stdout  # two questions are asked twice


def test_counts_of_one_are_singular(tmp_path, bert_dir):
    path = tmp_path / "one.parquet"
    pq.write_table(pa.table({"id": ["a"], "passage": ["Paris is the capital of France."],
                             "question": ["What is the capital of France?"]}), path)
    r = run_cli("run", path, "--model", bert_dir)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^qa-batch: 1 row \(1 answered, 0 null, 0 errors\), 1 chunk in [\d.]+ s on cpu: ", r.stderr, re.M), \
        r.stderr
    r = run_cli("summary", tmp_path / "one.answers.parquet", "--by", "question")
    assert r.returncode == 0 and "by question (1 group, rarely answered first):" in r.stdout, r.stdout + r.stderr
    one = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [SQUAD["data"][1]["paragraphs"][0]]}]}
    (tmp_path / "one.json").write_text(json.dumps(one))
    r = run_cli("convert", tmp_path / "one.json", "-o", tmp_path / "gold.parquet")
    assert r.returncode == 0 and "wrote 1 question to" in r.stderr, r.stderr


def test_summary_counts_and_rarely_answered_questions_first(tmp_path):
    path = tmp_path / "answers.parquet"
    pq.write_table(pa.table({
        "question": ["who?", "who?", "when?", "when?", "when?", "why?"],
        "answer": ["a", None, None, None, "b", None],
        "confidence": [0.95, 0.4, 0.1, 0.2, 0.55, None],
        "error": [None, None, None, None, None, "question too long: 99 tokens"],
    }), path)
    r = run_cli("summary", path, "--by", "question", "--json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["rows"], s["answered"], s["null"], s["errors"]) == (6, 2, 3, 1)
    assert s["errors_by_reason"] == {"question too long": 1}
    assert s["confidence_histogram"]["0.9-1.0"] == 1 and s["confidence_histogram"]["0.5-0.6"] == 1
    assert [g["question"] for g in s["groups"]] == ["why?", "when?", "who?"]
    assert "rarely answered first" in r.stdout

    # an --engine ray output, a directory of files, is summarized as the one table it is
    table = pq.read_table(path)
    (tmp_path / "ray-out").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "ray-out" / "a.parquet")
    pq.write_table(table.slice(2), tmp_path / "ray-out" / "b.parquet")
    r = run_cli("summary", tmp_path / "ray-out", "--by", "question", "--json", tmp_path / "d.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "d.json").read_text()) == s


def run_options_from_help() -> set[str]:
    from typer.main import get_command

    from jobs.cli import app
    run = get_command(app).commands["run"]
    return {p.name.replace("_", "-") for p in run.params}


def test_job_examples_are_valid_run_configs():
    known = run_options_from_help()
    with open(os.path.join(ROOT, "jobs", "examples", "nightly.toml"), "rb") as f:
        data = tomllib.load(f)
    assert data and set(data) <= known, set(data) - known


def test_the_rayjob_recipe_runs_a_valid_command():
    yaml = pytest.importorskip("yaml")  # comes with Ray
    with open(os.path.join(ROOT, "jobs", "kubernetes", "rayjob.yaml")) as f:
        job = yaml.safe_load(f)
    assert job["kind"] == "RayJob"
    words = job["spec"]["entrypoint"].split()
    assert words[:2] == ["qa-batch", "run"]
    used = {w[2:] for w in words if w.startswith("--")}
    assert used <= run_options_from_help(), used - run_options_from_help()
    gpus = int(words[words.index("--num-gpus") + 1])
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert gpus == workers["replicas"] * workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


def test_config_file_with_cli_overrides_and_unknown_keys(tmp_path, bert_dir):
    (tmp_path / "job.toml").write_text(
        f'inputs = ["{SAMPLE}"]\noutput = "{tmp_path}/out.parquet"\nmodel = "{bert_dir}"\n'
        f'limit = 5\nkeep-columns = ["title"]\ntop-k = 2\nmax-seq-len = 128\ndoc-stride = 32\n')
    r = run_cli("run", "--config", tmp_path / "job.toml", "--limit", "3")  # the flag wins
    assert r.returncode == 0, r.stderr
    t = pq.read_table(tmp_path / "out.parquet")
    assert t.num_rows == 3 and "title" in t.column_names and "answers" in t.column_names
    (tmp_path / "bad.toml").write_text('limit = 5\nmax_seq_lenn = 3\n')
    r = run_cli("run", SAMPLE, "--config", tmp_path / "bad.toml")
    assert r.returncode == 2 and "max_seq_lenn" in r.stderr


def test_json_log_lines(tmp_path, bert_dir):
    r = run_cli("run", SAMPLE, "-o", tmp_path / "o.parquet", "--model", bert_dir, "--limit", 2,
                "--log-format", "json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]
    assert {"run_started", "run_finished"} <= {e["event"] for e in events}
    done = [e for e in events if e["event"] == "run_finished"][0]
    for key in ("time", "level", "rows", "errors", "rows_per_s", "started_at", "finished_at"):
        assert key in done
    r = run_cli("run", SAMPLE, "-o", tmp_path / "o.parquet", "--model", bert_dir, "--log-format", "json")
    err = json.loads(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 2 and err["event"] == "error" and err["exit_code"] == 2


def test_cron_wrapper_runs_the_job_logs_and_never_overlaps(tmp_path, bert_dir):
    import sys

    (tmp_path / "nightly.toml").write_text(
        f'inputs = ["{SAMPLE}"]\noutput = "{tmp_path}/answers.parquet"\nmodel = "{bert_dir}"\n'
        f'limit = 4\noverwrite = true\n')
    script = os.path.join(ROOT, "jobs", "cron", "qa-batch-nightly.sh")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QA_BATCH": f"{sys.executable} -m jobs.cli",
           "QA_BATCH_LOCK": str(tmp_path / "lock")}
    r = subprocess.run([script, str(tmp_path / "nightly.toml"), str(tmp_path / "logs")], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert pq.read_table(tmp_path / "answers.parquet").num_rows == 4
    logs = os.listdir(tmp_path / "logs")
    assert len(logs) == 1 and logs[0].startswith("nightly-20")
    text = (tmp_path / "logs" / logs[0]).read_text()
    assert "starting" in text and "4 rows" in text and "exit code 0" in text
    # while one run holds the lock, a second one does not start
    ready = tmp_path / "holding"
    holder = subprocess.Popen(["flock", str(tmp_path / "lock"), "sh", "-c", f"touch {ready}; sleep 30"])
    try:
        import time
        deadline = time.monotonic() + 30
        while not ready.exists():  # the holder has the lock once it runs its command
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.02)
        r = subprocess.run([script, str(tmp_path / "nightly.toml"), str(tmp_path / "logs")], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 75 and "still holds" in r.stderr
    finally:
        holder.kill()


def test_cron_wrapper_refuses_a_lock_path_that_is_a_link(tmp_path):
    """A lock in a shared /tmp could be a link another user planted to a file of ours: the
    wrapper would have truncated it. It refuses a link (exit 2) and leaves the target alone."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "lock").symlink_to(target)
    (tmp_path / "nightly.toml").write_text('inputs = ["x"]\n')
    script = os.path.join(ROOT, "jobs", "cron", "qa-batch-nightly.sh")
    env = {**os.environ, "QA_BATCH": "false", "QA_BATCH_LOCK": str(tmp_path / "lock")}
    r = subprocess.run([script, str(tmp_path / "nightly.toml"), str(tmp_path / "logs")], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "symbolic link" in r.stderr
    assert target.read_text() == "keep me"
