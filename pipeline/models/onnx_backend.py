"""--backend onnxruntime and --backend openvino: the checkpoint exported once to ONNX and run on
the CPU by ONNX Runtime or by OpenVINO; --backend auto picks one of them or PyTorch.

Only the forward changes. `OrtQAModel` and `OvQAModel` are called as the PyTorch model is
(`model(**inputs)` with the batch's int64 tensors; `.start_logits` and `.end_logits` on what it
returns), so the stages, batches and exact span search are those of the PyTorch path. CPU worker
threads are as today: each batch runs in its worker's thread, and all workers share one session
(ONNX Runtime: one intra-op thread per call) or one compiled model (OpenVINO: one stream of one
thread per worker, an infer request per worker thread).

Both runtimes read the same cached float32 export (OpenVINO reads ONNX Runtime's optimised graph,
contrib ops included; its CPU plugin fuses the attention itself, which ONNX Runtime's fusions do
not match in transformers 5's graph). OpenVINO runs it in float32 (INFERENCE_PRECISION_HINT f32:
the same answers as PyTorch float32) or, with --dtype bfloat16, in bfloat16 (AMX on the CPUs
that have it). `--quantize int8` is ONNX Runtime's dynamic int8 whatever the backend: PyTorch's
dynamic int8 lost 1.14 F1 on the trained model, ONNX Runtime's kept it (BENCHMARKS.md).

The export, made once per checkpoint and settings and reused by later runs:

1. The float32 model with eager attention goes through `torch.onnx.export(dynamo=True)` with
   dynamic batch and sequence axes. (The TorchScript exporter traces transformers 5's attention
   mask into a constant: its graphs give wrong logits wherever a batch is padded.)
2. ONNX Runtime optimises the graph offline at ORT_ENABLE_EXTENDED (LayerNorm fused with the
   residual add, bias + GELU, the attention scale folded into its MatMul) and saves it. That
   level is hardware-independent, so a cache may be shared between machines; sessions then
   apply the remaining, hardware-specific optimisations when they load it.
3. The saved graph is checked against PyTorch on padded probe batches of shapes other than the
   export's: logits must agree within 1e-3 (relative to their scale), or the export is refused.
4. `--quantize int8`: dynamic int8 quantization of that graph with per-channel weights
   (`onnxruntime.quantization.quantize_dynamic(per_channel=True)`): every MatMul with constant
   weights, except the QA head, which stays float32 as on the PyTorch int8 path.

The cache lives in `$QA_BATCH_CACHE/onnx`, else `$XDG_CACHE_HOME/qa-batch/onnx`, else
`~/.cache/qa-batch/onnx`: one folder per key, a sha256 over the checkpoint's weights (the local
checkpoint's content hash, or its hub commit), the export settings and the versions of torch,
transformers and onnxruntime. A folder holds `model.onnx` and `meta.json` (the key's material
and the model file's size and sha256). A folder whose meta.json is missing, unreadable or made
for other settings (stale), or whose model file does not match it or does not load (corrupt), is
rebuilt. Folders are written under a temporary name and renamed into place, so runs sharing a
cache (worker processes, concurrent jobs) never read a half-written one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass

import torch

from ..errors import UsageError

FORMAT = 1  # bump when the export steps change: entries made by older steps are rebuilt
OPSET = 18
EXTRA = "pip install onnxruntime onnx onnxscript (in a qa-batch checkout: pip install -e '.[onnxruntime]')"
OV_EXTRA = ("pip install openvino onnxruntime onnx onnxscript (in a qa-batch checkout: "
            "pip install -e '.[openvino]')")
BACKENDS = ("torch", "onnxruntime", "openvino", "auto")
EXPORTED = ("onnxruntime", "openvino")  # the backends that run the cached ONNX export
MODEL_FILE, META_FILE = "model.onnx", "meta.json"
OUTPUTS = ("start_logits", "end_logits")
TOLERANCE = 1e-3  # exported logits against PyTorch's, relative to their largest magnitude

log = logging.getLogger("qa_batch")


class ExportError(Exception):
    """The checkpoint cannot be exported to ONNX, or its export does not compute what PyTorch does."""


# ---------------------------------------------------------------------------- options

def resolved(config):
    """`config` with its backend decided. `auto` becomes the backend measured fastest for these options
    on this device (BENCHMARKS.md, "CPU paths", whole runs on long documents and paragraphs): on a CPU,
    OpenVINO for --dtype bfloat16 where it is installed, ONNX Runtime for --quantize int8, else
    PyTorch (in float32 no exported backend was faster on both: OpenVINO 1.15x on long documents,
    0.85-0.95x on paragraphs); PyTorch on CUDA. `--quantize int8` runs ONNX Runtime's int8 (the one
    int8 path qa-batch offers). The decided name is what manifests, metadata and the summary show."""
    import dataclasses

    backend = config.backend
    if backend == "auto":
        backend = _fastest(config)
    if config.quantize == "int8" and backend in ("torch", "auto"):
        backend = "onnxruntime"
    return config if backend == config.backend else dataclasses.replace(config, backend=backend)


def _fastest(config) -> str:
    on_cpu = all(d == "cpu" or (d == "auto" and not torch.cuda.is_available())
                 for d in (config.devices or (config.device,)))
    if config.engine == "ray":
        on_cpu = config.device == "cpu" or config.num_gpus == 0
    if not on_cpu:
        return "torch"
    if config.quantize == "int8":
        return "onnxruntime"
    import importlib.util
    if config.dtype == "bfloat16" and all(importlib.util.find_spec(m) is not None
                                          for m in ("openvino", "onnxruntime", "onnxscript")):
        return "openvino"
    return "torch"


def check_options(config) -> None:
    """Before anything is loaded: the backend exists, fits the other options and is installed."""
    backend = getattr(config, "backend", "torch")
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: choose torch, onnxruntime, openvino or auto")
    if config.quantize == "int8" and backend == "openvino":
        raise UsageError("--quantize int8 runs ONNX Runtime's int8: use --backend onnxruntime (or auto) with it")
    if backend not in EXPORTED:
        return
    devices = (config.device, *config.devices)
    if any(d not in ("auto", "cpu") for d in devices):
        raise UsageError(f"--backend {backend} runs on the CPU: use --device cpu (or auto), not "
                         f"{','.join(d for d in devices if d not in ('auto', 'cpu'))}")
    dtypes = ("auto", "float32", "bfloat16") if backend == "openvino" else ("auto", "float32")
    if config.dtype not in dtypes:
        raise UsageError(f"--backend {backend} runs " + ("float32 or bfloat16" if backend == "openvino"
                         else "float32 (or --quantize int8)") + f", not --dtype {config.dtype}")
    if config.engine == "ray" and config.num_gpus:
        raise UsageError(f"--backend {backend} runs on the CPU: use --num-gpus 0 with --engine ray")
    _import_onnxruntime()
    if backend == "openvino":
        _import_openvino()


def device_spec(config, spec: str) -> str:
    """--device auto means the CPU with an exported backend (the CPU is its only device)."""
    return "cpu" if getattr(config, "backend", "torch") in EXPORTED and spec == "auto" else spec


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise UsageError(f"--backend openvino needs the openvino package, which is not installed: {OV_EXTRA}") from None
    return openvino


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(f"--backend onnxruntime (and openvino, and --quantize int8) needs the onnxruntime "
                         f"package, which is not installed: {EXTRA}") from None
    return onnxruntime


# ---------------------------------------------------------------------------- the forward

@dataclass
class QAOutput:
    start_logits: torch.Tensor  # (batch, seq) float32
    end_logits: torch.Tensor


def _feed(input_names: tuple[str, ...], inputs: dict) -> dict:
    """A batch's tensors as the arrays an exported graph takes, one per input it was exported with."""
    ids = inputs["input_ids"]
    feed = {}
    for n in input_names:
        t = inputs.get(n)
        if t is None:  # batches without padding come without a mask (all ones); token types default to 0
            t = torch.ones_like(ids) if n == "attention_mask" else torch.zeros_like(ids)
        feed[n] = t.detach().cpu().contiguous().numpy()
    return feed


