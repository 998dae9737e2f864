"""The `qa-batch` command. It parses options into a RunConfig and calls the engine; no logic lives here."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import threading
import tomllib
from typing import List, Optional

import typer

from pipeline import __version__
from pipeline.config import DEFAULT_MODEL
from pipeline.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Interrupted, QaBatchError
from pipeline.wording import plural

# Help texts and docstrings are rich markup: a literal [ is written \\[ ([ray] would be taken for a
# tag and vanish), and each paragraph after a docstring's first is one line (rich keeps line breaks).
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
        help="Output Parquet file (with --engine ray, a folder). Default: <first input stem>.answers.parquet beside the first input (beside a folder or the folder a glob reads, never inside it).", rich_help_panel="Input and output"),
    model: Optional[str] = typer.Option(None, "--model", "-m", show_default=False,
        help=f"Hub id or local directory of a QA checkpoint with a fast tokenizer. "
             f"Default: $QA_BATCH_MODEL, else {DEFAULT_MODEL}.", rich_help_panel="Model and device"),
    passage_col: str = typer.Option("passage", help="Column holding the passage text.", rich_help_panel="Input and output"),
    question_col: str = typer.Option("question", help="Column holding the question text.", rich_help_panel="Input and output"),
    id_col: Optional[str] = typer.Option(None, show_default=False,
        help="Column that identifies rows, copied to the output. Default: 'id' when present, "
             "else a 'row' column with 0-based row numbers.", rich_help_panel="Input and output"),
    keep_columns: Optional[str] = typer.Option(None, show_default=False,
        help="Comma-separated input columns to copy to the output, e.g. 'title,source'.", rich_help_panel="Input and output"),
    questions: Optional[str] = typer.Option(None, "--questions", show_default=False, rich_help_panel="Questions",
        help="Ask every question of this file of every row's passage (the input then needs no question column): "
             "a .txt file, one question a line, or a .csv or .parquet table with a 'question' column and an "
             "optional 'field' column naming each. One output row per input row and question."),
    question: Optional[List[str]] = typer.Option(None, "--question", show_default=False, rich_help_panel="Questions",
        help="A question to ask of every row's passage, as --questions does; repeat it for several."),
    wide: bool = typer.Option(False, "--wide", rich_help_panel="Questions",
        help="With --questions or --question: one output row per input row, with a group of columns per "
             "question named by its field (else q0, q1, ...): <field>, <field>_start, <field>_score, ..."),
    document_col: Optional[str] = typer.Option(None, "--document-col", show_default=False, rich_help_panel="Documents",
        help="Rows that share this column's value are one document (pages, clauses, paragraphs): each question "
             "is answered once per document, by the best span of all its passages (chunks never cross passages). "
             "One output row per (document, question), in order of first appearance, with the answering passage "
             "('passage': the --id-col value or row number) and a confidence over every candidate of the document."),
    across_rows: bool = typer.Option(False, "--across-rows", rich_help_panel="Documents",
        help="The whole table is one document: each question answered over every row (with --top-k N the N best "
             "answers across the table, each naming its row). One output row per question."),
    max_seq_len: int = typer.Option(384, help="Tokens per chunk, special tokens included (at most the model's limit).", rich_help_panel="Answers"),
    doc_stride: int = typer.Option(128, help="Passage tokens shared by consecutive chunks.", rich_help_panel="Answers"),
    max_answer_len: int = typer.Option(30, help="Longest answer, in tokens.", rich_help_panel="Answers"),
    truncate_question: bool = typer.Option(False, "--truncate-question",
        help="Cut questions longer than --max-question-len tokens instead of answering them with an error.", rich_help_panel="Answers"),
    max_question_len: int = typer.Option(64, help="Tokens a question keeps with --truncate-question.", rich_help_panel="Answers"),
    top_k: int = typer.Option(1, help="Also return the N best distinct spans in an 'answers' list column (N > 1).", rich_help_panel="Answers"),
    allow_null: bool = typer.Option(False, "--allow-null/--no-allow-null",
        help="Allow 'no answer' (SQuAD 2.0-style models): null when null score - best span score > --null-threshold.", rich_help_panel="Answers"),
    null_threshold: float = typer.Option(0.0, help="Margin the null score must beat the best span by (with --allow-null).", rich_help_panel="Answers"),
    calibration: Optional[str] = typer.Option(None, "--calibration", show_default=False, rich_help_panel="Answers",
        help="A calibration fitted on labelled rows (qa-batch eval --fit-calibration): its null bias decides null "
             "answers (as --allow-null --null-threshold BIAS) and confidence becomes the calibrated probability "
             "that the answer is right; score and null_score stay raw. One fitted for another model or other "
             "options (lengths, dtype, quantize) is refused (exit 2)."),
    force_calibration: bool = typer.Option(False, "--force-calibration", rich_help_panel="Answers",
        help="Apply --calibration even if it was fitted for another model or other options."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N. auto and cuda use "
                               "every visible GPU, one worker process each.", rich_help_panel="Model and device"),
    devices: Optional[str] = typer.Option(None, show_default=False, rich_help_panel="Model and device",
        help="Comma-separated devices, one worker process each, e.g. cuda:0,cuda:2 (or cpu,cpu). "
             "Same output as one device."),
    dtype: str = typer.Option("auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16 "
                              "(on CPUs with AMX 1.4-3.1x float32, 98% of its answers; BENCHMARKS.md).", rich_help_panel="Model and device"),
    quantize: str = typer.Option("none", help="int8: ONNX Runtime's dynamic int8 on the CPU (whatever --backend says; "
        "1.3-1.5x float32's speed). Answers differ from float32: on a trained MiniLM 18% of SQuAD paragraph answers "
        "changed, F1 within 1.0; see BENCHMARKS.md, Answer quality.",
        rich_help_panel="Model and device"),
    backend: str = typer.Option("torch", help="torch; onnxruntime or openvino: the model exported once to ONNX "
        "(cached in $QA_BATCH_CACHE/onnx, default ~/.cache/qa-batch/onnx) and run on the CPU by ONNX Runtime or "
        "OpenVINO (float32 with PyTorch's answers; openvino also --dtype bfloat16); auto: the backend measured "
        "fastest for the options on this device (openvino for --dtype bfloat16 on a CPU where it is installed, "
        "else torch: no exported backend beat PyTorch float32 on both long documents and paragraphs). "
        "pip install -e '.\\[onnxruntime]' or '.\\[openvino]' in a checkout.",
        rich_help_panel="Model and device"),
    batch_size: Optional[int] = typer.Option(None, show_default=False,
        help="Most chunks per forward pass. Default: 256 on CUDA, 4 per worker on CPU.", rich_help_panel="Throughput"),
    max_batch_tokens: Optional[int] = typer.Option(None, show_default=False,
        help="Most padded tokens per forward pass. Default: batch size x max seq len.", rich_help_panel="Throughput"),
    cpu_workers: Optional[int] = typer.Option(None, show_default=False,
        help="CPU only: batches run in parallel, one thread each. Default: one per core torch uses. With --engine ray: "
             "the number of CPU actors. Default: as many as the cluster holds.", rich_help_panel="Throughput"),
    rows_per_window: int = typer.Option(1024, help="Rows tokenized, length-sorted and merged together.", rich_help_panel="Throughput"),
    limit: Optional[int] = typer.Option(None, show_default=False, help="Answer only the first N rows.", rich_help_panel="Input and output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file.", rich_help_panel="Input and output"),
    table_format: str = typer.Option("parquet", "--table-format", rich_help_panel="Tables",
        help="parquet (a file); delta: -o names a Delta Lake table (a folder or URI); iceberg: -o names "
             "NAMESPACE.TABLE in the pyiceberg catalog --catalog. The table is created by the first run, and a run's "
             "answers become its data file in one commit: appended, or with --partition replacing that partition "
             "(pip install 'qa-batch\\[delta]' or 'qa-batch\\[iceberg]')."),
    catalog: str = typer.Option("default", "--catalog", rich_help_panel="Tables",
        help="With --table-format iceberg: the catalog's name, configured as pyiceberg users do (~/.pyiceberg.yaml, "
             "or PYICEBERG_CATALOG__<NAME>__URI and __WAREHOUSE), e.g. a SQL catalog on SQLite, REST, Glue, Hive."),
    partition: Optional[List[str]] = typer.Option(None, "--partition", show_default=False, rich_help_panel="Tables",
        help="KEY=VALUE, repeatable (e.g. date=2026-12-01): the table partition this run writes; a rerun of the "
             "same partition replaces it, so each night's answers are in the table once."),
    schema_mode: str = typer.Option("error", "--schema-mode", rich_help_panel="Tables",
        help="error: a run whose output columns differ from the table's is refused (exit 2, naming the "
             "difference); merge: new columns are added to the table."),
    lineage: bool = typer.Option(False, "--lineage", rich_help_panel="Tables",
        help="Emit OpenLineage run events (START, then COMPLETE, FAIL or ABORT) naming the inputs and the output, "
             "through the client as configured by OPENLINEAGE_URL, openlineage.yml or OPENLINEAGE__TRANSPORT__* "
             "(pip install 'qa-batch\\[lineage]')."),
    restart: bool = typer.Option(False, "--restart",
        help="Discard the finished parts of an interrupted run (<output>.partial/) instead of resuming it.", rich_help_panel="Input and output"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors: no progress bar, warnings or summary line.", rich_help_panel="Running"),
    engine: str = typer.Option("local", help="local, or ray: Ray Data actors (pip install -e '.\\[ray]' in a checkout); "
                               "the output is then a directory of Parquet files.", rich_help_panel="Cluster"),
    ray_address: Optional[str] = typer.Option(None, show_default=False, rich_help_panel="Cluster",
        help="Ray cluster to join (e.g. auto); default: start a local Ray instance."),
    num_gpus: str = typer.Option("auto", rich_help_panel="Cluster",
        help="With --engine ray: GPU actors, one GPU each: auto (one per GPU of the cluster, and more as GPU "
             "nodes join; CPU actors when it has none), N, or 0 for CPU actors."),
    num_cpus_per_worker: Optional[float] = typer.Option(None, show_default=False, rich_help_panel="Cluster",
        help="With --engine ray: CPUs per actor; a CPU actor runs that many worker threads, one batch each. "
             "Default: 1 with GPUs; without, the smallest node's cores, at most 4."),
    rows_per_batch: Optional[int] = typer.Option(None, show_default=False, rich_help_panel="Cluster",
        help="With --engine ray: rows per actor task, in whole --rows-per-window windows, and per output "
             "file. Default: about four tasks per actor."),
    log_format: str = typer.Option("text", help="text, or json: one JSON object per line (time, level, event, "
                                   "counts) for log collectors.", rich_help_panel="Running"),
    config_file: Optional[str] = typer.Option(None, "--config", show_default=False, is_eager=True,
        callback=lambda ctx, param, value: _load_config(ctx, value),
        help="TOML file with any of these options (keys as the option names, e.g. max-seq-len = 256, "
             "inputs = [...]); flags given here override it.", rich_help_panel="Running"),
    report: Optional[str] = typer.Option(None, show_default=False,
        help="Write the run summary (counts, throughput, stage times) as JSON to this path.", rich_help_panel="Running"),
):
    """Answer every (passage, question) row of INPUT and write the answers to Parquet.

    Example: qa-batch run input.parquet --model ./my-squad2-model --allow-null

    Or ask the same questions of every passage: qa-batch run contracts.parquet --questions fields.csv --wide

    Or of every document stored as a row per page: qa-batch run pages.parquet --document-col doc_id --questions fields.csv
    """
    from pipeline.config import RunConfig, default_model
    from pipeline.engines.lineage import observed
    from pipeline.engines.local import run as run_engine

    log = EventLog(log_format, quiet)
    config = RunConfig(
        inputs=tuple(inputs), output=output, model=model or default_model(),
        passage_col=passage_col, question_col=question_col, id_col=id_col,
        keep_columns=tuple(c.strip() for c in keep_columns.split(",") if c.strip()) if keep_columns else (),
        questions=questions, question=tuple(question or ()), wide=wide,
        document_col=document_col, across_rows=across_rows, max_seq_len=max_seq_len, doc_stride=doc_stride, max_answer_len=max_answer_len,
        truncate_question=truncate_question, max_question_len=max_question_len, top_k=top_k,
        allow_null=allow_null, null_threshold=null_threshold, device=device, dtype=dtype, quantize=quantize, backend=backend,
        devices=tuple(d.strip() for d in devices.split(",") if d.strip()) if devices else (),
        batch_size=batch_size, max_batch_tokens=max_batch_tokens, rows_per_window=rows_per_window, cpu_workers=cpu_workers,
        limit=limit, overwrite=overwrite, restart=restart, quiet=quiet, report=report,
        engine=engine, ray_address=ray_address, num_gpus=_gpus(num_gpus), num_cpus_per_worker=num_cpus_per_worker,
        rows_per_batch=rows_per_batch, calibration=calibration, force_calibration=force_calibration,
        table_format=table_format, partition=tuple(partition or ()), schema_mode=schema_mode, lineage=lineage,
        catalog=catalog,
    )
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        # First signal: stop after the batches in flight, keeping finished parts.
        # Second: leave at once; the parts on disk are whole, so a rerun still resumes.
        received.append(signum)
        if len(received) > 1:
            os._exit(_exit_code(signum))
        doing = "cancelling the Ray job, keeping its finished shards" if engine == "ray" else \
            "finishing the batches in flight"
        if backend != "torch" or quantize != "none":  # an export takes seconds and is kept whole or not at all
            doing += " (an ONNX export under way is finished first, then kept in the cache)"
        log.say("signal", f"{signal.Signals(signum).name}: {doing} (send it again to stop at once)",
                level="warning", signal=signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    resume_hint = "rerun the same command to resume, or add --restart to start over"
    log.say("run_started", f"answering {', '.join(config.inputs)} with {config.model}", level="info",
            inputs=list(config.inputs), model=config.model)
    try:
        if engine == "ray":
            from pipeline.engines.ray_engine import run_ray

            summary = observed(config, lambda: run_ray(
                config, stop_requested=stop, on_plan=lambda plan: log.say("ray_plan", plan.line(), **plan.as_dict())))
        elif engine == "local":
            summary = observed(config, lambda: run_engine(config, stop_requested=stop))
        else:
            raise typer.BadParameter(f"{engine!r}: choose local or ray", param_hint="--engine")
    except Interrupted as e:
        code = _exit_code(received[0] if received else signal.SIGINT)
        log.say("interrupted", f"interrupted after {e.done}; finished parts are in {e.work_dir}: "
                f"{resume_hint}", level="error", rows_done=e.done.answers, work_dir=e.work_dir, exit_code=code)
        raise typer.Exit(code)
    except QaBatchError as e:
        log.say("error", f"error: {e.message}", level="error", exit_code=e.exit_code)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        log.say("interrupted", f"interrupted; {resume_hint}", level="error", exit_code=EXIT_INTERRUPTED)
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.resumed_from_row:
        before = summary.resumed_from_row
        log.say("resumed", f"resumed an interrupted run: {plural(before, summary.unit)} "
                f"{'was' if before == 1 else 'were'} {summary.earlier_verb} before, {summary.rows_this_run} now",
                resumed_from_row=summary.resumed_from_row)
    log.say("run_finished", summary.line().removeprefix("qa-batch: "), **summary.as_dict())


class EventLog:
    """Messages on stderr: 'qa-batch: ...' lines, or JSON lines for log collectors."""

    def __init__(self, fmt: str, quiet: bool):
        if fmt not in ("text", "json"):
            raise typer.BadParameter(f"{fmt!r}: choose text or json", param_hint="--log-format")
        self.json, self.quiet = fmt == "json", quiet
        handler = logging.StreamHandler()
        handler.setFormatter(_JsonFormatter() if self.json else logging.Formatter("qa-batch: %(message)s"))
        logger = logging.getLogger("qa_batch")
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.ERROR if quiet else logging.WARNING)

    def say(self, event: str, message: str, level: str = "info", **fields) -> None:
        if self.quiet and level != "error":
            return
        if self.json:
            typer.echo(json.dumps({"time": _now(), "level": level, "event": event, "message": message, **fields},
                                  default=str), err=True)
        elif event != "run_started":
            typer.echo(f"qa-batch: {message}", err=True)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": _now(), "level": record.levelname.lower(), "event": "log",
                           "message": record.getMessage()})


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


@contextlib.contextmanager
def _errors_exit():
    """For the tools: a QaBatchError becomes its message on stderr and its exit code."""
    try:
        yield
    except QaBatchError as e:
        typer.echo(f"qa-batch: error: {e.message}", err=True)
        raise typer.Exit(e.exit_code)


def _load_config(ctx: typer.Context, path: Optional[str]) -> Optional[str]:
    """Options from a TOML file become the command's defaults, so flags still override them."""
    if not path:
        return path
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise typer.BadParameter(f"cannot read {path}: {e.strerror}", param_hint="--config") from None
    except tomllib.TOMLDecodeError as e:
        raise typer.BadParameter(f"{path} is not valid TOML: {e}", param_hint="--config") from None
    params = {p.name: p for p in ctx.command.params if p.name not in ("config_file", "help")}
    defaults = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in params:
            raise typer.BadParameter(f"unknown key {key!r} in {path}; known keys: "
                                     f"{', '.join(sorted(n.replace('_', '-') for n in params))}",
                                     param_hint="--config")
        if name == "keep_columns" and isinstance(value, list):
            value = ",".join(value)
        if name == "inputs" and isinstance(value, str):
            value = [value]
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


