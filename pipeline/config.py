"""Every option of a run in one typed object; the CLI only fills it in."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

DEFAULT_MODEL = "google-bert/bert-large-uncased-whole-word-masking-finetuned-squad"


def default_model() -> str:
    """The model used when --model is not given: $QA_BATCH_MODEL, else BERT-large SQuAD."""
    return os.environ.get("QA_BATCH_MODEL") or DEFAULT_MODEL


@dataclass(frozen=True)
class RunConfig:
    inputs: tuple[str, ...]
    output: str | None = None  # None: <first input stem>.answers.parquet beside it
    model: str = field(default_factory=default_model)
    passage_col: str = "passage"
    question_col: str = "question"
    id_col: str | None = None  # None: "id" when the input has it, else a "row" column
    keep_columns: tuple[str, ...] = ()
    questions: str | None = None  # --questions: a file of questions asked of every row (questions.py)
    question: tuple[str, ...] = ()  # --question, repeated: the questions given one by one
    document_col: str | None = None  # rows sharing this column's value are one document (documents.py)
    across_rows: bool = False  # every row of the inputs is one document: each question answered over the table
    wide: bool = False  # with a question list: one output row per input row, a group of columns per question
    max_seq_len: int = 384
    doc_stride: int = 128
    max_answer_len: int = 30
    truncate_question: bool = False  # cut questions to max_question_len tokens instead of erroring
    max_question_len: int = 64  # with truncate_question (BERT run_squad's max_query_length)
    top_k: int = 1
    allow_null: bool = False
    null_threshold: float = 0.0
    device: str = "auto"
    devices: tuple[str, ...] = ()  # several devices: one worker process each (workers.py)
    dtype: str = "auto"
    quantize: str = "none"  # "int8": ONNX Runtime's dynamic int8 on the CPU, whatever the backend (onnx_backend.py)
    # "onnxruntime"/"openvino": the model exported to ONNX, run on the CPU; "auto": decided per device (onnx_backend.resolved)
    backend: str = "torch"
    batch_size: int | None = None  # chunks per forward; None: per-device default
    max_batch_tokens: int | None = None  # padded tokens per forward; None: batch_size x max_seq_len
    cpu_workers: int | None = None  # CPU only: parallel single-threaded batches; None: torch's thread count
    rows_per_window: int = 1024  # rows tokenized, sorted and merged together
    limit: int | None = None
    overwrite: bool = False
    restart: bool = False  # discard the parts of an interrupted run instead of resuming it
    quiet: bool = False
    report: str | None = None
    table_format: str = "parquet"  # "delta": -o names a Delta Lake table the run commits to (delta_table.py)
    partition: tuple[str, ...] = ()  # --partition KEY=VALUE: the table partition a run replaces
    schema_mode: str = "error"  # "merge": a table run may add new columns to the table's schema
    catalog: str = "default"  # --table-format iceberg: the pyiceberg catalog holding -o NAMESPACE.TABLE
    lineage: bool = False  # OpenLineage run events through the configured client (lineage.py)
    engine: str = "local"  # "ray": Ray Data actors (ray_engine.py)
    ray_address: str | None = None  # None: start a local Ray instance
    num_gpus: int | None = None  # with --engine ray: GPU actors, one GPU each; None (auto): one per GPU of the cluster; 0: CPU actors
    num_cpus_per_worker: float | None = None  # with --engine ray: CPUs per actor (a CPU actor's worker threads); None: from the cluster
    rows_per_batch: int | None = None  # with --engine ray: rows per actor call; None: balanced over actors
    calibration: str | None = None  # a calibration JSON (qa-batch eval --fit-calibration): null bias, calibrated confidence
    force_calibration: bool = False  # apply it even when fitted for another model or other options

    def answer_options(self) -> dict:
        """The options that change answers, recorded in the output's metadata."""
        keys = (
            "passage_col", "question_col", "id_col", "keep_columns", "max_seq_len",
            "doc_stride", "max_answer_len", "truncate_question", "max_question_len", "top_k", "allow_null", "null_threshold",
            "dtype", "quantize", "backend", "limit", "calibration", "document_col", "across_rows",
        )
        return {k: v for k, v in asdict(self).items() if k in keys}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["inputs"] = list(self.inputs)
        d["keep_columns"] = list(self.keep_columns)
        d["question"] = list(self.question)
        d["devices"] = list(self.devices)
        d["partition"] = list(self.partition)
        return d