class OrtQAModel:
    """An ONNX Runtime session called like a transformers QA model: `model(**inputs)`."""

    def __init__(self, session, input_names: tuple[str, ...], path: str, quantize: str):
        self.session = session
        self.input_names = input_names
        self.path = path  # the cached model file the session runs
        self.quantize = quantize

    def __call__(self, **inputs: torch.Tensor) -> QAOutput:
        try:
            start, end = self.session.run(list(OUTPUTS), _feed(self.input_names, inputs))
        except Exception as e:  # onnxruntime's own exception types: a model failure (exit code 3)
            raise RuntimeError(f"onnxruntime: {e}") from None
        return QAOutput(torch.from_numpy(start), torch.from_numpy(end))

    def eval(self) -> "OrtQAModel":
        return self

    def __repr__(self) -> str:
        return f"OrtQAModel({self.path}, quantize={self.quantize})"


class OvQAModel:
    """An OpenVINO compiled model called like a transformers QA model. Each worker thread has its
    own infer request (a request runs one call at a time; the compiled model serves them all)."""

    def __init__(self, compiled, input_names: tuple[str, ...], path: str, precision: str):
        self.compiled = compiled
        self.input_names = input_names
        self.path = path
        self.precision = precision  # "f32" or "bf16"
        self.outputs = [compiled.output(name) for name in OUTPUTS]
        self._local = threading.local()
        self._creating = threading.Lock()

    def __call__(self, **inputs: torch.Tensor) -> QAOutput:
        request = getattr(self._local, "request", None)
        if request is None:
            with self._creating:  # one thread at a time: the workers' first batches arrive together
                request = self._local.request = self.compiled.create_infer_request()
        try:
            result = request.infer(_feed(self.input_names, inputs))
        except Exception as e:  # OpenVINO's own exception types: a model failure (exit code 3)
            raise RuntimeError(f"openvino: {e}") from None
        # the request reuses its output buffers on the next call: copy them out
        start, end = (torch.from_numpy(result[port].copy()) for port in self.outputs)
        return QAOutput(start, end)

    def eval(self) -> "OvQAModel":
        return self

    def __repr__(self) -> str:
        return f"OvQAModel({self.path}, precision={self.precision})"


