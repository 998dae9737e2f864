"""qa-batch: batch extractive question answering over Parquet tables.

The data flow, one module per stage, in the order a row travels:

    read    (read.py)     Parquet files  -> RowBatch windows (streamed, validated up front)
            (questions.py)                  with --questions: each row asked every question
    chunk   (chunk.py)    RowBatch       -> ChunkSet (each passage and question tokenized once)
    batch   (batch.py)    ChunkSet       -> padded device batches cut by a token budget
    infer   (infer.py)    device batch   -> start/end logits (halving the batch on out-of-memory)
            (onnx_backend.py)               --backend onnxruntime: the same forward in ONNX Runtime
    decode  (spans.py)    logits         -> best spans per chunk, searched on the device
    merge   (merge.py)    chunk spans    -> one answer (or top-k) per row (answers.py: the records)
            (calibrate.py)                  --calibration: a fitted null bias and confidence
    write   (write.py)    answers        -> Arrow tables of the output schema
            (resume.py)                     each window a part file; parts -> the output, atomically
            (wide.py)                       --wide: one row per document, a column group per field

The local engine, which runs the stages:

    engine.py   a run from start to end: plan, load, answer, assemble
    job.py      planning a run before any model work: options, inputs, output, work directory
    model.py    loading the checkpoint; which devices there are
    stages.py   chunk -> batch -> infer -> decode -> merge, set up for one model and run
    loop.py     the threads: read/chunk/batch on a producer, infer/merge/write on the caller
    report.py   what a run did: counts, rates, stage seconds, the bottleneck

Scale-out runs the same stages: `workers.py` one engine process per device of a machine,
`ray_engine.py` Ray Data actors (`shards.py`: row ranges shared out; `commit.py`: the
output published with a `_SUCCESS` marker). Beside them: `config.py` (every option in one
dataclass), `storage.py` (local paths and s3:// alike), `errors.py` (exit codes),
`faults.py` (crash points for the resume tests), and the tools `evaluate.py`, `squad.py`,
`summary.py`, `wording.py`.
"""

__version__ = "0.1.0"
