"""The `qa-batch` command. It parses options into a RunConfig and calls the engine; no logic lives here."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import List, Optional

import typer

from pipeline import __version__
from pipeline.config import DEFAULT_MODEL
from pipeline.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Interrupted, QaBatchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "Batch extractive question answering over Parquet tables.\n\n"
        "Reads (passage, question) rows, splits long passages into overlapping chunks, runs any "
        "Hugging Face AutoModelForQuestionAnswering checkpoint over them in large batches and "
        "writes each row's best answer span, with character offsets and scores, to Parquet.\n\n"
        "Exit codes: 0 done, 2 bad usage or input, 3 model or device failure, 130 interrupted "
        "(SIGINT), 143 terminated (SIGTERM). An interrupted run resumes when rerun."
    ),
)


def _version(value: bool):
    if value:
        typer.echo(f"qa-batch {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
):
    """Batch extractive question answering over Parquet tables."""


@app.command(no_args_is_help=True)
def run(
    inputs: List[str] = typer.Argument(..., metavar="INPUT...", show_default=False,
        help="Parquet files, directories of Parquet files, or globs (quote them: 'exports/*.parquet')."),
    output: Optional[str] = typer.Option(None, "-o", "--output", show_default=False,
        help="Output Parquet file. Default: <first input stem>.answers.parquet beside the first input."),
    model: Optional[str] = typer.Option(None, "--model", "-m", show_default=False,
        help=f"Hub id or local directory of a QA checkpoint with a fast tokenizer. "
             f"Default: $QA_BATCH_MODEL, else {DEFAULT_MODEL}."),
    passage_col: str = typer.Option("passage", help="Column holding the passage text."),
    question_col: str = typer.Option("question", help="Column holding the question text."),
    id_col: Optional[str] = typer.Option(None, show_default=False,
        help="Column that identifies rows, copied to the output. Default: 'id' when present, "
             "else a 'row' column with 0-based row numbers."),
    keep_columns: Optional[str] = typer.Option(None, show_default=False,
        help="Comma-separated input columns to copy to the output, e.g. 'title,source'."),
    max_seq_len: int = typer.Option(384, help="Tokens per chunk, special tokens included (at most the model's limit)."),
    doc_stride: int = typer.Option(128, help="Passage tokens shared by consecutive chunks."),
    max_answer_len: int = typer.Option(30, help="Longest answer, in tokens."),
    truncate_question: bool = typer.Option(False, "--truncate-question",
        help="Cut questions longer than --max-question-len tokens instead of answering them with an error."),
    max_question_len: int = typer.Option(64, help="Tokens a question keeps with --truncate-question."),
    top_k: int = typer.Option(1, help="Also return the N best distinct spans in an 'answers' list column (N > 1)."),
    allow_null: bool = typer.Option(False, "--allow-null/--no-allow-null",
        help="Allow 'no answer' (SQuAD 2.0-style models): null when null score - best span score > --null-threshold."),
    null_threshold: float = typer.Option(0.0, help="Margin the null score must beat the best span by (with --allow-null)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16."),
    quantize: str = typer.Option("none", help="int8: dynamic int8 linear layers, a faster CPU path "
        "(answers can differ slightly from float32; see BENCHMARKS.md)."),
    batch_size: Optional[int] = typer.Option(None, show_default=False,
        help="Most chunks per forward pass. Default: 256 on CUDA, 4 per worker on CPU."),
    max_batch_tokens: Optional[int] = typer.Option(None, show_default=False,
        help="Most padded tokens per forward pass. Default: batch size x max seq len."),
    cpu_workers: Optional[int] = typer.Option(None, show_default=False,
        help="CPU only: batches run in parallel, one thread each. Default: one per core torch uses."),
    rows_per_window: int = typer.Option(1024, help="Rows tokenized, length-sorted and merged together."),
    limit: Optional[int] = typer.Option(None, show_default=False, help="Answer only the first N rows."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    restart: bool = typer.Option(False, "--restart",
        help="Discard the finished parts of an interrupted run (<output>.partial/) instead of resuming it."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors: no progress bar, warnings or summary line."),
    report: Optional[str] = typer.Option(None, show_default=False,
        help="Write the run summary (counts, throughput, stage times) as JSON to this path."),
):
    """Answer every (passage, question) row of INPUT and write the answers to Parquet.

    Example: qa-batch run input.parquet --model ./my-squad2-model --allow-null
    """
    from pipeline.config import RunConfig, default_model
    from pipeline.engine import run as run_engine

    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="qa-batch: %(message)s")
    config = RunConfig(
        inputs=tuple(inputs), output=output, model=model or default_model(),
        passage_col=passage_col, question_col=question_col, id_col=id_col,
        keep_columns=tuple(c.strip() for c in keep_columns.split(",") if c.strip()) if keep_columns else (),
        max_seq_len=max_seq_len, doc_stride=doc_stride, max_answer_len=max_answer_len,
        truncate_question=truncate_question, max_question_len=max_question_len, top_k=top_k,
        allow_null=allow_null, null_threshold=null_threshold, device=device, dtype=dtype, quantize=quantize,
        batch_size=batch_size, max_batch_tokens=max_batch_tokens, rows_per_window=rows_per_window, cpu_workers=cpu_workers,
        limit=limit, overwrite=overwrite, restart=restart, quiet=quiet, report=report,
    )
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        # First signal: stop after the batches in flight, keeping finished parts.
        # Second: leave at once; the parts on disk are whole, so a rerun still resumes.
        received.append(signum)
        if len(received) > 1:
            os._exit(_exit_code(signum))
        typer.echo(f"qa-batch: {signal.Signals(signum).name}: finishing the batches in flight "
                   "(send it again to stop at once)", err=True)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    resume_hint = "rerun the same command to resume, or add --restart to start over"
    try:
        summary = run_engine(config, stop_requested=stop)
    except Interrupted as e:
        typer.echo(f"qa-batch: interrupted after {e.rows_done} rows; finished parts are in {e.work_dir}: "
                   f"{resume_hint}", err=True)
        raise typer.Exit(_exit_code(received[0] if received else signal.SIGINT))
    except QaBatchError as e:
        typer.echo(f"qa-batch: error: {e.message}", err=True)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo(f"qa-batch: interrupted; {resume_hint}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.resumed_from_row and not quiet:
        typer.echo(f"qa-batch: resumed after row {summary.resumed_from_row} of an interrupted run", err=True)
    if not quiet:
        typer.echo(summary.line(), err=True)


def _exit_code(signum: int) -> int:
    return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