OV_PAD_MULTIPLE = 16


def pad_multiple(model) -> int:
    """Batches for OpenVINO are padded to a multiple of 16 tokens: each new input shape costs its
    CPU plugin a shape inference and kernel selection, and length-sorted batches of paragraphs
    would otherwise bring a new width nearly every batch. Other models take any width."""
    return OV_PAD_MULTIPLE if isinstance(model, OvQAModel) else 1


def prepared(loaded, config):
    """With --backend onnxruntime or openvino: `loaded` with its model replaced, in place, by a
    session of the cached export (made first when missing, stale or corrupt); the PyTorch model is
    dropped. Otherwise, or when already done, `loaded` as it is."""
    backend = getattr(config, "backend", "torch")
    if backend not in EXPORTED or isinstance(loaded.model, (OrtQAModel, OvQAModel)):
        return loaded
    if loaded.device.type != "cpu":
        raise UsageError(f"--backend {backend} runs on the CPU, not {loaded.device}: use --device cpu"
                         + (" (--num-gpus 0 with --engine ray)" if config.engine == "ray" else ""))
    if backend == "onnxruntime":
        loaded.model = load_session(loaded, config.quantize)
        loaded.dtype = torch.float32
    else:
        bf16 = config.dtype == "bfloat16"
        loaded.model = load_openvino(loaded, bf16, config.cpu_workers or torch.get_num_threads())
        loaded.dtype = torch.bfloat16 if bf16 else torch.float32
    loaded.mask_4d = loaded.mask_always = False  # the session takes the 2D mask it was exported with
    return loaded


# ---------------------------------------------------------------------------- the cache

def cache_root() -> str:
    """Where exported models are kept (see the module's docstring)."""
    if os.environ.get("QA_BATCH_CACHE"):
        base = os.environ["QA_BATCH_CACHE"]
    else:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "qa-batch")
    return os.path.join(os.path.abspath(os.path.expanduser(base)), "onnx")


