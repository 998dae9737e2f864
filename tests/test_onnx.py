"""--backend onnxruntime and --backend openvino: the same answers as PyTorch float32, the export
cached and reused (one export for both runtimes, one export when runs start together), a corrupt,
stale or unused cache rebuilt or pruned, --backend auto's choice, and the failures that end a run
with exit code 2.

One tiny BERT is exported once for the whole module (into a cache folder of its own) and every
test reuses it; only the rebuild and concurrency tests export again, on purpose.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import os
import shutil
import time

import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings

pytest.importorskip("onnxruntime", reason="the onnxruntime extra: pip install -e '.[onnxruntime]'")

from pipeline.models import onnx_backend# noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.engines.local import run  # noqa: E402
from pipeline.errors import UsageError  # noqa: E402
from pipeline.models.checkpoint import load_model  # noqa: E402
from conftest import SAMPLE, run_cli  # noqa: E402
from test_differential import answer, options, rows_of  # noqa: E402
from tiny_models import Models  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """QA_BATCH_CACHE for this module: in-process runs read it from the environment."""
    cache = str(tmp_path_factory.mktemp("qa-batch-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QA_BATCH_CACHE", cache)
        yield cache


def ort_config(**kw) -> RunConfig:
    return RunConfig(inputs=(), backend="onnxruntime", **kw)


@pytest.fixture(scope="module")
def models(onnx_cache, bert_dir):
    """The tiny BERT three times: PyTorch float32, its ONNX Runtime session (the module's one export),
    and OpenVINO's compiled model of the same export (when openvino is installed)."""
    ort = onnx_backend.prepared(load_model(bert_dir, "cpu"), ort_config())
    assert isinstance(ort.model, onnx_backend.OrtQAModel)
    found = Models(torch=load_model(bert_dir, "cpu"), ort=ort)
    if importlib.util.find_spec("openvino") is not None:
        found["ov"] = onnx_backend.prepared(load_model(bert_dir, "cpu"), RunConfig(inputs=(), backend="openvino"))
        assert isinstance(found["ov"].model, onnx_backend.OvQAModel) and found["ov"].model.path == ort.model.path
    return found


def need_openvino(models) -> None:
    if "ov" not in models:
        pytest.skip("the openvino extra: pip install -e '.[openvino]'")


def entries(cache: str) -> dict[str, dict]:
    root = os.path.join(cache, "onnx")
    out = {}
    for name in sorted(n for n in os.listdir(root) if not n.startswith(".")):  # .locks: one lock file per entry
        with open(os.path.join(root, name, "meta.json")) as f:
            out[name] = json.load(f)
    return out


def spans_agree(a: dict, b: dict) -> None:
    """Two answers of one row from the two backends: equal, up to float32 rounding on near-ties."""
    assert a["error"] == b["error"] and a["chunks"] == b["chunks"]
    if a["error"] is not None:
        return
    assert b["score"] == pytest.approx(a["score"], abs=TOL)
    assert b["null_score"] == pytest.approx(a["null_score"], abs=TOL)
    assert b["confidence"] == pytest.approx(a["confidence"], abs=TOL)
    near_tie = a["runner_up_score"] is not None and a["score"] - a["runner_up_score"] <= 10 * TOL
    if not near_tie:  # random weights give near-ties; elsewhere the very same span
        assert (b["answer"], b["answer_start"], b["answer_end"]) == (a["answer"], a["answer_start"], a["answer_end"])


def answers_agree(models, backend: str, data, o: dict) -> None:
    """Generated rows answered by PyTorch float32 and by `backend`: the same rows, spans agreeing."""
    passages, questions = data
    want = answer(models["torch"], passages, questions, o)
    got = answer(models[backend], passages, questions, o)
    assert len(got) == len(want)
    for x, y in zip(want, got):
        spans_agree(x, y)


def test_the_cli_answers_as_pytorch_float32_and_reuses_the_export(tmp_path, models, bert_dir, onnx_cache):
    before = entries(onnx_cache)
    stamps = {n: os.stat(os.path.join(onnx_cache, "onnx", n, "model.onnx")).st_mtime_ns for n in before}
    # PyTorch in-process (the same engine), ONNX Runtime as a user runs it
    run(RunConfig(inputs=(SAMPLE,), output=str(tmp_path / "torch.parquet"), model=bert_dir, limit=12, top_k=2,
                  quiet=True), loaded=models["torch"])
    r = run_cli("run", SAMPLE, "--model", bert_dir, "--limit", "12", "--top-k", "2", "-o", tmp_path / "ort.parquet",
                "--backend", "onnxruntime", env={"QA_BATCH_CACHE": onnx_cache})
    assert r.returncode == 0, r.stderr
    assert "exporting" not in r.stderr and "rebuilding" not in r.stderr, r.stderr  # the module's export, reused
    assert entries(onnx_cache) == before
    assert {n: os.stat(os.path.join(onnx_cache, "onnx", n, "model.onnx")).st_mtime_ns for n in before} == stamps
    a, b = (pq.read_table(tmp_path / f).to_pylist() for f in ("torch.parquet", "ort.parquet"))
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        spans_agree(x, y)
    meta = json.loads(pq.read_metadata(tmp_path / "ort.parquet").metadata[b"qa_batch"])
    assert meta["options"]["backend"] == "onnxruntime" and meta["device"] == "cpu" and meta["dtype"] == "float32"


@settings(deadline=None)
@given(data=rows_of, o=options())
def test_onnxruntime_answers_as_pytorch_on_generated_inputs(models, data, o):
    """Generated passages, questions and options (batch sizes, windows, 1 or 2 CPU workers sharing
    the session): the same rows as PyTorch float32, within float32 rounding."""
    answers_agree(models, "ort", data, o)


def test_int8_quantizes_every_weight_matmul_but_the_head(tmp_path, models, bert_dir, onnx_cache):
    import onnx

    loaded = onnx_backend.prepared(load_model(bert_dir, "cpu"), ort_config(quantize="int8"))
    graph = onnx.load(loaded.model.path).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == 2 * 6  # 2 layers x (q, k, v, attention output, 2 feed-forward)
    assert "MatMul" in ops  # the QA head (and attention's activation products) stay float32
    answer_rows = answer(loaded, ["alpha beta gamma delta omega " * 3] * 3,
                         ["what is alpha?", "where is omega?", "who?"], {})
    assert all(r["error"] is None and r["answer"] for r in answer_rows)
    quantized = [m for m in entries(onnx_cache).values() if m["material"]["quantize"] != "none"]
    assert len(quantized) == 1


def test_a_corrupt_or_stale_cache_is_rebuilt(tmp_path, models, bert_dir, onnx_cache, monkeypatch, caplog):
    """A copy of the module's cache: the float32 model truncated, the int8 entry's meta.json made
    for other settings. Loading the int8 model rebuilds both, and it computes what it did."""
    models["ort"]  # the float32 entry exists
    original = onnx_backend.prepared(load_model(bert_dir, "cpu"), ort_config(quantize="int8"))  # and the int8 one
    cache = str(tmp_path / "cache")
    shutil.copytree(onnx_cache, cache)
    before = entries(cache)
    f32 = next(n for n, m in before.items() if m["material"]["quantize"] == "none")
    int8 = next(n for n, m in before.items() if m["material"]["quantize"] != "none")
    with open(os.path.join(cache, "onnx", f32, "model.onnx"), "r+b") as f:
        f.truncate(1000)
    meta_path = os.path.join(cache, "onnx", int8, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["material"]["format"] = 0
    with open(meta_path, "w") as f:
        json.dump(meta, f)

    monkeypatch.setenv("QA_BATCH_CACHE", cache)
    with caplog.at_level(logging.WARNING, logger="qa_batch"):
        rebuilt = onnx_backend.prepared(load_model(bert_dir, "cpu"), ort_config(quantize="int8"))
    assert f"{int8} is stale" in caplog.text and f"{f32} is corrupt" in caplog.text, caplog.text
    assert rebuilt.model.path.startswith(cache)
    after = entries(cache)
    assert set(after) == set(before)  # the same keys, whole again
    for name in after:
        assert onnx_backend.entry_problem(os.path.join(cache, "onnx", name), after[name]["material"]) is None
    assert not [n for n in os.listdir(os.path.join(cache, "onnx")) if n.startswith(".") and n != ".locks"]
    batch = {"input_ids": torch.randint(5, 300, (3, 20)), "attention_mask": torch.ones(3, 20, dtype=torch.long),
             "token_type_ids": torch.zeros(3, 20, dtype=torch.long)}
    batch["attention_mask"][1:, 12:] = 0
    want, got = original.model(**batch), rebuilt.model(**batch)
    torch.testing.assert_close(got.start_logits, want.start_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.end_logits, want.end_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw,expected", [
    (dict(backend="tensorrt"), "--backend 'tensorrt': choose torch, onnxruntime, openvino or auto"),
    (dict(backend="openvino", device="cuda"), "--backend openvino runs on the CPU: use --device cpu"),
    (dict(backend="openvino", dtype="float16"), "--backend openvino runs float32 or bfloat16, not --dtype float16"),
    (dict(backend="openvino", quantize="int8"), "--quantize int8 runs ONNX Runtime's int8: use --backend onnxruntime"),
    (dict(backend="onnxruntime", device="cuda"), "--backend onnxruntime runs on the CPU: use --device cpu"),
    (dict(backend="onnxruntime", devices=("cpu", "cuda:1")), "not cuda:1"),
    (dict(backend="onnxruntime", dtype="bfloat16"), "runs float32 (or --quantize int8), not --dtype bfloat16"),
    (dict(backend="onnxruntime", engine="ray", num_gpus=2), "use --num-gpus 0 with --engine ray"),
])
def test_options_that_cannot_run_on_onnxruntime_are_refused(kw, expected):
    with pytest.raises(UsageError, match=None) as e:
        onnx_backend.check_options(RunConfig(inputs=(), **kw))
    assert expected in str(e.value)


def test_device_auto_means_the_cpu():
    assert onnx_backend.device_spec(ort_config(), "auto") == "cpu"
    assert onnx_backend.device_spec(RunConfig(inputs=()), "auto") == "auto"


def test_without_onnxruntime_the_run_exits_2_naming_the_extra(tmp_path, bert_dir):
    """onnxruntime made unimportable for one subprocess: exit 2 before the model is loaded."""
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('onnxruntime is not installed here')\n")
    env = {"PYTHONPATH": f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = run_cli("run", SAMPLE, "--model", bert_dir, "-o", tmp_path / "out.parquet", "--backend", "onnxruntime",
                env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "qa-batch: error: --backend onnxruntime (and openvino, and --quantize int8) needs the onnxruntime "
        "package, which is not installed: "
        "pip install onnxruntime onnx onnxscript (in a qa-batch checkout: pip install -e '.[onnxruntime]')")
    assert not (tmp_path / "out.parquet").exists()


def test_an_unwritable_cache_is_a_usage_error_naming_it(tmp_path, models, bert_dir, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("QA_BATCH_CACHE", str(blocker))
    with pytest.raises(UsageError) as e:
        onnx_backend.prepared(load_model(bert_dir, "cpu"), ort_config())
    assert e.value.exit_code == 2
    assert f"cannot write the ONNX cache {blocker}/onnx" in str(e.value) and "QA_BATCH_CACHE" in str(e.value)


def longformer_checkpoint(directory) -> str:
    """A tiny Longformer: it runs in PyTorch, but its forward computes the global attention from
    the input ids' values (which positions hold the separator), which torch.export cannot trace."""
    from transformers import AutoModelForQuestionAnswering, LongformerConfig
    from tiny_models import roberta_tokenizer_object, save_tokenizer

    fast = save_tokenizer(roberta_tokenizer_object(), str(directory), "roberta")
    config = LongformerConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, attention_window=8, max_position_embeddings=514,
                              pad_token_id=fast.pad_token_id, bos_token_id=fast.cls_token_id,
                              eos_token_id=fast.sep_token_id, sep_token_id=fast.sep_token_id)
    torch.manual_seed(0)
    AutoModelForQuestionAnswering.from_config(config).save_pretrained(str(directory))
    return str(directory)


def test_a_model_that_cannot_be_exported_is_a_usage_error_saying_why(tmp_path, onnx_cache):
    loaded = load_model(longformer_checkpoint(tmp_path / "longformer"), "cpu")
    with pytest.raises(UsageError) as e:
        onnx_backend.prepared(loaded, ort_config())
    assert e.value.exit_code == 2
    message = str(e.value)
    assert message.startswith(f"--backend onnxruntime: {tmp_path / 'longformer'} cannot be exported to ONNX: "
                               "torch.onnx.export failed (GuardOnDataDependentSymNode: Could not guard on "
                               "data-dependent expression"), message
    assert message.endswith("Run it with --backend torch")
    assert not [n for n in os.listdir(os.path.join(onnx_cache, "onnx")) if n.startswith(".") and n != ".locks"]  # nothing left


def test_an_entry_that_passes_its_checksum_but_does_not_load_is_replaced(tmp_path, models, bert_dir, onnx_cache,
                                                                         monkeypatch, caplog):
    """Issue 20: its new export was thrown away (the old entry 'passed' and was kept), then the run
    failed with 'does not load'. Now the export replaces it."""
    models["ort"]  # the float32 entry exists
    cache = str(tmp_path / "cache")
    shutil.copytree(onnx_cache, cache)
    name = next(n for n, m in entries(cache).items() if m["material"]["quantize"] == "none")
    folder = os.path.join(cache, "onnx", name)
    with open(os.path.join(folder, "model.onnx"), "wb") as f:
        f.write(b"not an ONNX model")  # and its checksum made to match
    meta = entries(cache)[name]
    meta["file"] = {"bytes": 17, "sha256": onnx_backend._file_digest(os.path.join(folder, "model.onnx"))}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    assert onnx_backend.entry_problem(folder, meta["material"]) is None  # it passes every check but loading

    monkeypatch.setenv("QA_BATCH_CACHE", cache)
    with caplog.at_level(logging.WARNING, logger="qa_batch"):
        rebuilt = onnx_backend.prepared(load_model(bert_dir, "cpu"), ort_config())
    assert "corrupt: it does not load" in caplog.text
    assert os.path.getsize(os.path.join(folder, "model.onnx")) > 1000 and rebuilt.model.path.startswith(cache)


def test_what_a_killed_export_left_in_the_cache_is_pruned(tmp_path):
    """Issue 22: a second Ctrl-C during an export left .tmp-* folders in the cache forever."""
    root = tmp_path / "onnx"
    (root / ".tmp-old").mkdir(parents=True)
    (root / ".tmp-old" / "model.onnx").write_bytes(b"half an export")
    (root / ".tmp-fresh").mkdir()  # another run's export in progress
    (root / "abc123").mkdir()  # an entry
    old = time.time() - 2 * onnx_backend.LEFTOVER_AGE_S
    os.utime(root / ".tmp-old", (old, old))
    assert onnx_backend.prune_leftovers(str(root)) == [str(root / ".tmp-old")]
    assert sorted(os.listdir(root)) == [".tmp-fresh", "abc123"]


def test_the_logit_check_ignores_padding_and_is_relative_to_the_scale():
    """Both checks against PyTorch (the export's and OpenVINO's) measure this: the worst difference
    over real tokens, divided by the largest logit (at least 1). Hand-checked values."""
    want = (torch.tensor([[10.0, -20.0, 99.0]]), torch.tensor([[0.5, 0.25, 0.0]]))
    valid = torch.tensor([[True, True, False]])  # the third token is padding: its 99 counts for nothing
    got = (torch.tensor([[10.0, -19.0, 0.0]]).numpy(), torch.tensor([[0.5, 0.75, 7.0]]))  # numpy or torch
    # start: 1 off on a scale of 20 -> 0.05; end: 0.5 off on a scale below 1, so 1 -> 0.5
    assert onnx_backend._relative_difference(want, got, valid) == pytest.approx(0.5)
    assert onnx_backend._relative_difference(want[:1], got[:1], valid) == pytest.approx(0.05)
    assert onnx_backend._relative_difference(want, want, valid) == 0.0


def test_an_export_whose_logits_differ_from_pytorch_is_refused_and_not_cached(tmp_path, bert_dir, monkeypatch):
    """README (ONNX Runtime): every export is checked against PyTorch on shapes it never saw; a graph
    whose logits differ is refused (exit 2, saying by how much) and nothing is left in the cache."""
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("QA_BATCH_CACHE", cache)
    real = onnx_backend.new_session

    class Shifted:  # the graph onnxruntime would run, its start logits off by 0.5
        def __init__(self, session):
            self.session = session

        def run(self, names, feed):
            out = self.session.run(names, feed)
            return [out[0] + 0.5, *out[1:]]

    monkeypatch.setattr(onnx_backend, "new_session", lambda ort, path: Shifted(real(ort, path)))
    with pytest.raises(UsageError, match=r"the exported graph's logits differ from PyTorch's by [0-9.e-]+ "
                                         r"\(relative; at most .* allowed\)") as e:
        onnx_backend.prepared(load_model(bert_dir, "cpu"), ort_config())
    assert e.value.exit_code == 2
    entries = os.listdir(os.path.join(cache, "onnx")) if os.path.isdir(os.path.join(cache, "onnx")) else []
    assert not [n for n in entries if not n.startswith(".")], entries  # no entry a later run would trust


# ---------------------------------------------------------------------------- OpenVINO and --backend auto

@settings(deadline=None, max_examples=25)
@given(data=rows_of, o=options())
def test_openvino_answers_as_pytorch_on_generated_inputs(models, data, o):
    """Generated inputs and options (1 or 2 CPU workers, each with its own infer request on the one
    compiled model): OpenVINO float32 gives PyTorch float32's rows, within float32 rounding."""
    need_openvino(models)
    answers_agree(models, "ov", data, o)


def test_backend_auto_says_what_it_chose(tmp_path, models, bert_dir, onnx_cache):
    """--backend auto on a CPU: PyTorch in float32 (no exported backend won on both long documents and
    paragraphs), OpenVINO over the module's export with --dtype bfloat16; the choice in the summary
    line and the metadata."""
    need_openvino(models)
    before = entries(onnx_cache)
    r = run_cli("run", SAMPLE, "--model", bert_dir, "--limit", "4", "-o", tmp_path / "f32.parquet",
                "--backend", "auto", env={"QA_BATCH_CACHE": onnx_cache})
    assert r.returncode == 0, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert " on cpu: " in last and " with " not in last, r.stderr
    meta = json.loads(pq.read_metadata(tmp_path / "f32.parquet").metadata[b"qa_batch"])
    assert meta["backend"] == meta["options"]["backend"] == "torch" and meta["dtype"] == "float32"

    r = run_cli("run", SAMPLE, "--model", bert_dir, "--limit", "4", "-o", tmp_path / "bf16.parquet",
                "--backend", "auto", "--dtype", "bfloat16", "--cpu-workers", "1", env={"QA_BATCH_CACHE": onnx_cache},
                timeout=120)  # 1-2 workers on one compiled model: test_openvino_answers_as_pytorch_on_generated_inputs
    assert r.returncode == 0, r.stderr
    assert "exporting" not in r.stderr and entries(onnx_cache) == before, r.stderr  # the module's export
    assert " on cpu with openvino bfloat16: " in r.stderr.strip().splitlines()[-1], r.stderr
    rows = pq.read_table(tmp_path / "bf16.parquet").to_pylist()
    assert len(rows) == 4 and all(row["error"] is None for row in rows)
    meta = json.loads(pq.read_metadata(tmp_path / "bf16.parquet").metadata[b"qa_batch"])
    assert meta["dtype"] == "bfloat16" and meta["backend"] == meta["options"]["backend"] == "openvino"
    assert meta["versions"]["openvino"] and meta["versions"]["onnxruntime"]


@pytest.mark.parametrize("kw,cuda,openvino,expected", [
    (dict(backend="auto"), False, True, "torch"),  # float32: no exported backend won on both shapes of input
    (dict(backend="auto", dtype="bfloat16"), False, True, "openvino"),
    (dict(backend="auto", dtype="bfloat16"), False, False, "torch"),  # openvino not installed
    (dict(backend="auto", dtype="bfloat16"), True, True, "torch"),  # --device auto finds CUDA
    (dict(backend="auto", dtype="bfloat16", device="cpu", devices=("cpu", "cpu")), True, True, "openvino"),
    (dict(backend="auto", dtype="bfloat16", engine="ray"), False, True, "torch"),  # Ray's actors may hold GPUs
    (dict(backend="auto", dtype="bfloat16", engine="ray", num_gpus=0), False, True, "openvino"),
    (dict(backend="auto", quantize="int8"), False, True, "onnxruntime"),
    (dict(quantize="int8"), False, True, "onnxruntime"),  # PyTorch's int8 was replaced by ONNX Runtime's
    (dict(backend="torch"), False, True, "torch"),
    (dict(backend="onnxruntime"), False, True, "onnxruntime"),
])
def test_backend_auto_decides_by_device_and_what_is_installed(kw, cuda, openvino, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" and not openvino
                        else real(name, *a))
    assert onnx_backend.resolved(RunConfig(inputs=(), **kw)).backend == expected


def test_openvino_whose_logits_differ_from_pytorch_is_refused(tmp_path, models, bert_dir, onnx_cache, monkeypatch):
    """The compiled model is checked against PyTorch as the export is: a plugin computing other
    logits is refused (exit 2, by how much)."""
    need_openvino(models)
    real = onnx_backend.OvQAModel.__call__

    def shifted(self, **inputs):
        out = real(self, **inputs)
        return onnx_backend.QAOutput(out.start_logits + 0.5, out.end_logits)

    monkeypatch.setattr(onnx_backend.OvQAModel, "__call__", shifted)
    with pytest.raises(UsageError, match=r"--backend openvino: OpenVINO's logits differ from PyTorch's by "
                                         r"[0-9.e-]+ \(relative; at most .* allowed\)\. Run it with --backend torch"):
        onnx_backend.prepared(load_model(bert_dir, "cpu"), RunConfig(inputs=(), backend="openvino"))


RACER = """
import os, sys, time
sys.path.insert(0, sys.argv[3])
from pipeline.config import RunConfig
from pipeline.models import onnx_backend
from pipeline.models.checkpoint import load_model
loaded = load_model(sys.argv[1], "cpu")
while not os.path.exists(sys.argv[2]):  # all start exporting together
    time.sleep(0.01)
onnx_backend.prepared(loaded, RunConfig(inputs=(), backend="onnxruntime"))
print(loaded.model.path)
"""


def test_runs_started_together_on_an_empty_cache_export_once(tmp_path, bert_dir):
    """Issue 21: three processes open the same entry of an empty cache at the same moment: one
    exports, the others wait for it and use its entry; nothing is left half-written."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "QA_BATCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, bert_dir, str(go), root], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    go.write_text("")
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    assert sum(e.count("exporting") for _, e in outs) == 1, [e for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1  # one entry, used by all
    names = os.listdir(cache / "onnx")
    assert [n for n in names if not n.startswith(".")] == [os.path.basename(os.path.dirname(outs[0][0].strip()))]
    assert not [n for n in names if n.startswith((".tmp-", ".trash-"))]


def test_entries_no_run_opened_for_30_days_are_pruned(tmp_path, monkeypatch):
    root = tmp_path / "onnx"
    for name in ("old", "fresh", "broken"):
        (root / name).mkdir(parents=True)
    (root / "old" / "meta.json").write_text("{}")
    (root / "fresh" / "meta.json").write_text("{}")
    month = time.time() - 31 * 86400
    os.utime(root / "old" / "meta.json", (month, month))
    (root / ".locks").mkdir()
    monkeypatch.setenv("QA_BATCH_CACHE_DAYS", "0")  # 0: never prune
    assert onnx_backend.prune_unused(str(root)) == []
    monkeypatch.delenv("QA_BATCH_CACHE_DAYS")
    assert onnx_backend.prune_unused(str(root)) == [str(root / "old")]
    assert sorted(os.listdir(root)) == [".locks", "broken", "fresh"]  # a folder without meta.json is its run's


def test_the_cache_lives_where_readme_says(monkeypatch, tmp_path):
    """README: $QA_BATCH_CACHE/onnx, else $XDG_CACHE_HOME/qa-batch/onnx, else ~/.cache/qa-batch/onnx."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QA_BATCH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert onnx_backend.cache_root() == str(tmp_path / "home" / ".cache" / "qa-batch" / "onnx")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert onnx_backend.cache_root() == str(tmp_path / "xdg" / "qa-batch" / "onnx")
    monkeypatch.setenv("QA_BATCH_CACHE", str(tmp_path / "mine"))
    assert onnx_backend.cache_root() == str(tmp_path / "mine" / "onnx")