@app.command()
def convert(
    squad_json: str = typer.Argument(..., metavar="SQUAD_JSON", help="A SQuAD v1.1 or v2.0 JSON file."),
    output: str = typer.Option(..., "-o", "--output", help="The Parquet table to write."),
    join_article: bool = typer.Option(False, "--join-article",
        help="Ask each question of its whole article (paragraphs joined by a blank line): long passages."),
):
    """Turn SQuAD JSON into a qa-batch input table with gold answers (for qa-batch eval).

    Columns: id, title, question, passage, answers (list of strings), answer_starts, is_impossible.
    """
    from pipeline.quality.squad import convert as do_convert

    with _errors_exit():
        n = do_convert(squad_json, output, join_article)
    typer.echo(f"qa-batch: wrote {plural(n, 'question')} to {output}", err=True)


@app.command("eval")
def eval_command(
    answers: str = typer.Argument(..., help="qa-batch output (answers.parquet)."),
    gold: str = typer.Argument(..., help="Table with the id column and the gold answers (a list of strings; "
                               "empty for unanswerable), e.g. from qa-batch convert, or data/sample.parquet."),
    id_col: str = typer.Option("id", help="Column that matches rows of the two tables."),
    gold_col: str = typer.Option("answers", help="Column of GOLD holding the gold answers."),
    json_path: Optional[str] = typer.Option(None, "--json", show_default=False, help="Also write the figures as JSON."),
    plot_path: Optional[str] = typer.Option(None, "--plot", show_default=False,
        help="Draw F1/EM against the null threshold and a reliability diagram of confidence to this PNG, "
             "before and after --calibration (needs matplotlib)."),
    fit_calibration: Optional[str] = typer.Option(None, "--fit-calibration", show_default=False,
        help="Fit a calibration on these labelled rows and write it to this JSON file, for qa-batch run "
             "--calibration: a null bias (the best F1 --null-threshold) and a logistic calibrator that turns "
             "confidence into the probability that the answer is right. Answer the rows without --allow-null "
             "or with --top-k 2, so that every row keeps its best span."),
    calibration: Optional[str] = typer.Option(None, "--calibration", show_default=False,
        help="Also report F1, ECE and Brier with this calibration applied to the answers (before and after)."),
):
    """Exact match and F1 (official SQuAD normalisation) of answers against gold answers.

    For SQuAD 2.0-style data it also finds the --null-threshold that maximises EM and F1, from each row's null margin (null_score - score). It reports how well confidence predicts a right answer (F1 >= 0.5, or null for an unanswerable question): expected calibration error over 10 equal-width bins (ECE: the average gap between confidence and the share of right answers) and Brier score. Rows missing from either table are counted.
    """
    from pipeline import storage
    from pipeline.quality import calibrate
    from pipeline.quality.evaluate import apply_calibration, evaluate, fit_calibration as fit, plot

    with _errors_exit():
        if fit_calibration and calibration:
            from pipeline.errors import UsageError

            raise UsageError(f"--fit-calibration {fit_calibration} and --calibration {calibration}: give one "
                             "(the first fits a new calibration on these rows and reports it; the second reports "
                             "an existing one)")
        report = evaluate(answers, gold, id_col, gold_col)
        fitted = fit(report, answers, gold) if fit_calibration else None
        if fitted:
            storage.write_bytes(fit_calibration, fitted.to_json().encode())
        if calibration or fitted:
            apply_calibration(report, fitted or calibrate.load(calibration), calibration or fit_calibration,
                              answers)
        if plot_path:
            plot(report, plot_path)
    r = report
    lines = [f"rows evaluated {r.rows_matched} (missing from answers: {r.missing_in_answers}, "
             f"missing from gold: {r.missing_in_gold})",
             f"{'':12} {'rows':>6} {'EM':>8} {'F1':>8}",
             f"{'all':12} {r.rows_matched:>6} {r.exact:>8.2f} {r.f1:>8.2f}"]
    for name, part in (("has answer", r.has_answer), ("no answer", r.no_answer)):
        if part["rows"]:
            lines.append(f"{name:12} {part['rows']:>6} {part['exact']:>8.2f} {part['f1']:>8.2f}")
    if r.best_f1 is not None:
        lines.append(f"best EM {r.best_exact:.2f} at --null-threshold {r.best_exact_threshold:.3f}; "
                     f"best F1 {r.best_f1:.2f} at --null-threshold {r.best_f1_threshold:.3f}")
    if r.threshold_note:
        lines.append(f"note: {r.threshold_note}")
    if r.ece is not None:
        lines.append(f"confidence: ECE {r.ece:.3f} (10 bins), Brier {r.brier:.3f}; "
                     "right = F1 >= 0.5, or null when unanswerable")
    if r.calibration:
        c, b, a = r.calibration, r.calibration["before"], r.calibration["after"]
        bias = "none" if c["null_bias"] is None else f"{c['null_bias']:.3f}"
        def auc(m: dict) -> str:
            return "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"

        kind = f", {c['calibrator']} calibrator" if c.get("calibrator") else ""
        lines.append(f"{'fitted' if fitted else 'with'} calibration {c['path']} (null bias {bias}{kind}) on "
                     f"{plural(c['rows'], 'row')}: F1 {b['f1']:.2f} -> {a['f1']:.2f}, ECE {b['ece']:.3f} -> "
                     f"{a['ece']:.3f}, Brier {b['brier']:.3f} -> {a['brier']:.3f}, AUC {auc(b)} -> {auc(a)}")
        for level, kept in a.get("levels", {}).items():
            right = "none kept" if kept["right"] is None else f"{100 * kept['right']:.0f}% of them right"
            lines.append(f"  calibrated confidence >= {level}: {100 * kept['kept']:.0f}% of rows, {right}")
        lines += [f"note: the calibration was fitted for another run: {m}" for m in c["mismatches"]]
        lines += [f"warning: {w}" for w in c.get("warnings", [])]
        if c.get("already_calibrated"):
            lines.append(f"note: these answers were made with a calibration ({c['already_calibrated']}): 'before' "
                         "is that calibration's confidence, not the raw softmax share; to compare with the raw "
                         "share, evaluate answers made without --calibration")
    typer.echo("\n".join(lines))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report.as_dict(), f, indent=2)


@app.command()
def summary(
    answers: str = typer.Argument(..., help="qa-batch output (answers.parquet)."),
    by: Optional[str] = typer.Option(None, show_default=False,
        help="Group by this column (e.g. question), rarely answered groups first."),
    top: int = typer.Option(20, help="Groups to show."),
    json_path: Optional[str] = typer.Option(None, "--json", show_default=False, help="Also write it as JSON."),
):
    """Rows, answers, nulls, errors by reason and confidence of a run's output."""
    from pipeline.quality.summary import render, summarize

    with _errors_exit():
        s = summarize(answers, by, top)
    typer.echo(render(s))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(s, f, indent=2, default=str)


def _gpus(value: str) -> Optional[int]:
    """--num-gpus: auto (None) or a count."""
    if value.strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give auto or a number of GPUs", param_hint="--num-gpus") from None


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
