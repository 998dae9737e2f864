"""Load a question-answering checkpoint, its fast tokenizer, the device and the dtype.

Failures here happen before any row is read, and each says what to do next.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import socket
import warnings
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import RuntimeFailure, UsageError

_MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class LoadedModel:
    """A model ready for inference, with everything the other stages need to know about it."""

    model: torch.nn.Module
    tokenizer: object  # a transformers fast tokenizer
    device: torch.device
    dtype: torch.dtype
    input_names: tuple[str, ...]  # the inputs both the tokenizer makes and forward() takes
    max_positions: int  # the longest sequence the model accepts
    model_id: str
    revision: str | None  # hub commit, or a content hash of a local checkpoint
    mask_4d: bool = False  # feed the padding mask as [B, 1, 1, T] bool: the same answers, no host read (mask_form)
    mask_always: bool = False  # an unpadded batch gets an all-true mask too: without one the model reads the host

    @property
    def identity(self) -> dict:
        """The model as outputs and manifests name it."""
        return {"id": self.model_id, "revision": self.revision}

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_device(spec: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU (normal: the summary line names the device);
    an explicit CUDA device must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {spec}: CUDA is not available on this machine "
                "(no GPU, or torch is a CPU build); use --device cpu or --device auto"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise UsageError(f"--device {spec!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA (BERT-family activations fit it) and float32 on the CPU."""
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec not in names:
        raise UsageError(f"--dtype {spec!r}: choose auto, float32, float16 or bfloat16")
    if spec == "float16" and device.type == "cpu":
        raise UsageError("--dtype float16 is slow or unsupported on the CPU: use float32 or bfloat16")
    return names[spec]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub: fails in seconds where hub downloads would retry for a minute."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def not_in_cache(model_id: str, local: str = "a local directory holding the checkpoint") -> UsageError:
    """A hub model that is not in the local cache when only the cache can be used: the error
    says which of the two is true here, HF_HUB_OFFLINE set or the hub unreachable."""
    from huggingface_hub import constants

    why = ("HF_HUB_OFFLINE is set, so nothing is downloaded" if _offline_env()
           else "the Hugging Face hub cannot be reached")
    fix = ("download it once with HF_HUB_OFFLINE unset and network access" if _offline_env()
           else "download it once with network access and rerun with HF_HUB_OFFLINE=1 to use the cache")
    return UsageError(
        f"--model {model_id}: the model is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
        f"and {why}. Point --model at {local} (config.json, weights and tokenizer files), or {fix}.")


