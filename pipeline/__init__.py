"""qa-batch: batch extractive question answering over Parquet tables.

The folders are the architecture; each may import only from the ones above it in this list
(tests/test_structure.py holds the directions):

    config.py, counts.py, errors.py, storage.py, wording.py, faults.py
                the shared ground: every option in one dataclass, input rows and answers
                counted together, exit codes, local paths and s3:// alike, wording, crash
                points for the resume tests
    models/     loading a checkpoint and its tokenizer, devices, the ONNX Runtime and OpenVINO backends
    stages/     what happens to a row, no process or job in sight
    quality/    answer quality and calibration: eval, fit, summary, SQuAD conversion
    engines/    what runs the stages: a job planned, run, killed, resumed and committed

The data flow through stages/, in the order a row travels:

    read    (read.py)     Parquet files  -> RowBatch windows (streamed, validated up front)
            (questions.py)                  with --questions: each row asked every question
    chunk   (chunk.py)    RowBatch       -> ChunkSet (each passage and question tokenized once)
    batch   (batch.py)    ChunkSet       -> padded device batches cut by a token budget
    infer   (infer.py)    device batch   -> start/end logits (halving the batch on out-of-memory)
    decode  (spans.py)    logits         -> best spans per chunk, searched on the device
    merge   (merge.py)    chunk spans    -> one answer (or top-k) per row (answers.py: the records)
    write   (write.py)    answers        -> Arrow tables of the output schema
            (wide.py)                       --wide: one row per input row, a column group per field
            (documents.py)                  --document-col: each pair's candidates, reduced by document
            (shape.py)                      the windows' tables -> the output's (pairs, wide, documents)

The engines (engines/), which run the stages:

    job.py      planning a run before any model work: options, inputs, output, work directory
    chain.py    chunk -> batch -> infer -> decode -> merge, set up for one model
    loop.py     the local engine's threads: read/chunk/batch on a producer, infer/merge/write
    local.py    the local engine: plan, load, answer, assemble
    workers.py  one engine process per device of a machine (--devices)
    ray_engine.py  Ray Data actors (--engine ray)
    report.py   what a run did: counts, rates, stage seconds, the bottleneck
    resume.py   finished windows as part files, and what a rerun does with them
    shards.py   row ranges shared out to workers and actors
    commit.py   a directory output published with a `_SUCCESS` marker

The models (models/): `checkpoint.py` (a checkpoint, its tokenizer, devices, dtypes, its
identity) and `onnx_backend.py` (--backend onnxruntime/openvino/auto: the same forward in ONNX Runtime or OpenVINO).
The quality tools (quality/): `evaluate.py` (SQuAD metrics, ECE), `calibrate.py` (a fitted
null bias and confidence), `squad.py` (SQuAD JSON to an input table), `summary.py`.
"""

__version__ = "0.1.0"
