from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import FAMILIES, Models, TableModel, make_checkpoint  # noqa: E402

# Generated tests: a fixed, bounded set of examples in CI (same examples every run, so CI is
# stable); `pytest --hypothesis-profile=long` draws many more, new ones each time.
settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample.parquet")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Tiny random-weight QA checkpoints on disk, one per architecture family."""
    base = tmp_path_factory.mktemp("checkpoints")
    return {fam: make_checkpoint(str(base / fam), fam) for fam in FAMILIES}


@pytest.fixture(scope="module")
def models(checkpoints) -> Models:
    """The loaded tiny BERT and RoBERTa, and a table model (logits by token id: exact, many ties)."""
    import torch

    from pipeline.models.checkpoint import LoadedModel, load_model

    out = {fam: load_model(checkpoints[fam], "cpu") for fam in ("bert", "roberta")}
    tok = out["bert"].tokenizer
    out["table"] = LoadedModel(model=TableModel(len(tok), seed=0), tokenizer=tok, device=torch.device("cpu"),
                               dtype=torch.float32, input_names=("input_ids", "attention_mask"),
                               max_positions=512, model_id="table", revision=None)
    return Models(out)


@pytest.fixture(scope="session")
def bert_dir(checkpoints) -> str:
    return checkpoints["bert"]


@pytest.fixture(scope="session")
def bert_tokenizer(bert_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bert_dir)


# small chunks and two-row windows: a few rows of the sample still make several windows and parts
FAST = ("--max-seq-len", "48", "--doc-stride", "16", "--rows-per-window", "2", "--quiet")


@pytest.fixture(scope="module")
def nights(tmp_path_factory, checkpoints) -> dict:
    """Two nights' inputs of different sizes (4 and 6 rows), so that a table partition's rows say
    which night wrote them; for the table-format tests (Delta, Iceberg, lineage)."""
    base = tmp_path_factory.mktemp("nights")
    sample = pq.read_table(SAMPLE).select(["id", "passage", "question"])
    inputs = {}
    for name, start, n in (("monday", 0, 4), ("tuesday", 10, 6)):
        inputs[name] = str(base / f"{name}.parquet")
        pq.write_table(sample.slice(start, n), inputs[name])
    return {"inputs": inputs, "model": checkpoints["bert"]}


def write_parquet(path, columns: dict, schema: pa.Schema | None = None) -> str:
    pq.write_table(pa.table(columns, schema=schema), str(path))
    return str(path)


def run_cli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """qa-batch as a user runs it: a separate process."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *map(str, args)],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT,
    )


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A local S3 server with one bucket; yields the environment that points clients at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "the S3 server did not start"
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    fs = pafs.S3FileSystem(access_key="test", secret_key="test", region="us-east-1",
                           endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
    fs.create_dir("nightly")
    yield {"env": env, "fs": fs}
    server.terminate()
    server.wait(timeout=10)
    log.close()


# ---- comparing the outputs of two runs ----

# Scores of two runs may differ in their last bits: the CPU kernels' reductions are not
# bitwise reproducible across threads and processes (seen once in CI as a confidence one
# float32 ulp apart). Everything else -- which rows, in which order, which answer at which
# offsets -- must be identical; scores within the differential tests' 1e-4.
FLOAT_RTOL, FLOAT_ATOL = 1e-4, 1e-6


def same_values(a, b) -> bool:
    """Equal, floats (also inside lists and dicts) to FLOAT_RTOL: what two runs must share."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or abs(a - b) <= FLOAT_ATOL + FLOAT_RTOL * abs(b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_answers(got: pa.Table, want: pa.Table) -> None:
    """The same rows, columns and answers; scores equal to 1e-4 (relative).
    On failure, says which column and rows differ (enough to tell a real defect from noise)."""
    assert got.schema.remove_metadata() == want.schema.remove_metadata(), f"{got.schema}\n!=\n{want.schema}"
    assert got.num_rows == want.num_rows, f"{got.num_rows} rows, expected {want.num_rows}"
    problems = []
    for name in want.column_names:
        a, b = got[name].to_pylist(), want[name].to_pylist()
        bad = [i for i, (x, y) in enumerate(zip(a, b)) if not same_values(x, y)]
        if bad:
            problems.append(f"column {name!r}: {len(bad)} rows differ, first {bad[:5]}: "
                            + "; ".join(f"got {a[i]!r}, expected {b[i]!r}" for i in bad[:2]))
    assert not problems, "\n".join(problems)
