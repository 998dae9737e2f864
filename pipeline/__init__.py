"""qa-batch: batch extractive question answering over Parquet tables.

The data flow, one module per stage:

    read    (read.py)    Parquet files  -> RowBatch windows (streamed, validated up front)
    chunk   (chunk.py)   RowBatch       -> ChunkSet (each passage and question tokenized once)
    batch   (batch.py)   ChunkSet       -> padded device batches cut by a token budget
    infer   (infer.py)   device batch   -> start/end logits (halving the batch on out-of-memory)
    decode  (spans.py)   logits         -> best spans per chunk, searched on the device
    merge   (merge.py)   chunk spans    -> one answer (or top-k) per row
    write   (write.py)   answers        -> Parquet, written atomically

`engine.py` wires the stages together; `model.py` loads the checkpoint; `config.py`
holds every option in one dataclass; `resume.py` keeps finished windows as parts;
`storage.py` makes local paths and s3:// (any pyarrow filesystem) look alike. To scale
out, `workers.py` runs one engine process per device of a machine and `ray_engine.py`
runs the same stages in Ray Data actors.
"""

__version__ = "0.1.0"
