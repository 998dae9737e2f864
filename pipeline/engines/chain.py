"""The stages between read and write, set up for one model and one run's options:
chunk -> batch -> infer -> decode -> merge.

`Stages.build` makes the chunker, the predictor and the batch limits; loop.py overlaps them
on threads (the local engine, each worker and each Ray actor); `answer_window` runs them in
order on one window, without threads. Same stages, same answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from ..config import RunConfig
from ..errors import UsageError
from ..models import onnx_backend
from ..models.checkpoint import LoadedModel
from ..quality import calibrate
from ..stages.batch import HostBatch, collate, plan_batches
from ..stages.chunk import Chunker, ChunkSet
from ..stages.infer import Predictor
from ..stages.merge import RowAnswer, WindowSpans, merge_window
from ..stages.read import RowBatch
from ..stages.shape import OutputShape

CPU_BATCH_SIZE = 4  # per CPU worker: small batches stay in cache and win (BENCHMARKS.md)


CUDA_BATCH_SIZE = 256


@dataclass
class Stages:
    """The chunk -> batch -> infer -> merge stages set up for one model and one run's options.

    The engines pipeline them over threads (loop.py); `answer_window` runs them in order on
    one window, without threads. Same stages, same answers.
    """

    config: RunConfig
    loaded: LoadedModel
    chunker: Chunker
    predictor: Predictor
    batch_size: int
    max_batch_tokens: int
    chunk_k: int  # spans kept per chunk: top_k, at least 2 for the runner-up (each span has one owner chunk)
    calibration: calibrate.Calibration | None = None  # --calibration: null bias and calibrated confidence
    pad_multiple: int = 1  # batches padded to a multiple of this (8 on CUDA: tensor-core shapes; OpenVINO: fewer shapes)

    @classmethod
    def build(cls, config: RunConfig, loaded: LoadedModel, cpu_workers: int,
              calibration: calibrate.Calibration | None) -> "Stages":
        """`calibration`: the job's copy (calibrate.plan_calibration), None without --calibration."""
        loaded = onnx_backend.prepared(loaded, config)  # --backend onnxruntime: its session replaces the model
        if calibration is not None:
            calibrate.check_calibration(config, calibration, loaded)
        on_cuda = loaded.device.type == "cuda"
        batch_size = config.batch_size or (CUDA_BATCH_SIZE if on_cuda else CPU_BATCH_SIZE)
        chunk_k = max(config.top_k, 2)
        try:  # the chunker encodes a probe text: a tokenizer that cannot encode is refused here
            chunker = Chunker(loaded.tokenizer, config.max_seq_len, config.doc_stride,
                              config.max_question_len if config.truncate_question else None)
        except UsageError as e:
            raise UsageError(f"--model {config.model}: {e}") from None
        return cls(
            config=config, loaded=loaded,
            chunker=chunker,
            predictor=Predictor(loaded.model, loaded.device, config.max_answer_len, chunk_k,
                                workers=1 if on_cuda else cpu_workers, mask_4d=loaded.mask_4d,
                                mask_always=loaded.mask_always),
            batch_size=batch_size,
            max_batch_tokens=config.max_batch_tokens or batch_size * config.max_seq_len,
            chunk_k=chunk_k,
            calibration=calibration,
            pad_multiple=8 if on_cuda else onnx_backend.pad_multiple(loaded.model),
        )

    @property
    def on_cuda(self) -> bool:
        return self.loaded.device.type == "cuda"

    def batch_plan(self, chunks: ChunkSet) -> list:
        """Which chunks of a window each batch takes, longest first."""
        return plan_batches(chunks.lengths, self.batch_size, self.max_batch_tokens)

    def collate(self, chunks: ChunkSet, index) -> HostBatch:
        """One planned batch, padded on the host."""
        tok = self.loaded.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        pad_left = getattr(tok, "padding_side", "right") == "left"
        return collate(chunks, index, self.loaded.input_names, pad_id, pad_left,
                       pad_multiple=self.pad_multiple, pin=self.on_cuda, max_width=self.loaded.max_positions)

    def batches(self, chunks: ChunkSet):
        """Padded host batches of a window's chunks, longest first (each padded when taken)."""
        for index in self.batch_plan(chunks):
            yield self.collate(chunks, index)

    def merge(self, rows: RowBatch, chunks: ChunkSet, spans: WindowSpans) -> list[RowAnswer]:
        c, cal = self.config, self.calibration
        if c.document_col is not None or c.across_rows:  # each pair's candidates: the document decides (documents.py)
            return merge_window(rows.passages, chunks, spans, c.top_k, False, 0.0)
        if cal is None:
            return merge_window(rows.passages, chunks, spans, c.top_k, c.allow_null, c.null_threshold)
        # the calibration's null bias is the null threshold; then its confidence replaces the softmax share
        answers = merge_window(rows.passages, chunks, spans, c.top_k, cal.null_bias is not None,
                               cal.null_bias or 0.0)
        return calibrate.apply_to_answers(cal, answers)

    def answer_window(self, rows: RowBatch, shape: OutputShape) -> pa.Table:
        """All stages, in order, for one window of rows: its table (stages/shape.py)."""
        chunks = self.chunker(rows.passages, rows.questions)
        spans = WindowSpans.empty(len(chunks), self.chunk_k)
        for hb in self.batches(chunks):
            spans.store(hb, self.predictor.collect(self.predictor.submit(hb)), chunks)
        return shape.window_table(rows, self.merge(rows, chunks, spans))
