"""Inputs and outputs on an object store: a real S3 server (moto) on localhost.

The CLI runs as a subprocess with s3:// paths and finds the server through
AWS_ENDPOINT_URL_S3, as it would find MinIO or any S3-compatible store.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SAMPLE, assert_same_answers, run_cli
from pipeline import storage

OPTIONS = ["--rows-per-window", "8", "--max-seq-len", "128", "--doc-stride", "32"]


@pytest.mark.parametrize("pattern,path,matches", [
    ("*.parquet", "a.parquet", True), ("*.parquet", "d/a.parquet", False),
    ("**/*.parquet", "a.parquet", True), ("**/*.parquet", "d/e/a.parquet", True),
    ("d/[ab].parquet", "d/b.parquet", True), ("d/[!ab].parquet", "d/b.parquet", False),
    ("part-??.parquet", "part-07.parquet", True), ("part-??.parquet", "part-7.parquet", False),
    ("x.parquet", "x_parquet", False),
])
def test_glob_patterns_match_like_the_shell(pattern, path, matches):
    assert bool(re.fullmatch(storage._glob_regex(pattern), path)) == matches


def test_uris_keep_their_endpoint_options_when_joined():
    uri = "s3://bucket/out/answers.parquet?endpoint_override=localhost:9000&scheme=http"
    assert storage.with_suffix(uri, ".partial") == \
        "s3://bucket/out/answers.parquet.partial?endpoint_override=localhost:9000&scheme=http"
    assert storage.join(storage.with_suffix(uri, ".partial"), "manifest.json") == \
        "s3://bucket/out/answers.parquet.partial/manifest.json?endpoint_override=localhost:9000&scheme=http"
    assert storage.parent(uri) == "s3://bucket/out?endpoint_override=localhost:9000&scheme=http"
    assert storage.basename(uri) == "answers.parquet"
    assert not storage.is_uri("file:///tmp/x.parquet") and storage.is_uri("gs://b/x.parquet")


@pytest.fixture(scope="module")
def exports(s3, tmp_path_factory, checkpoints):
    """Two input files on S3 (and a hidden one that is not input), and the local run's output."""
    base = tmp_path_factory.mktemp("s3job")
    table = pq.read_table(SAMPLE)
    first, second = base / "a.parquet", base / "b.parquet"
    pq.write_table(table.slice(0, 20), first)
    pq.write_table(table.slice(20), second)
    for local, key in ((first, "exports/day=1/a.parquet"), (second, "exports/day=2/b.parquet"),
                       (first, "exports/.staging/a.parquet")):
        pq.write_table(pq.read_table(local), f"nightly/{key}", filesystem=s3["fs"])
    ref = base / "reference.parquet"
    r = run_cli("run", first, second, "-o", ref, "--model", checkpoints["bert"], *OPTIONS)
    assert r.returncode == 0, r.stderr
    return {"reference": pq.read_table(ref), "model": checkpoints["bert"]}


def _cli(s3, *args, extra_env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **s3["env"], **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "jobs.cli", "run", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def _keys(s3, prefix):
    return sorted(f.path for f in s3["fs"].get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
                  if f.type == pafs.FileType.File)


def test_a_run_reads_and_writes_s3_like_local_files(s3, exports):
    r = _cli(s3, "s3://nightly/exports/", "-o", "s3://nightly/answers/run1.parquet", "--model", exports["model"],
             *OPTIONS)
    assert r.returncode == 0, r.stderr
    got = pq.read_table("nightly/answers/run1.parquet", filesystem=s3["fs"])
    assert_same_answers(got, exports["reference"])  # the hidden .staging folder was not read
    assert _keys(s3, "nightly/answers") == ["nightly/answers/run1.parquet"]  # no parts, no temporary files


def test_a_glob_on_s3_selects_files_and_an_existing_output_is_kept(s3, exports):
    out = "s3://nightly/answers/glob.parquet"
    r = _cli(s3, "s3://nightly/exports/day=*/*.parquet", "-o", out, "--model", exports["model"], *OPTIONS)
    assert r.returncode == 0, r.stderr
    assert_same_answers(pq.read_table("nightly/answers/glob.parquet", filesystem=s3["fs"]), exports["reference"])
    again = _cli(s3, "s3://nightly/exports/day=*/*.parquet", "-o", out, "--model", exports["model"], *OPTIONS)
    assert again.returncode == 2 and "exists: pass --overwrite" in again.stderr


def test_an_interrupted_run_on_s3_resumes_from_its_parts_on_s3(s3, exports):
    out = "s3://nightly/answers/resumed.parquet"
    args = ("s3://nightly/exports/", "-o", out, "--model", exports["model"], *OPTIONS)
    r = _cli(s3, *args, extra_env={"QA_BATCH_CRASH_AT": "part_written:4"})
    assert r.returncode == -9, r.stderr  # SIGKILL while writing the 4th part
    parts = [k for k in _keys(s3, "nightly/answers/resumed.parquet.partial") if re.search(r"part-\d+\.parquet$", k)]
    assert len(parts) == 3
    assert s3["fs"].get_file_info("nightly/answers/resumed.parquet").type == pafs.FileType.NotFound
    r = _cli(s3, *args)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stderr
    assert_same_answers(pq.read_table("nightly/answers/resumed.parquet", filesystem=s3["fs"]), exports["reference"])
    assert _keys(s3, "nightly/answers/resumed.parquet.partial") == []


def test_a_missing_bucket_is_a_usage_error(s3, exports):
    r = _cli(s3, "s3://no-such-bucket/exports/", "--model", exports["model"])
    assert r.returncode == 2
    assert "s3://no-such-bucket/exports/" in r.stderr