def weights_id(loaded) -> str:
    """What names the weights: the local checkpoint's content hash or the hub commit; without
    either, a hash of the parameters themselves."""
    if loaded.revision:
        return f"{loaded.model_id}@{loaded.revision}" if not str(loaded.revision).startswith("sha256:") \
            else loaded.revision
    h = hashlib.sha256()
    for name, t in sorted(loaded.model.state_dict().items()):
        if isinstance(t, torch.Tensor):
            t = t.int_repr() if t.is_quantized else t  # torch's --quantize int8 leaves int8 weights here
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "params:" + h.hexdigest()


def material(loaded, quantize: str) -> dict:
    """Everything an export depends on: its cache key is the sha256 of this."""
    import transformers

    ort = _import_onnxruntime()
    return {
        "format": FORMAT,
        "weights": weights_id(loaded),
        "inputs": list(loaded.input_names),
        "outputs": list(OUTPUTS),
        "exporter": "torch.onnx.export(dynamo=True), eager attention, float32",
        "opset": OPSET,
        "optimization": "ORT_ENABLE_EXTENDED",
        "quantize": ("dynamic int8, per-channel QInt8 weights, MatMul with constant weights, QA head float32"
                     if quantize == "int8" else "none"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": ort.__version__,
    }


def cache_key(m: dict) -> str:
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:32]


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def entry_problem(folder: str, m: dict) -> str | None:
    """Why a cache folder cannot be used as it is (None: it can)."""
    meta_path, model_path = os.path.join(folder, META_FILE), os.path.join(folder, MODEL_FILE)
    if not os.path.isdir(folder):
        return "missing"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return f"stale: no readable {META_FILE}"
    if meta.get("material") != m:
        return "stale: made for other settings or versions"
    want = meta.get("file") or {}
    try:
        size = os.path.getsize(model_path)
    except OSError:
        return f"corrupt: {MODEL_FILE} is missing"
    if size != want.get("bytes") or _file_digest(model_path) != want.get("sha256"):
        return f"corrupt: {MODEL_FILE} does not match its checksum"
    return None


def load_session(loaded, quantize: str) -> OrtQAModel:
    """The ONNX Runtime session of the cached export for this checkpoint and settings."""
    ort = _import_onnxruntime()
    return _open_entry(loaded, quantize, "onnxruntime", lambda path: OrtQAModel(
        new_session(ort, path), tuple(loaded.input_names), path, quantize))


def load_openvino(loaded, bf16: bool, workers: int) -> OvQAModel:
    """The cached float32 export compiled by OpenVINO for `workers` threads calling it at once.
    In float32 it is checked against the PyTorch model still loaded (as an export is checked
    against ONNX Runtime): the CPU plugin's fused kernels must compute the same logits."""
    ov = _import_openvino()
    precision = "bf16" if bf16 else "f32"
    reference = loaded.model

    def open_(path: str) -> OvQAModel:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(path), "CPU", {
            "INFERENCE_PRECISION_HINT": precision,
            "NUM_STREAMS": max(1, workers), "INFERENCE_NUM_THREADS": max(1, workers),  # a stream of one thread each
            "ENABLE_CPU_PINNING": False})  # workers share the machine with the tokenizer and the writer
        return OvQAModel(compiled, tuple(loaded.input_names), path, precision)

    model = _open_entry(loaded, "none", "openvino", open_)
    if not bf16:
        worst = _worst_difference(reference, model, loaded)
        if not worst <= TOLERANCE:
            raise UsageError(f"--backend openvino: OpenVINO's logits differ from PyTorch's by {worst:.2g} "
                             f"(relative; at most {TOLERANCE} allowed). Run it with --backend torch")
    return model