def loading_reads(name: str) -> bool:
    """Is `name` a file of a checkpoint folder that loading a PyTorch model and its tokenizer may
    read? (Not training_args.bin, trainer_state.json, eval results, logs, READMEs, TensorFlow or
    Flax weights: an evaluation writing into the folder mid-job is not a new model.)"""
    if name.startswith("."):
        return False
    return (name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json"))
            or (name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json")))
            or name.startswith(("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece",
                                "sentencepiece", "spm"))
            or name.endswith(".model"))


def content_hash(directory: str) -> str:
    """sha256 over every file of a local checkpoint that loading may read: the config, the
    weights however saved (one file, shards and their index, variants), the tokenizer's files
    and vocabulary (loading_reads). Outputs, resumes, ONNX exports
    and calibrations name the exact model by it: retrained into the same folder, it changes."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not loading_reads(name) or not os.path.isfile(path):
            continue
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def model_identity(model_id: str) -> dict:
    """The model as `LoadedModel.identity` will name it, without loading the weights: a local
    checkpoint's content hash, or the hub commit its config.json resolves to. For a driver
    (the Ray engine) that plans a job its workers run."""
    if os.path.isdir(model_id):
        return {"id": model_id, "revision": content_hash(model_id)}
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise UsageError(f"--model {model_id!r}: no such directory")
    from transformers import AutoConfig

    offline_only = _offline_env() or not _hub_reachable()
    try:
        config = AutoConfig.from_pretrained(model_id, **({"local_files_only": True} if offline_only else {}))
    except (OSError, ValueError) as e:
        if offline_only:
            raise not_in_cache(model_id, local="a directory every node can read") from None
        raise UsageError(f"--model {model_id}: could not load it from the hub ({e})") from None
    return {"id": model_id, "revision": getattr(config, "_commit_hash", None)}


def max_positions(model: torch.nn.Module, tokenizer) -> int:
    """The longest input the model accepts, from its position table (RoBERTa reserves padding_idx+1)."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or 512
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if padding_idx is not None:  # RoBERTa-style positions start at padding_idx + 1
        limit -= padding_idx + 1
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limit = min(limit, tok_limit)
    return int(limit)


def warm_up(model: torch.nn.Module, device: torch.device, input_names: tuple[str, ...], tokenizer) -> None:
    """One small forward before any data: CUDA libraries initialise here, and a model that
    cannot run on the device fails now (exit code 3) rather than after reading the input."""
    ids = torch.full((2, 16), tokenizer.unk_token_id or 0, dtype=torch.long, device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    try:
        with torch.inference_mode():
            model(**{n: inputs[n] for n in input_names})
        torch.cuda.synchronize(device)
    except RuntimeError as e:
        raise RuntimeFailure(f"the model does not run on {device}: {e}") from None


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (`.item()`, `bool(tensor)`): on CUDA
    each waits for the stream, so a forward with one cannot overlap the next batch's launch."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.item.default)

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def host_reads(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """One forward: how many host reads it made, and its start and end logits."""
    with torch.inference_mode(), HostReads() as reads:
        out = model(**inputs)
    return reads.count, out.start_logits, out.end_logits


def mask_form(model: torch.nn.Module, device: torch.device, input_names: tuple[str, ...]) -> tuple[bool, bool]:
    """How to pass the padding mask so that a forward makes no host read, with the logits of the
    2D mask: (as [B, 1, 1, T] bool?, on unpadded batches too?). transformers 5 returns a prepared
    4D mask as it is, but checks a 2D one with `mask.all()` to skip masking, and some models
    (DeBERTa) look for padding in `input_ids` when given no mask: both host reads, which on CUDA
    wait for the stream. A model that gives other logits with a 4D mask keeps the 2D one."""
    if "attention_mask" not in input_names:
        return False, False
    ids = torch.arange(5, 21, device=device).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    inputs = {n: inputs[n] for n in input_names}
    try:
        _, start, end = host_reads(model, inputs)
        reads, start_4d, end_4d = host_reads(model, {**inputs, "attention_mask": mask[:, None, None, :].bool()})
    except Exception:  # noqa: BLE001 - a model that refuses a 4D mask keeps the 2D one
        return False, False
    real = mask.bool()
    tol = 1e-4 if start.dtype == torch.float32 else 2e-2  # 16-bit logits: a few ulps of their range
    same = all(torch.allclose(a[real].float(), b[real].float(), rtol=10 * tol, atol=tol)
               for a, b in ((start, start_4d), (end, end_4d)))
    if reads or not same:
        return False, False
    unmasked = {n: t[:1] for n, t in inputs.items() if n != "attention_mask"}
    return True, host_reads(model, unmasked)[0] > 0


def _source(model_id: str) -> tuple[bool, bool, dict]:
    """(local directory?, cache only?, from_pretrained's keyword arguments) for a --model."""
    local = os.path.isdir(model_id)
    # Hub ids look like "name" or "org/name"; anything else is meant as a local path.
    if not local and (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1):
        raise UsageError(f"--model {model_id!r}: no such directory")
    offline_only = _offline_env() or (not local and not _hub_reachable())
    return local, offline_only, {"local_files_only": True} if offline_only else {}


def _not_loadable(model_id: str, local: bool, offline_only: bool, e: Exception) -> UsageError:
    if local:
        return UsageError(f"--model {model_id}: not a loadable question-answering checkpoint ({e})")
    if offline_only:
        return not_in_cache(model_id)
    return UsageError(f"--model {model_id}: could not load it from the hub ({e})")


def _require_fast(model_id: str, tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise UsageError(
            f"--model {model_id}: its tokenizer is not a fast (Rust) tokenizer, which qa-batch needs for "
            "character offsets; save the checkpoint with a tokenizer.json "
            "(AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(dir))"
        )


def load_tokenizer(model_id: str):
    """The checkpoint's fast tokenizer alone, without the weights: for checks made before the
    model is loaded (a --questions list too long for --max-seq-len). Fails as load_model does."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    local, offline_only, kwargs = _source(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as e:
        raise _not_loadable(model_id, local, offline_only, e) from None
    _require_fast(model_id, tokenizer)
    return tokenizer


def load_model(model_id: str, device_spec: str = "auto", dtype_spec: str = "auto",
               quantize: str = "none") -> LoadedModel:
    """Load tokenizer and model with from_pretrained, from a local directory or the hub."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # qa-batch shows its own progress
    hf_logging.set_verbosity_error()

    device = resolve_device(device_spec)
    dtype = resolve_dtype(dtype_spec, device)
    if quantize not in ("none", "int8"):
        raise UsageError(f"--quantize {quantize!r}: choose none or int8")
    if quantize == "int8" and (device.type != "cpu" or dtype != torch.float32):
        raise UsageError("--quantize int8 runs on the CPU in float32: use it with --device cpu and --dtype auto")

    local, offline_only, kwargs = _source(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForQuestionAnswering.from_pretrained(model_id, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise _not_loadable(model_id, local, offline_only, e) from None
    _require_fast(model_id, tokenizer)

    try:
        model.to(device)
    except RuntimeError as e:
        raise RuntimeFailure(f"could not move the model to {device}: {e}") from None
    model.eval()
    # --quantize int8 is ONNX Runtime's int8, made from these float32 weights (onnx_backend.prepared):
    # PyTorch's dynamic int8 was removed, as it lost 1.14 F1 on the trained model where ONNX Runtime's kept it

    # Feed only what forward() takes; token types only where they mean something (BERT yes,
    # RoBERTa with a single type and DistilBERT, which has no such input, no).
    takes = set(inspect.signature(model.forward).parameters)
    makes = {"input_ids", "attention_mask"}
    if "token_type_ids" in tokenizer.model_input_names or getattr(model.config, "type_vocab_size", 1) > 1:
        makes.add("token_type_ids")
    input_names = tuple(n for n in _MODEL_INPUTS if n in takes and n in makes)

    if device.type == "cuda":
        warm_up(model, device, input_names, tokenizer)
    revision = content_hash(model_id) if local else getattr(model.config, "_commit_hash", None)
    mask_4d, mask_always = mask_form(model, device, input_names)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        input_names=input_names,
        max_positions=max_positions(model, tokenizer),
        model_id=model_id,
        revision=revision,
        mask_4d=mask_4d,
        mask_always=mask_always,
    )


def resolve_devices(specs: tuple[str, ...]) -> tuple[str, ...]:
    """--devices as indexed device names ('cuda' -> 'cuda:0', the current device), each checked to
    exist: a worker process must be told exactly which device is its own."""
    return tuple(str(resolve_device(spec)) for spec in specs)


def devices_for(spec: str) -> tuple[str, ...]:
    """--device auto or cuda with several visible GPUs means all of them, one worker each."""
    if spec in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    return (spec,)
