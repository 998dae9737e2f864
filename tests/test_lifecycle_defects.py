"""Regression tests for the lifecycle defects of issue 20, one each: what a run does with its
output path, its work directory, an earlier output, a killed run's parts and a changed model,
option or version. The generated lifecycle test (test_lifecycle.py) found or re-finds them too."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE, assert_same_answers, run_cli, write_parquet
from pipeline import storage
from pipeline.models.checkpoint import content_hash
from pipeline.stages.write import read_metadata

# each test runs the CLI end to end, often killed and rerun, Ray included: the long runs' step
pytestmark = pytest.mark.slow

FAST = ["--rows-per-window", "8", "--max-seq-len", "64", "--doc-stride", "16", "--limit", "24"]


@pytest.fixture(scope="module")
def sample24(tmp_path_factory):
    base = tmp_path_factory.mktemp("life")
    path = base / "in.parquet"
    pq.write_table(pq.read_table(SAMPLE).slice(0, 24), path, row_group_size=5)
    return path


def test_local_output_ending_in_a_slash_is_refused_and_nothing_is_left(sample24, bert_dir, tmp_path):
    """It made out/.partial inside the output, then refused with 'output out/ exists', leaving a folder."""
    out = str(tmp_path / "out") + "/"
    r = run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST)
    assert r.returncode == 2 and "names a folder (it ends in /)" in r.stderr and "--engine ray" in r.stderr
    assert os.listdir(tmp_path) == []


def test_ray_output_ending_in_a_slash_is_that_folder(sample24, bert_dir, tmp_path):
    """Ray moved the output aside together with its own .partial/files and failed with exit 3."""
    out = str(tmp_path / "out") + "/"
    for extra in ([], ["--overwrite"]):  # a new output, then one replacing it
        r = run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST, "--engine", "ray", "--cpu-workers", "1",
                    *extra)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder, nothing set aside
        assert "_SUCCESS" in os.listdir(out) and pq.read_table(out).num_rows == 24


def test_the_model_identity_covers_shards_and_the_tokenizer(tmp_path, bert_dir):
    """It hashed config.json, model.safetensors and pytorch_model.bin only."""
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(bert_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in os.listdir(bert_dir):
        if "token" in name or "vocab" in name:
            shutil.copy(os.path.join(bert_dir, name), sharded / name)
    shards = sorted(n for n in os.listdir(sharded) if n.startswith("model-0"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").exists()
    before = content_hash(str(sharded))
    data = bytearray((sharded / shards[-1]).read_bytes())
    data[-1] ^= 1  # one bit of the weights in the last shard
    (sharded / shards[-1]).write_bytes(bytes(data))
    retrained = content_hash(str(sharded))
    assert retrained != before
    vocab = sharded / "tokenizer.json"
    vocab.write_text(vocab.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    assert content_hash(str(sharded)) != retrained
    renamed = content_hash(str(sharded))
    for name in ("README.md", "eval_results.json", "trainer_state.json", "training_args.bin"):
        (sharded / name).write_text("written by an evaluation mid-job")  # not read by loading: no new model
    assert content_hash(str(sharded)) == renamed


def test_a_checkpoint_retrained_in_place_between_a_kill_and_the_rerun_is_another_job(sample24, bert_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(bert_dir, model)
    out = tmp_path / "out.parquet"
    r = run_cli("run", sample24, "-o", out, "--model", model, *FAST, env={"QA_BATCH_CRASH_AT": "part_written:2"})
    assert r.returncode == -signal.SIGKILL
    tok = model / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))  # the vocabulary changed, weights not
    r = run_cli("run", sample24, "-o", out, "--model", model, *FAST)
    assert r.returncode == 2 and "the model differs" in r.stderr and "--restart" in r.stderr


def test_a_resume_across_an_upgrade_is_another_job(sample24, bert_dir, tmp_path):
    """The manifest recorded no versions: parts of two qa-batch or torch versions were merged."""
    out = tmp_path / "out.parquet"
    r = run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST, env={"QA_BATCH_CRASH_AT": "part_written:2"})
    assert r.returncode == -signal.SIGKILL
    manifest_path = tmp_path / "out.parquet.partial" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert set(manifest["versions"]) >= {"qa_batch", "torch", "transformers", "tokenizers"}
    manifest["versions"]["torch"] = "2.4.0"  # as if torch was upgraded since
    manifest_path.write_text(json.dumps(manifest))
    r = run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST)
    assert r.returncode == 2 and "torch 2.4.0 then" in r.stderr
    r = run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST, "--restart")
    assert r.returncode == 0, r.stderr
    recorded = read_metadata(str(out))["versions"]
    assert recorded["torch"] != "2.4.0" and recorded["qa_batch"] == manifest["versions"]["qa_batch"]


def test_wide_is_part_of_the_job(tmp_path, bert_dir):
    """Killed after the final rename, a rerun with --wide toggled exited 0 with the other shape."""
    src = write_parquet(tmp_path / "docs.parquet", {"passage": ["the normans came from normandy"] * 3})
    out = tmp_path / "out.parquet"
    common = ["--model", bert_dir, "--question", "who came?", "--question", "from where?", "--max-seq-len", "32",
              "--doc-stride", "8"]
    r = run_cli("run", src, "-o", out, *common, env={"QA_BATCH_CRASH_AT": "cleaning_up:1"})
    assert r.returncode == -signal.SIGKILL and out.exists()
    r = run_cli("run", src, "-o", out, *common, "--wide")
    assert r.returncode == 2 and "exists" in r.stderr and pq.read_table(out).num_rows == 6  # the long output kept
    r = run_cli("run", src, "-o", out, *common, "--wide", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert pq.read_table(out).num_rows == 3 and not os.path.exists(str(out) + ".partial")


def test_a_glob_input_never_gets_an_output_it_would_match(tmp_path, bert_dir):
    """The default output of 'dir/*.parquet' landed in dir: the next night failed on its schema;
    with '**' an interrupted run could never resume (the glob matched its own parts)."""
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pq.read_table(SAMPLE).slice(0, 6), folder / "a.parquet")
    pattern = str(folder / "*.parquet")
    for night in (1, 2):
        r = run_cli("run", pattern, "--model", bert_dir, "--max-seq-len", "64", "--doc-stride", "16", "--overwrite")
        assert r.returncode == 0, (night, r.stderr)
    assert sorted(os.listdir(tmp_path)) == ["in", "in.answers.parquet"] and os.listdir(folder) == ["a.parquet"]
    deep = str(folder / "**" / "*.parquet")  # its parts, in x.partial/, would match: it could never resume
    for glob_, out in ((pattern, folder / "answers.parquet"), (deep, folder / "sub" / "x")):
        r = run_cli("run", glob_, "-o", out, "--model", bert_dir)
        assert r.returncode == 2 and "would match the input glob" in r.stderr, r.stderr
    r = run_cli("run", pattern, "-o", folder / "answers.json", "--model", bert_dir, "--max-seq-len", "64",
                "--doc-stride", "16")  # in the folder, but no path the glob matches: fine
    assert r.returncode == 0, r.stderr


def test_a_uri_query_is_not_a_glob():
    """glob.has_magic saw '?endpoint_override=...' as a glob and skipped the inside-an-input check."""
    assert not storage.is_glob("s3://bucket/in?endpoint_override=localhost:9000&scheme=http")
    assert storage.is_glob("s3://bucket/in/*.parquet?endpoint_override=localhost:9000")
    assert storage.glob_could_match("s3://b/in/*.parquet?scheme=http", "s3://b/in/x.parquet?scheme=http")
    assert not storage.glob_could_match("s3://b/in/*.parquet?scheme=http", "s3://b/in/sub/x.parquet?scheme=http")
    assert storage.glob_could_match("s3://b/in/**/*.parquet", "s3://b/in/sub/deeper/x.parquet")


def test_a_part_cut_short_by_a_power_loss_is_answered_again(sample24, bert_dir, tmp_path):
    """A renamed part truncated after a power loss raised ArrowInvalid through assembly (exit 1)."""
    out = tmp_path / "out.parquet"
    ref = tmp_path / "ref.parquet"
    assert run_cli("run", sample24, "-o", ref, "--model", bert_dir, *FAST).returncode == 0
    r = run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST, env={"QA_BATCH_CRASH_AT": "part_written:3"})
    assert r.returncode == -signal.SIGKILL
    part = tmp_path / "out.parquet.partial" / "part-000000000008.parquet"
    part.write_bytes(part.read_bytes()[:100])  # what the disk kept of it
    r = run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST, "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table(out), pq.read_table(ref))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["resumed_from_row"] == 8 and report["rows_this_run"] == 16  # the window of the cut part again


def test_a_question_list_with_a_bom_has_no_bom_in_its_first_question(tmp_path):
    from pipeline.stages.questions import load

    path = tmp_path / "q.txt"
    path.write_bytes("\ufeffwho?\nwhat?\n".encode("utf-8"))
    assert load(str(path)).questions[0] == "who?"


def test_keep_columns_named_twice_is_refused_before_any_work(sample24, bert_dir, tmp_path):
    """It answered every row, then died at assembly with ArrowInvalid (exit 1)."""
    r = run_cli("run", sample24, "-o", tmp_path / "o.parquet", "--model", bert_dir, "--keep-columns", "id,id")
    assert r.returncode == 2 and "--keep-columns names id more than once" in r.stderr
    assert os.listdir(tmp_path) == []


def test_eval_refuses_fitting_and_applying_two_calibrations_at_once(tmp_path):
    r = run_cli("eval", SAMPLE, SAMPLE, "--fit-calibration", tmp_path / "new.json", "--calibration",
                tmp_path / "old.json")
    assert r.returncode == 2 and "give one" in r.stderr and not (tmp_path / "new.json").exists()


def test_onnxruntime_on_ray_plans_cpu_actors_even_where_there_are_gpus():
    from pipeline.config import RunConfig
    from pipeline.engines.ray_engine import _check_ray_options
    from pipeline.errors import UsageError

    assert _check_ray_options(RunConfig(inputs=("x",), backend="onnxruntime")) == 0  # --num-gpus auto
    with pytest.raises(UsageError, match=r"--backend onnxruntime \(CPU only\) with --num-gpus 1: choose one"):
        _check_ray_options(RunConfig(inputs=("x",), backend="onnxruntime", num_gpus=1))


RAY = ["--engine", "ray", "--cpu-workers", "1"]


def test_a_finished_ray_output_is_recognised_as_its_jobs(sample24, bert_dir, tmp_path):
    """Killed after publishing, before the staging folder went: the next job on that path was told
    that 'an interrupted run differs' (its output, a folder, was never recognised as finished)."""
    out = tmp_path / "out"
    r = run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST, *RAY, env={"QA_BATCH_CRASH_AT": "published:1"})
    assert r.returncode == -signal.SIGKILL and (out / "_SUCCESS").exists()
    finished = (out / "_SUCCESS").read_bytes()
    r = run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST, *RAY, "--top-k", "2")
    assert r.returncode == 2 and f"output {out} exists" in r.stderr and "differs" not in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the finished job's leftovers cleared, its output kept
    assert (out / "_SUCCESS").read_bytes() == finished


def test_a_publish_killed_between_its_last_two_steps_leaves_nothing_aside(sample24, bert_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST, *RAY).returncode == 0
    r = run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST, *RAY, "--top-k", "2", "--overwrite",
                env={"QA_BATCH_CRASH_AT": "replaced:1"})
    assert r.returncode == -signal.SIGKILL and (tmp_path / ".out.replaced").exists()
    r = run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST, *RAY, "--top-k", "2", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"] and "answers" in pq.read_table(out).column_names


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_an_empty_csv_question_list_says_so_in_qa_batchs_words(tmp_path, content):
    """Issue 22: pyarrow's threaded reader aborted the process (exit 134) about 1 run in 4; a file of
    blank lines gave pyarrow's 'cannot infer number of columns'."""
    from pipeline.errors import UsageError
    from pipeline.stages.questions import load

    path = tmp_path / "fields.csv"
    path.write_bytes(content)
    for _ in range(5):
        with pytest.raises(UsageError, match="the file is empty: give a header line 'question'"):
            load(str(path))