def _worst_difference(reference, model, loaded) -> float:
    """The largest difference of `model`'s logits from `reference`'s on a padded probe batch,
    relative to their scale."""
    names = tuple(loaded.input_names)
    vocab = int(getattr(getattr(reference, "config", None), "vocab_size", 0) or len(loaded.tokenizer))
    probe = _probe(names, vocab, 3, max(2, min(40, loaded.max_positions)), seed=7)
    with torch.no_grad():
        want = _Logits(reference)(**probe)
    got = model(**probe)
    return _relative_difference(want, (got.start_logits, got.end_logits), probe["attention_mask"].bool())


def _relative_difference(want, got, valid: torch.Tensor) -> float:
    """The largest difference of the `got` logits (start, end) from `want`'s over the tokens that
    are not padding, relative to their scale (at least 1)."""
    worst = 0.0
    for w, g in zip(want, got):
        w, g = w.float(), torch.as_tensor(g).float()
        scale = max(1.0, float(w[valid].abs().max()))
        worst = max(worst, float((w - g)[valid].abs().max()) / scale)
    return worst


def _open_entry(loaded, quantize: str, backend: str, open_):
    """`open_(model file)` of the cache entry for this checkpoint and settings, exported first if
    needed. One process exports an entry while the others wait for it (a lock per entry), so runs
    started together on an empty cache export once."""
    m = material(loaded, quantize)
    root = cache_root()
    prune_leftovers(root)
    prune_unused(root)
    key = cache_key(m)
    folder = os.path.join(root, key)
    with _entry_lock(root, key):
        problem = entry_problem(folder, m)
        for attempt in (1, 2):
            if problem is not None:
                if problem != "missing":
                    log.warning("the ONNX cache entry %s is %s: rebuilding it", folder, problem)
                else:
                    log.warning("exporting %s to ONNX for %s (once; kept in %s)", loaded.model_id, backend, folder)
                try:
                    build_entry(loaded, quantize, m, folder, replace_bad=problem != "missing")
                except UsageError:
                    raise
                except Exception as e:  # ExportError, or whatever else the model's code raised on the way
                    why = str(e) if isinstance(e, ExportError) else _why(e)
                    raise UsageError(f"--backend {backend}: {loaded.model_id} cannot be exported to ONNX: {why}. "
                                     "Run it with --backend torch") from None
            try:
                opened = open_(os.path.join(folder, MODEL_FILE))
            except Exception as e:  # a model file that matches its checksum yet does not load
                if attempt == 2:
                    raise UsageError(f"--backend {backend}: the exported model {folder} does not load: {e}") from None
                problem = f"corrupt: it does not load ({str(e).splitlines()[0][:200]})"
                continue
            with contextlib.suppress(OSError):  # used now: prune_unused keeps it
                os.utime(os.path.join(folder, META_FILE))
            return opened


