"""Planning a run, before any model work (the ends of the data flow: inputs -> ... -> output).

Options checked, inputs planned (read.py), the output path chosen and checked, the work
directory of parts opened (resume.py), a finished job recognised, and at the end the parts
assembled into the output with the run's summary.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from .. import __version__, faults, storage
from ..config import RunConfig
from ..errors import UsageError
from ..models import onnx_backend
from ..quality import calibrate
from ..stages.questions import plan_questions
from ..stages.read import InputPlan, plan_inputs
from ..stages.documents import Grouping
from ..stages.shape import OutputShape, PerDocument, PerPair, WithPartition
from ..stages.write import read_metadata
from . import delta_table, iceberg_table, tables
from .loop import Target
from .report import Progress, RunSummary, write_report
from .resume import Opened, WorkDir, input_fingerprint, work_dir_for


def default_output(inputs: tuple[str, ...], files: tuple[str, ...]) -> str:
    """<stem>.answers.parquet beside the first input (beside, not inside, a directory or the
    folder a glob reads: never where the next run's input would include it)."""
    first = inputs[0]
    if storage.is_glob(first):
        root = storage.glob_root(first)
        here = not storage.is_uri(root) and os.path.realpath(root) == os.path.realpath(os.getcwd())
        at_top = here or storage.basename(root) == ""
        if at_top:
            raise UsageError(f"input glob {first}: it reads the working directory or a bucket's top, so there is no "
                             "folder to put the answers beside: give the output with -o")
        return storage.with_suffix(root, ".answers.parquet")
    if storage.is_dir(first):
        return storage.with_suffix(first.rstrip("/") if storage.is_uri(first) else os.path.normpath(first),
                                   ".answers.parquet")
    path = first if storage.is_file(first) else files[0]
    stem = storage.basename(path).removesuffix(".parquet")
    return storage.join(storage.parent(path), stem + ".answers.parquet")


def check_options(c: RunConfig) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise UsageError(msg)

    need(c.max_seq_len >= 8, f"--max-seq-len {c.max_seq_len}: must be at least 8")
    need(0 <= c.doc_stride < c.max_seq_len, f"--doc-stride {c.doc_stride}: must be >= 0 and below --max-seq-len ({c.max_seq_len})")
    need(c.max_answer_len >= 1, f"--max-answer-len {c.max_answer_len}: must be at least 1")
    need(c.top_k >= 1, f"--top-k {c.top_k}: must be at least 1")
    need(c.max_question_len >= 1, f"--max-question-len {c.max_question_len}: must be at least 1")
    need(c.batch_size is None or c.batch_size >= 1, f"--batch-size {c.batch_size}: must be at least 1")
    need(c.max_batch_tokens is None or c.max_batch_tokens >= 1, "--max-batch-tokens must be at least 1")
    need(c.limit is None or c.limit >= 0, f"--limit {c.limit}: must be >= 0")
    need(c.rows_per_window >= 1, "--rows-per-window must be at least 1")
    need(c.cpu_workers is None or c.cpu_workers >= 1, "--cpu-workers must be at least 1")
    check_grouping(c)
    check_table_options(c)
    onnx_backend.check_options(c)  # --backend: known, on the CPU, installed


def check_grouping(c: RunConfig) -> None:
    """--document-col and --across-rows: with options that make sense for one answer per document."""
    if c.document_col is None and not c.across_rows:
        return
    if c.document_col is not None and c.across_rows:
        raise UsageError("--document-col and --across-rows both say what a document is: give one (--across-rows makes "
                         "the whole table one document)")
    option = Grouping(c.document_col).option
    if c.document_col in (c.passage_col, c.question_col):
        raise UsageError(f"{option}: that is the {'passage' if c.document_col == c.passage_col else 'question'} "
                         "column; name the column that says which document each row belongs to")
    if c.keep_columns:
        raise UsageError(f"{option} gives one output row per document and question, so input columns cannot be "
                         "kept (--keep-columns): join the output with your table on the document key instead")
    if c.across_rows and c.wide:
        raise UsageError("--across-rows gives one output row per question already: drop --wide")


def check_table_options(c: RunConfig) -> None:
    """--table-format and what goes with it."""
    if c.table_format not in ("parquet", "delta", "iceberg"):
        raise UsageError(f"--table-format {c.table_format}: expected parquet, delta or iceberg")
    if c.table_format == "parquet":
        if c.partition:
            raise UsageError("--partition needs a table: add --table-format delta or iceberg (a Parquet file has no "
                             "partitions)")
        if c.schema_mode != "error":
            raise UsageError("--schema-mode applies to a table: add --table-format delta or iceberg")
        return
    if c.schema_mode not in ("error", "merge"):
        raise UsageError(f"--schema-mode {c.schema_mode}: expected error or merge")
    name = {"delta": "a Delta table", "iceberg": "an Iceberg table"}[c.table_format]
    if c.overwrite:
        raise UsageError(f"--overwrite does not apply to {name}: a run appends to it, or with --partition "
                         "replaces that partition (a rerun of the same night replaces that night's answers)")
    if c.table_format == "iceberg":
        if not c.output:
            raise UsageError("--table-format iceberg needs -o NAMESPACE.TABLE: the table in the catalog --catalog")
        iceberg_table.identifier(c.output)
    tables.parse_partition(c.partition)


def grouping(c: RunConfig) -> Grouping | None:
    return Grouping(c.document_col) if c.document_col is not None or c.across_rows else None


def answer_identity(c: RunConfig, calibration: calibrate.Calibration | None) -> dict:
    """The options that change answers or the output's shape, as a resume manifest holds them
    (both engines), the calibration named by the digest of its parameters."""
    table = {"table_format": c.table_format, "partition": list(c.partition), "schema_mode": c.schema_mode} \
        if c.table_format != "parquet" else {}  # where the answers go: another partition is another job
    return {**c.answer_options(), "wide": c.wide, **table, **calibrate.calibration_identity(c, calibration)}


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """sha256 of qa-batch's own source: parts written by other code are another job's, even
    under the same version number (a development checkout changes between commits)."""
    h = hashlib.sha256()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def versions(c: RunConfig) -> dict:
    """What computes the answers, by version: qa-batch (and its code), torch, transformers,
    tokenizers, and ONNX Runtime when it runs the model. Part of a job's identity."""
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    found = {"qa_batch": f"{__version__}+{code_digest()}", "torch": of("torch"),
             "transformers": of("transformers"), "tokenizers": of("tokenizers")}
    if c.backend in onnx_backend.EXPORTED:
        found["onnxruntime"] = of("onnxruntime")  # it makes the export for both
    if c.backend == "openvino":
        found["openvino"] = of("openvino")
    return found


def questions_metadata(plan: InputPlan) -> dict:
    """The question list every row was asked, as the output's metadata holds it (nothing without one)."""
    return {"questions": plan.questions.as_dict()} if plan.questions is not None else {}


def check_output(path: str, plan: InputPlan, overwrite: bool) -> None:
    if not storage.is_uri(path):  # object stores have no folders to check
        directory = storage.parent(path)
        if not os.path.isdir(directory):
            raise UsageError(f"output directory {directory} does not exist")
        if not os.access(directory, os.W_OK):
            raise UsageError(f"output directory {directory} is not writable")
    try:
        if storage.is_dir(path):
            raise UsageError(f"output {path} is a directory: give a file path with -o")
        if any(storage.identity(f) == storage.identity(path) for f in plan.files):
            raise UsageError(f"output {path} is also an input: choose another path with -o")
        if storage.exists(path) and not overwrite:
            raise UsageError(f"output {path} exists: pass --overwrite to replace it, or choose another path with -o")
    except OSError as e:
        raise UsageError(f"output {path} cannot be checked: {e}") from None


def check_apart_from_inputs(output: str, inputs: tuple[str, ...], files: tuple[str, ...]) -> None:
    """Refuse an output that is an input, holds one (--overwrite would delete it), or lies inside
    an input directory (the next run would read the answers as input). Both engines."""
    for f in files:
        if storage.within(f, output):
            what = "is also an input" if storage.within(output, f) else f"contains the input {f}"
            raise UsageError(f"output {output} {what}: choose another path with -o")
    work = work_dir_for(output)
    written = (output, storage.join(work, "part-000000000000.parquet"),  # what a run writes: the local engine's
               storage.join(work, "files", "part-000000000000-000000000001.parquet"),  # and the Ray engine's
               storage.join(output, "part-000000000000-000000000001.parquet"))
    for spec in inputs:
        if storage.is_glob(spec):
            if any(storage.glob_could_match(spec, path) for path in written):
                raise UsageError(f"output {output} (or its work directory {work}) would match the input glob "
                                 f"{spec}, so the next run would read the answers as input: choose a path the glob "
                                 "does not match with -o")
        elif storage.within(output, spec) and storage.is_dir(spec):
            raise UsageError(f"output {output} lies inside the input directory {spec}, so the next run would "
                             "read the answers as input: choose a path outside it with -o")


@dataclass
class Job:
    """A run as planned before any model work: inputs, output, the parts kept so far, schema."""

    config: RunConfig
    plan: InputPlan
    output: str
    parts: WorkDir
    shape: OutputShape  # the windows' tables (the parts) and the output's (stages/shape.py)
    total_rows: int  # input rows to answer (with a question list, each gives one answer per question)
    started: float  # perf_counter at the start
    started_at: str
    calibration: calibrate.Calibration | None = None  # --calibration, loaded once (plan_calibration)
    table: tables.TableTarget | None = None  # --table-format: the table the run commits to

    @classmethod
    def plan_for(cls, config: RunConfig,
                 default_output_for: Callable[[tuple[str, ...], tuple[str, ...]], str] = default_output) -> "Job":
        """Both engines' planning: options, calibration, question list, inputs, output path
        (`default_output_for` the inputs when -o is not given), schema. No model work."""
        started = time.perf_counter()
        started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        config = onnx_backend.resolved(config)  # --backend auto: the backend decided before anything is named
        check_options(config)
        calibration = calibrate.plan_calibration(config)
        questions = plan_questions(config)
        plan = plan_inputs(config.inputs, config.passage_col, config.question_col, config.id_col,
                           config.keep_columns, questions, config.document_col)
        if config.table_format == "iceberg":  # a table of a catalog, not a path: parts beside its data
            return cls(config, plan, config.output, WorkDir(iceberg_table.work_dir(config.catalog, config.output)),
                       output_shape(config, plan, calibration), total_rows(config, plan), started, started_at,
                       calibration, table_target(config.table_format, config.output, config.catalog))
        output = config.output or default_output_for(config.inputs, plan.files)
        if config.table_format == "delta" and not config.output:  # a table is a folder: <stem>.answers
            output = output.replace(".answers.parquet", ".answers", 1)
        if output != storage.without_trailing_slash(output):  # out/: a folder's name
            if config.engine != "ray" and config.table_format == "parquet":
                raise UsageError(f"-o {output} names a folder (it ends in /), and the local engine writes one "
                                 "Parquet file: give a file path (e.g. -o {0}answers.parquet), or use --engine ray, "
                                 "which writes a folder of files".format(output))
            output = storage.without_trailing_slash(output)
        check_apart_from_inputs(output, config.inputs, plan.files)
        return cls(config, plan, output, WorkDir(work_dir_for(output)), output_shape(config, plan, calibration),
                   total_rows(config, plan), started, started_at, calibration,
                   table_target(config.table_format, output, config.catalog))

    @property
    def file_schema(self) -> pa.Schema:
        """The output's: long, with --wide one row per input row (or document), or one per document."""
        return self.shape.schema

    def target(self) -> Target:
        """Where the loop puts finished windows: parts of the work directory."""
        return Target(self.config, self.plan, self.shape, self.parts.write_part, self.parts.path)

    @property
    def file_shape(self) -> OutputShape:
        """The shape of the files the run writes: with Iceberg, the partition columns appended."""
        if self.table is not None and self.table.partition_in_files:
            return WithPartition(self.shape, tuple(self.partition.items()))
        return self.shape

    @property
    def partition(self) -> dict[str, str]:
        return tables.parse_partition(self.config.partition)

    def check_output(self) -> None:
        """Before any model work: the output path is usable (an output this job wrote may stay);
        a table has this run's partition columns and schema."""
        if self.table is not None:
            if self.config.table_format == "delta" and not storage.is_uri(self.output) \
                    and not os.path.isdir(storage.parent(self.output)):
                raise UsageError(f"output directory {storage.parent(self.output)} does not exist")
            self.table.check(self.file_schema, self.partition, self.config.schema_mode)
            return
        check_output(self.output, self.plan, self.config.overwrite or self.parts.wrote(self.output))

    def metadata(self, model: dict, device: str, dtype: str) -> dict:
        return {"qa_batch_version": __version__, "versions": versions(self.config), "model": model,
                "options": self.config.as_dict(),
                "device": device, "dtype": dtype, "backend": self.config.backend, "started_at": self.started_at,
                **calibrate.calibration_metadata(self.config, self.calibration), **questions_metadata(self.plan)}

    def open_parts(self, model: dict, device_type: str, dtype: str, batch_size: int,
                   max_batch_tokens: int) -> list[tuple[int, int]]:
        """Create or check the work directory; return the row ranges still to answer.

        None when this job's output is already in place (a run killed while cleaning up):
        `already_done` then gives its summary."""
        c = self.config
        opened = self.parts.open_for({
            "inputs": input_fingerprint(self.plan),
            "model": model,
            # what changes answers, batching included (it moves floating-point rounding)
            "options": {**answer_identity(c, self.calibration), "device": device_type, "dtype": dtype,
                        "batch_size": batch_size, "max_batch_tokens": max_batch_tokens,
                        "rows_per_window": c.rows_per_window},
            "schema": self.shape.window_schema.to_string(),
            "versions": versions(c),
        }, self.output, c.restart, c.overwrite or self.table is not None,  # a table is meant to exist
            self.table.committed if self.table is not None else None)
        if opened is Opened.FINISHED:
            return None
        return self.parts.todo(self.total_rows, c.rows_per_window)

    def already_done(self) -> RunSummary:
        """The summary stored in this job's output; the work directory's leftovers removed."""
        self.parts.remove()
        if self.table is not None:
            stored = self.table.summary_of(self.parts.job_id)
        else:
            stored = read_metadata(self.output)["summary"]
        return write_report(RunSummary.from_dict({**stored, "output": self.output}), self.config)

    def finish(self, summary: RunSummary, metadata: dict, this_run: Progress) -> RunSummary:
        """Assemble the parts into the output; the summary counts every part and this run's rows,
        its rates are this run's."""
        elapsed = time.perf_counter() - self.started
        summary.elapsed_s = round(elapsed, 3)
        summary.rows_per_s = round(this_run.rows / elapsed, 2) if elapsed else 0.0
        summary.chunks_per_s = round(this_run.chunks / elapsed, 2) if elapsed else 0.0
        summary.finished_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()

        def final_metadata(counts: dict) -> bytes:
            summary.set_counts(counts, this_run.as_dict())  # counts: every part, earlier runs' too
            return json.dumps({**metadata, "job_id": self.parts.job_id, "finished_at": summary.finished_at,
                               "summary": summary.as_dict()}).encode()

        if self.table is not None:  # one file, registered in the table by one commit
            path = self.table.assembly_path(self.parts.path, self.partition, self.parts.job_id)
            storage.make_dirs(storage.parent(path))
            counts = self.parts.assemble(path, self.file_shape, final_metadata)
            summary.stage_seconds["assemble"] = round(time.perf_counter() - t0, 3)
            self.table.commit([(path, counts["output_rows"])], self.file_schema, self.partition, self.parts.job_id,
                              summary.as_dict(), self.config.schema_mode)
        else:
            self.parts.assemble(self.output, self.shape, final_metadata)
            summary.stage_seconds["assemble"] = round(time.perf_counter() - t0, 3)
        faults.point("cleaning_up")
        self.parts.remove()
        return write_report(summary, self.config)


def output_shape(c: RunConfig, plan: InputPlan, calibration: calibrate.Calibration | None) -> OutputShape:
    """One output row per pair, or with --document-col/--across-rows per document (stages/shape.py)."""
    group = grouping(c)
    if group is None:
        return PerPair.build(plan, c.top_k, c.wide)
    if calibration is None:
        return PerDocument.build(plan, group, c.top_k, c.wide, c.allow_null, c.null_threshold)
    # the calibration's null bias is the null threshold; its confidence replaces the softmax share
    return PerDocument.build(plan, group, c.top_k, c.wide, calibration.null_bias is not None,
                             calibration.null_bias or 0.0, functools.partial(calibrate.apply_to_answers, calibration))


def table_target(table_format: str, output: str, catalog: str) -> tables.TableTarget | None:
    """The table a run commits to (None: a plain Parquet output)."""
    if table_format == "delta":
        return delta_table.DeltaTarget(output)
    if table_format == "iceberg":
        return iceberg_table.IcebergTarget(catalog, output)
    return None


def total_rows(c: RunConfig, plan: InputPlan) -> int:
    """Input rows to answer: all, or the first --limit."""
    return plan.total_rows if c.limit is None else min(c.limit, plan.total_rows)


def check_max_seq_len(config: RunConfig, max_positions: int) -> None:
    if config.max_seq_len > max_positions:
        raise UsageError(
            f"--max-seq-len {config.max_seq_len} is above what {config.model} accepts "
            f"({max_positions} tokens): use --max-seq-len {max_positions} or less")