def test_the_readme_ways_to_read_a_ray_output_folder_work(sample24, bert_dir, tmp_path):
    """Issue 22: README said polars skips '_' files; pl.read_parquet of the folder fails on _SUCCESS."""
    import polars as pl

    out = tmp_path / "answers"
    r = run_cli("run", sample24, "-o", out, "--model", bert_dir, *FAST, *RAY)
    assert r.returncode == 0, r.stderr
    assert pq.read_table(out).num_rows == 24  # pyarrow.parquet.read_table of the folder
    assert pl.read_parquet(f"{out}/*.parquet").height == 24  # polars: a glob of the shard files
    with pytest.raises(Exception):
        pl.read_parquet(str(out))  # what README now warns about


def test_a_failed_read_of_the_manifest_or_a_part_deletes_nothing(tmp_path):
    """Review of issue 20's change: any OSError reading the manifest counted as 'no job here', so
    the work directory (every part) was deleted; a failed read of a part deleted that part. Only
    a missing or cut-short manifest, and a part whose bytes are wrong, may be treated so."""
    from pipeline.engines.resume import WorkDir, readable

    work = tmp_path / "out.parquet.partial"
    work.mkdir()
    (work / "part-000000000000.parquet").write_bytes(b"kept")
    (work / "manifest.json").mkdir()  # reading it fails with an OSError, as a flaky store would
    with pytest.raises(OSError):
        WorkDir(str(work)).open({"inputs": []}, False, str(tmp_path / "out.parquet"))
    assert (work / "part-000000000000.parquet").read_bytes() == b"kept"
    with pytest.raises(OSError):
        readable(str(work / "manifest.json"))  # a read error is raised, not taken for a damaged part
    assert readable(str(work / "part-000000000000.parquet")) is False  # wrong bytes: answered again


def test_a_glob_of_the_working_directory_or_a_bucket_top_needs_an_output(tmp_path, monkeypatch):
    """Its folder's 'beside' is the parent directory (often not writable) or nowhere."""
    from pipeline.engines.job import default_output
    from pipeline.errors import UsageError

    monkeypatch.chdir(tmp_path)
    for spec in ("*.parquet", str(tmp_path / "*.parquet"), "s3://bucket/*.parquet"):
        with pytest.raises(UsageError, match="no folder to put the answers beside: give the output with -o"):
            default_output((spec,), ("x.parquet",))
    assert default_output(("in/*.parquet",), ("in/a.parquet",)) == str(tmp_path / "in.answers.parquet")