@contextlib.contextmanager
def _entry_lock(root: str, key: str):
    """An exclusive lock on one cache entry (a file under `.locks/`), held while it is checked,
    built and opened. A cache this process cannot write to is used without one (read-only)."""
    try:
        os.makedirs(os.path.join(root, ".locks"), exist_ok=True)
        fd = os.open(os.path.join(root, ".locks", key), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


UNUSED_DAYS = 30  # QA_BATCH_CACHE_DAYS: entries no run has opened for this long are deleted


def prune_unused(root: str, now: float | None = None) -> list[str]:
    """Delete cache entries no run has opened for QA_BATCH_CACHE_DAYS days (default 30): every
    checkpoint retrained in place leaves its old export behind. Each is renamed aside first, so a
    run never sees half of one. Returns what was deleted."""
    try:
        days = float(os.environ.get("QA_BATCH_CACHE_DAYS", UNUSED_DAYS))
    except ValueError:
        days = UNUSED_DAYS
    if not os.path.isdir(root) or days <= 0:
        return []
    now = time.time() if now is None else now
    gone = []
    for name in os.listdir(root):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        try:
            used = os.stat(os.path.join(folder, META_FILE)).st_mtime
        except OSError:
            continue  # being written, or broken: its own run deals with it
        if now - used > days * 86400:
            trash = os.path.join(root, f".trash-{uuid.uuid4().hex}")
            try:
                os.rename(folder, trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
            gone.append(folder)
    return gone


LEFTOVER_AGE_S = 3600  # an export takes minutes: a .tmp- folder this old belongs to a run that was killed


def prune_leftovers(root: str, now: float | None = None) -> list[str]:
    """Delete what killed runs left in the cache (a second Ctrl-C during an export skips its
    clean-up): `.tmp-*` and `.trash-*` folders untouched for an hour. A fresh one may be another
    run's export in progress, so it stays. Returns what was deleted."""
    if not os.path.isdir(root):
        return []
    now = time.time() if now is None else now
    gone = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith((".tmp-", ".trash-")) and os.path.isdir(path):
            try:
                if now - os.stat(path).st_mtime > LEFTOVER_AGE_S:
                    shutil.rmtree(path, ignore_errors=True)
                    gone.append(path)
            except OSError:
                continue
    return gone


def new_session(ort, path: str):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # one thread per batch; --cpu-workers batches run in parallel
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def build_entry(loaded, quantize: str, m: dict, folder: str, replace_bad: bool = False) -> None:
    """Export (and quantize) into a temporary folder beside `folder`, then rename it into place;
    `replace_bad`: the entry there is known not to work, even if it passes its checksum."""
    root = os.path.dirname(folder)
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    except OSError as e:
        raise UsageError(f"cannot write the ONNX cache {root} ({e.strerror}): set "
                         "QA_BATCH_CACHE to a writable directory") from None
    try:
        model_path = os.path.join(tmp, MODEL_FILE)
        t0 = time.perf_counter()
        if quantize == "int8":
            # the float32 entry first (cached too), then its quantized copy
            f32 = material(loaded, "none")
            f32_folder = os.path.join(root, cache_key(f32))
            f32_problem = entry_problem(f32_folder, f32)
            if f32_problem is not None:
                if f32_problem != "missing":
                    log.warning("the ONNX cache entry %s is %s: rebuilding it", f32_folder, f32_problem)
                build_entry(loaded, "none", f32, f32_folder, replace_bad=f32_problem != "missing")
            quantize_int8(os.path.join(f32_folder, MODEL_FILE), model_path)
        else:
            export_float32(loaded, model_path, tmp)
        meta = {"material": m, "model_id": loaded.model_id, "seconds": round(time.perf_counter() - t0, 1),
                "file": {"bytes": os.path.getsize(model_path), "sha256": _file_digest(model_path)}}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        os.chmod(tmp, 0o755)  # mkdtemp's folder is private; a cache may be shared
        _move_into_place(tmp, folder, m, replace_bad)
    except OSError as e:
        raise UsageError(f"cannot write the ONNX cache {root} ({e}): set "
                         "QA_BATCH_CACHE to a writable directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: str, folder: str, m: dict, replace_bad: bool = False) -> None:
    if os.path.isdir(folder):
        if not replace_bad and entry_problem(folder, m) is None:
            return  # another run finished the same entry meanwhile
        trash = os.path.join(os.path.dirname(folder), f".trash-{uuid.uuid4().hex}")
        with contextlib.suppress(OSError):
            os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        if entry_problem(folder, m) is not None:  # not another run's whole entry: a real failure
            raise


# ---------------------------------------------------------------------------- export and quantize

class _Logits(torch.nn.Module):
    """The QA model with tensors in and (start, end) logits out, the shape an export needs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs)
        return out.start_logits, out.end_logits


def _probe(names, vocab: int, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Inputs of one shape, with padding: every row but the first ends early."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    types = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        mask[b, max(1, seq - b * seq // (batch + 1)):] = 0
    types[:, seq // 3:] = 1
    full = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {n: full[n] for n in names}


@contextlib.contextmanager
def _quiet_export():
    """torch.onnx prints progress on stdout and warns about optional packages: not our user's business."""
    # torch's loggers write to the stderr they found at import (a failed torch.export logs its whole
    # graph); a failure is raised and reported on its own
    loggers = [logging.getLogger(n) for n in ("torch", "onnxscript", "onnx_ir", "onnxruntime")]
    loggers += [lg for name, lg in logging.root.manager.loggerDict.items()
                if isinstance(lg, logging.Logger) and name.startswith(("torch.", "onnxscript.", "onnx_ir."))
                and lg.level != logging.NOTSET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _why(e: BaseException) -> str:
    """The root cause in one line: its type and the first line of its message, colours removed."""
    while e.__cause__ is not None and e.__cause__ is not e:
        e = e.__cause__
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def export_float32(loaded, path: str, workdir: str) -> None:
    """The checkpoint as a graph-optimised float32 ONNX model at `path`, checked against PyTorch."""
    from transformers import AutoModelForQuestionAnswering

    names = tuple(loaded.input_names)
    if not {"input_ids", "attention_mask"} <= set(names):
        raise ExportError(f"it takes {', '.join(names)}; the export needs input_ids and attention_mask")
    local = os.path.isdir(loaded.model_id)
    kwargs = {} if local else {"local_files_only": True,
                               **({"revision": loaded.revision} if loaded.revision else {})}
    try:  # float32 with eager attention: the plainest graph to export, whatever the run's model is
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForQuestionAnswering.from_pretrained(
                loaded.model_id, dtype=torch.float32, attn_implementation="eager", **kwargs).eval()
    except Exception as e:
        raise ExportError(f"its float32 weights could not be loaded for the export ({_why(e)})") from None
    wrapped = _Logits(model).eval()
    vocab = int(getattr(model.config, "vocab_size", 0) or len(loaded.tokenizer))
    seq = max(2, min(16, loaded.max_positions))
    example = _probe(names, vocab, batch=2, seq=seq, seed=0)
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("seq")
    raw = os.path.join(workdir, "exported.onnx")
    try:
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(wrapped, (), raw, kwargs=example, dynamo=True, input_names=list(names),
                              output_names=list(OUTPUTS), dynamic_shapes={n: {0: batch_dim, 1: seq_dim} for n in names},
                              opset_version=OPSET, external_data=False, verbose=False)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed ({_why(e)})") from None

    ort = _import_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = path
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(raw, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load the exported graph ({_why(e)})") from None
    os.remove(raw)
    if os.path.getsize(path) >= 2**31:
        raise ExportError("the model is over 2 GB, which one ONNX file cannot hold")

    # the saved graph against PyTorch, on shapes the export never saw
    session = new_session(ort, path)
    worst = 0.0
    for i, (batch, length) in enumerate([(3, min(40, loaded.max_positions)), (1, max(2, min(7, loaded.max_positions)))]):
        probe = _probe(names, vocab, batch, length, seed=i + 1)
        with torch.no_grad():
            want = wrapped(**probe)
        try:
            got = session.run(list(OUTPUTS), {n: t.numpy() for n, t in probe.items()})
        except Exception as e:
            raise ExportError(f"the exported graph fails on a batch of {batch} x {length} tokens ({_why(e)})") from None
        worst = max(worst, _relative_difference(want, got, probe["attention_mask"].bool()))
    if not worst <= TOLERANCE:
        raise ExportError(f"the exported graph's logits differ from PyTorch's by {worst:.2g} "
                          f"(relative; at most {TOLERANCE} allowed)")


def _head_matmuls(model) -> list[str]:
    """The MatMul nodes nearest to the logits outputs: the QA head, kept in float32."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found, seen, todo = [], set(), list(OUTPUTS)
    while todo:
        node = producer.get(todo.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in ("MatMul", "FusedMatMul", "Gemm"):
            found.append(node.name)
            continue
        todo.extend(node.input)
    return found


def quantize_int8(src: str, dst: str) -> None:
    """Dynamic int8 with per-channel weights: every MatMul with constant weights but the QA head."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(src)
    for i, node in enumerate(model.graph.node):
        if not node.name:  # nodes are excluded by name
            node.name = f"node_{i}_{node.op_type}"
    try:
        with _quiet_export():
            quantize_dynamic(model, dst, per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], nodes_to_exclude=_head_matmuls(model),
                             extra_options={"MatMulConstBOnly": True})
    except Exception as e:
        raise ExportError(f"int8 quantization failed ({_why(e)})") from None
