"""The job's lifecycle as a model (issue 20): hypothesis drives the real CLI, as a subprocess,
through generated sequences of runs, kills, changed inputs, retrained models and reruns, and
after every step checks the contract README's "What a rerun does" states:

- the exit code is a documented one, and the one the contract table gives for the situation
  (this test's own bookkeeping of which job owns the output and the work directory, not the
  code's);
- exit 0: the output equals a fresh, uninterrupted run of exactly that command (rows, answers,
  schema, model and options in the metadata), never another job's output; a rerun of an
  interrupted job answers only the rows its parts lacked; no work directory is left;
- nothing the user owns changes: the inputs, other files, an earlier output without --overwrite;
- every path a message names exists; the report's counts equal the output's.

CI runs a fixed set of examples (a few minutes); `--hypothesis-profile=long` runs many more.
The local engine runs every example, the Ray engine (a local Ray instance) a smaller set.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, SAMPLE, assert_same_answers
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test
from launcher import Exec, ForkServer, Run
from tiny_models import make_checkpoint

from pipeline.stages.questions import QuestionList
from pipeline.stages.wide import to_long
from pipeline.stages.write import read_metadata

EXIT_CODES = {0, 2, 3, 130, 143}  # README: Exit codes
KILLED = -signal.SIGKILL
ALWAYS_REFUSED = ("inside the input directory", "names a folder")  # whatever else the command says
FAST = ["--max-seq-len", "48", "--doc-stride", "16", "--rows-per-window", "2"]  # several windows, parts, batches
# crash points of the local engine and of the Ray driver (faults.point), by where they fall
LOCAL_POINTS = ["read:2", "batch:3", "part_written:1", "part_written:3", "assembling:2", "renaming:1",
                "cleaning_up:1"]
RAY_POINTS = ["ray_shard_done:1", "published:1", "replaced:1"]
QUESTIONS = ("who ruled?", "when was it?")

PASSAGE_CHARS = 2000  # long enough for rows of many chunks, batches and parts; short enough for 1,000 examples
_base_model: dict[str, str] = {}
REACHED: collections.Counter = collections.Counter()  # (engine, stop, exit code, refusal) -> runs


def sample_rows() -> pa.Table:
    """The sample's rows, passages cut to PASSAGE_CHARS (its long articles are 25,000 characters)."""
    import pyarrow.compute as pc

    table = pq.read_table(SAMPLE).select(["id", "passage", "question", "title"])
    return table.set_column(1, "passage", pc.utf8_slice_codeunits(table["passage"], 0, PASSAGE_CHARS))


def base_model() -> str:
    """One tiny BERT per test session, copied into each example (retraining changes the copy)."""
    if "dir" not in _base_model:
        _base_model["dir"] = make_checkpoint(tempfile.mkdtemp(prefix="qa-life-model-") + "/bert", "bert")
    return _base_model["dir"]


def digest(path: str) -> str:
    """Content of a file or a folder (names and bytes), for 'nothing the user owns changed'."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for folder, dirs, files in sorted(os.walk(path)):
            dirs.sort()
            for name in sorted(files):
                p = os.path.join(folder, name)
                h.update(os.path.relpath(p, path).encode())
                h.update(open(p, "rb").read())
    elif os.path.exists(path):
        h.update(open(path, "rb").read())
    return h.hexdigest()


ONNX_CACHE = tempfile.mkdtemp(prefix="qa-life-cache-")  # --backend onnxruntime's exports, shared by the examples


def run_env(extra: dict | None = None) -> dict:
    """A run's environment: this process's as it is now (ray.init adds the cluster's token), offline."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "QA_BATCH_CACHE": ONNX_CACHE, **(extra or {})}


_server: list[ForkServer] = []


def launch(args: list[str], env: dict | None = None, cwd: str = ROOT, fork: bool = True) -> Run | Exec:
    """`python -m jobs.cli ARGS` as a process of its own: forked from a server that has imported
    torch and transformers once (tests/launcher.py: a run then takes about a second, not six), or
    with fork=False a plain one."""
    if not fork:
        return Exec(args, run_env(env), cwd)
    if not _server:
        _server.append(ForkServer(run_env(), ROOT))
    return Run(_server[0], args, run_env(env), cwd, tempfile.mkdtemp(prefix="qa-life-run-"))


def cli(args: list[str], env: dict | None = None, cwd: str = ROOT, fork: bool = True) -> subprocess.CompletedProcess:
    return launch(args, env, cwd, fork).finish(timeout=600)


def metadata_of(path: str) -> dict:
    """An output's qa_batch metadata: the file's, or a Ray output folder's first file's."""
    if os.path.isdir(path):
        path = os.path.join(path, sorted(n for n in os.listdir(path) if n.endswith(".parquet"))[0])
    return read_metadata(path)


def long_output(path: str) -> pa.Table:
    """An output in long form (a --wide one turned back), rows in input order (Ray's files are
    named by row range, so a folder reads in order too)."""
    table, meta = pq.read_table(path), metadata_of(path)
    if meta["options"].get("wide"):
        return to_long(table, QuestionList.from_dict(meta["questions"]))
    return table


class Lifecycle(RuleBasedStateMachine):
    """One folder per example: in/ (the inputs), model/ (a checkpoint retrained in place), q.txt,
    an unrelated file, and the outputs the runs write."""

    engine = "local"
    points = LOCAL_POINTS
    fork = True  # runs launched from the fork server (the oracle's always are)

    def __init__(self):
        super().__init__()
        self.base = tempfile.mkdtemp(prefix="qa-life-")
        self.inputs = os.path.join(self.base, "in")
        os.makedirs(self.inputs)
        self.model = os.path.join(self.base, "model")
        shutil.copytree(base_model(), self.model)
        self.model_version = 0
        with open(os.path.join(self.base, "q.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(QUESTIONS) + "\n")
        with open(os.path.join(self.base, "notes.txt"), "w") as f:
            f.write("not qa-batch's")
        self.sample = sample_rows()
        self.files = 0
        # the test's own bookkeeping, per output path: which job owns the output, and which job
        # left parts in the work directory (a job is the key of its command: inputs, model, options)
        self.output_job: dict[str, str | None] = {}
        self.work_job: dict[str, str | None] = {}
        # whether the work directory's parts are those the output was assembled from (a kill after the
        # output was in place: only the clean-up is left), not a later attempt's (an --overwrite rerun
        # of the same job, killed before it replaced the output)
        self.published: dict[str, bool] = {}
        self.oracle: dict[str, pa.Table] = {}
        self.steps: list[str] = []
        self.last: dict | None = None  # the last run's options

    def teardown(self):
        if os.environ.get("QA_LIFECYCLE_VERBOSE"):
            print(f"\n{self.engine}: {self.steps}", file=sys.stderr)
        shutil.rmtree(self.base, ignore_errors=True)

    # ------------------------------------------------------------------ the world changes

    @initialize(rows=st.sampled_from([3, 6]), kind=st.sampled_from(["plain", "plain", "default_glob", "slash"]),
                questions=st.sampled_from(["no", "long", "wide", "documents"]),
                stop=st.one_of(st.none(), st.integers(0, 6)))
    def first_run(self, rows, kind, questions, stop):
        """Every example starts with an input and a run, often killed: the rest is what follows."""
        self.add_input(rows)
        self.do_run(kind, 1, questions, None, False, False, stop)

    def add_input(self, rows: int) -> None:
        start = (self.files * 5) % (self.sample.num_rows - rows)
        pq.write_table(self.sample.slice(start, rows), os.path.join(self.inputs, f"f{self.files:02d}.parquet"))
        self.files += 1

    @rule(change=st.sampled_from(["input_added", "input_removed", "input_rewritten", "model_weights",
                                  "model_sharded", "model_tokenizer"]))
    def the_world_changes(self, change):
        """Between runs: inputs added, removed or rewritten; the model retrained in place (one file or
        shards) or its tokenizer changed, as a training job does to its output folder overnight."""
        self.steps.append(change)
        if change == "input_added":
            self.add_input(2 + self.files % 4)
        elif change == "input_removed" and len(os.listdir(self.inputs)) > 1:
            os.remove(os.path.join(self.inputs, sorted(os.listdir(self.inputs))[0]))
        elif change == "input_rewritten":
            path = os.path.join(self.inputs, sorted(os.listdir(self.inputs))[-1])
            table = pq.read_table(path)
            questions = pa.array([q + " really?" for q in table["question"].to_pylist()])
            pq.write_table(table.set_column(2, "question", questions), path)
        elif change.startswith("model_"):
            self.retrain(change.removeprefix("model_"))

    def retrain(self, how: str) -> None:
        self.model_version += 1
        if how == "tokenizer":  # the unknown token renamed everywhere it is named: another tokenizer, still whole
            # (renaming it in one place breaks WordPiece: a refusal, exit 2, that tests/test_chunk.py holds)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                path = os.path.join(self.model, name)
                text = open(path).read()
                with open(path, "w") as f:
                    f.write(re.sub(r'"\[UNK\d*\]"', f'"[UNK{self.model_version}]"', text))
            return
        import torch
        from transformers import AutoModelForQuestionAnswering

        model = AutoModelForQuestionAnswering.from_pretrained(self.model)
        with torch.no_grad():
            model.qa_outputs.bias.add_(0.5 * self.model_version)
        for name in os.listdir(self.model):
            if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".index.json")):
                os.remove(os.path.join(self.model, name))
        model.save_pretrained(self.model, max_shard_size="100KB" if how == "sharded" else "5GB")

    # ------------------------------------------------------------------ a run

    def job_key(self, options: list[str]) -> str:
        """What makes a job: the inputs' content, the model's, and the options that matter."""
        inputs = [digest(os.path.join(self.inputs, n)) for n in sorted(os.listdir(self.inputs))]
        return hashlib.sha256(json.dumps([inputs, digest(self.model), options]).encode()).hexdigest()[:12]

    def output_path(self, kind: str) -> tuple[list[str], str, str]:
        """(-o arguments, the input spec, where the output lands) for each kind of output path."""
        glob_ = os.path.join(self.inputs, "*.parquet")
        ext = "" if self.engine == "ray" else ".parquet"
        if kind == "plain":
            return ["-o", os.path.join(self.base, f"out{ext}")], self.inputs, os.path.join(self.base, f"out{ext}")
        if kind == "relative":  # relative to the working directory, which is ROOT for cli()
            path = os.path.relpath(os.path.join(self.base, f"rel{ext}"), ROOT)
            return ["-o", path], self.inputs, os.path.join(self.base, f"rel{ext}")
        if kind == "slash":
            return ["-o", os.path.join(self.base, "dir") + "/"], self.inputs, os.path.join(self.base, "dir")
        if kind == "inside_input":
            return ["-o", os.path.join(self.inputs, f"inside{ext}")], self.inputs, os.path.join(self.inputs,
                                                                                                 f"inside{ext}")
        if kind == "default_glob":
            suffix = ".answers" if self.engine == "ray" else ".answers.parquet"
            return [], glob_, self.inputs + suffix
        raise AssertionError(kind)

    def expected(self, kind: str, key: str, where: str, overwrite: bool, restart: bool) -> tuple[str | None, bool]:
        """The contract (README: What a rerun does), from this test's bookkeeping: a refusal
        (exit 2) and the words that say why, or None when the run may go ahead; and whether the
        work directory's leftovers go (those of a job that finished, when this is another)."""
        if kind == "inside_input":
            return "inside the input directory", False
        if kind == "slash" and self.engine == "local":
            return "names a folder", False
        work = self.work_job.get(where)  # the job whose parts wait in the work directory
        exists = os.path.exists(where)
        finished = self.finished(where)  # only its clean-up was cut short
        if exists and not overwrite and not finished:
            return "exists", False  # another job's output, refused before any model work
        if work is not None and not restart:
            if work == key:
                return None, False  # resume it, or finish its clean-up
            if not finished:
                return "differs", False  # an interrupted job of other options, inputs or model
        clears = finished  # the finished job's leftovers are removed, whatever follows
        if exists and not overwrite:
            return "exists", clears
        return None, clears

    # a crash point is drawn as a number, each machine's own points in turn (Ray's three got 3 draws in 40)
    stops = st.one_of(st.none(), st.none(), st.just("SIGTERM"), st.integers(0, 6))

    # Weighted towards runs that go ahead (a plain path, --overwrite): refusals come cheap, while the
    # kills, resumes and replacements they would stand in front of are what needs exercising
    @rule(kind=st.sampled_from(["plain", "plain", "plain", "relative", "slash", "inside_input", "default_glob"]),
          top_k=st.sampled_from([1, 2]), questions=st.sampled_from(["no", "long", "wide", "documents"]),
          limit=st.sampled_from([None, 5]), overwrite=st.sampled_from([True, True, False]), restart=st.booleans(),
          stop=stops,
          backend=st.sampled_from(["torch", "torch", "onnxruntime"]))
    def run(self, kind, top_k, questions, limit, overwrite, restart, stop, backend):
        self.do_run(kind, top_k, questions, limit, overwrite, restart, stop, backend)

    @precondition(lambda self: self.last is not None)
    @rule(stop=stops)
    def rerun(self, stop):
        """The same command again: what a scheduler does after a failure."""
        self.do_run(**{**self.last, "stop": stop})

    @precondition(lambda self: self.last is not None)
    @rule(change=st.sampled_from(["top_k", "questions", "limit", "overwrite", "restart", "backend"]), stop=stops)
    def rerun_changed(self, change, stop):
        """The same output path, one option changed: another job, or the same one with other flags."""
        last = dict(self.last)
        if change == "top_k":
            last["top_k"] = 3 - last["top_k"]
        elif change == "questions":
            last["questions"] = {"no": "long", "long": "wide", "wide": "documents", "documents": "no"}[last["questions"]]
        elif change == "limit":
            last["limit"] = None if last["limit"] else 5
        elif change == "backend":  # another model runtime: answers may differ in the last float32 bits
            last["backend"] = "torch" if last["backend"] == "onnxruntime" else "onnxruntime"
        else:
            last[change] = not last[change]
        self.do_run(**{**last, "stop": stop})

    def do_run(self, kind, top_k, questions, limit, overwrite, restart, stop, backend="torch"):
        previous = self.last
        self.last = dict(kind=kind, top_k=top_k, questions=questions, limit=limit, overwrite=overwrite,
                         restart=restart, backend=backend)
        if isinstance(stop, int):
            stop = self.points[stop % len(self.points)]
        options = [*FAST, "--top-k", str(top_k)]
        if questions == "documents":  # the rows of one article are one document
            options += ["--document-col", "title"]
        elif questions != "no":
            options += ["--questions", os.path.join(self.base, "q.txt")] + (["--wide"] if questions == "wide" else [])
        if limit is not None:
            options += ["--limit", str(limit)]
        if backend != "torch":  # the model exported to ONNX (once per retrained checkpoint, cached)
            options += ["--backend", backend]
        key = self.job_key(options)
        o_args, spec, where = self.output_path(kind)
        flags = (["--overwrite"] if overwrite else []) + (["--restart"] if restart else [])
        engine = ["--engine", "ray", *self.ray_args()] if self.engine == "ray" else []
        report = os.path.join(self.base, "report.json")
        if os.path.exists(report):
            os.remove(report)
        args = ["run", spec, *o_args, "--model", self.model, *options, *flags, *engine, "--report", report]
        self.steps.append(f"run({kind}, top_k={top_k}, questions={questions}, limit={limit}, backend={backend}, "
                          f"overwrite={overwrite}, restart={restart}, stop={stop})")

        owned = {p: digest(p) for p in self.user_files(where)}
        before_output = digest(where)
        refusal, clears = self.expected(kind, key, where, overwrite, restart)
        if refusal in ALWAYS_REFUSED:  # reruns repeat the last command that could run, not this one
            self.last = previous
        resumable = self.rows_in_parts(where) if (not restart and self.work_job.get(where) == key
                                                  and not self.finished(where)) else 0
        if stop == "SIGTERM":
            r = self.run_and_terminate(args, where)
        else:
            r = cli(args, env={"QA_BATCH_CRASH_AT": stop} if stop else None, fork=self.fork)
        context = f"steps {self.steps}\nexit {r.returncode}\nstderr:\n{r.stderr[-3000:]}"
        # what the examples reached: a stop that never fires tests nothing
        REACHED[(self.engine, stop, r.returncode, refusal)] += 1

        # documented exit codes only (a crash point is a SIGKILL the test itself asked for)
        assert r.returncode in EXIT_CODES | ({KILLED} if stop and stop != "SIGTERM" else set()), context
        # nothing the user owns changed, the inputs above all
        for path, d in owned.items():
            assert digest(path) == d, f"{path} changed\n{context}"
        # every path a message names exists
        for path in re.findall(r"(?:parts are in|kept in) (\S*/\S*?)[:.,)]*(?:\s|$)", r.stderr):
            assert os.path.exists(path), f"a message names {path}, which is not there\n{context}"
        if refusal is not None:
            assert r.returncode == 2 and refusal in r.stderr, f"expected a refusal ({refusal})\n{context}"
        else:
            assert r.returncode != 2, f"refused, though the contract lets it run\n{context}"
        manifest = os.path.join(self.work_dir(where), "manifest.json")
        if r.returncode in (2, 3):
            assert digest(where) == before_output, f"a refused or failed run changed the output\n{context}"
            if clears:
                self.work_job[where] = None
            if r.returncode == 3 and os.path.exists(manifest):
                self.work_job[where], self.published[where] = key, False
            assert os.path.exists(manifest) == (self.work_job.get(where) is not None), \
                f"the work directory {'went' if self.work_job.get(where) else 'appeared'}\n{context}"
            return
        if r.returncode == 0:
            self.check_finished(where, key, options, report, resumable, context)
            self.output_job[where], self.work_job[where] = key, None
            return
        # stopped (a kill or a signal): parts kept, and the output either untouched or this job's, whole
        self.work_job[where] = key if os.path.exists(manifest) else None
        self.published[where] = digest(where) != before_output
        if self.published[where]:
            assert_same_answers(long_output(where), self.fresh_run(key, options))
            self.output_job[where] = key

    def finished(self, where: str) -> bool:
        """The work directory holds the parts of the output in place: only their clean-up is left."""
        work = self.work_job.get(where)
        return work is not None and self.output_job.get(where) == work and self.published.get(where, False)

    def run_and_terminate(self, args, where: str) -> subprocess.CompletedProcess:
        """SIGTERM once the first part (or shard) is written, or the run ends first. Each window
        waits half a second before it is read (QA_BATCH_PAUSE_AT), so that a run of several
        windows is still running when its first part appears."""
        run = launch(args, env={"QA_BATCH_PAUSE_AT": "read:0.5"}, fork=self.fork)
        before = self.rows_in_parts(where)
        deadline = time.monotonic() + 120
        while run.poll() is None and time.monotonic() < deadline:
            if self.rows_in_parts(where) > before:
                run.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        return run.finish(timeout=300)

    # ------------------------------------------------------------------ checks

    def check_finished(self, where, key, options, report, resumable, context) -> None:
        assert os.path.exists(where), context
        assert not os.path.exists(self.work_dir(where)), f"a work directory was left\n{context}"
        name = os.path.basename(where)
        leftovers = {f".{name}.replaced", f".{name}.assembling.tmp"} & set(os.listdir(os.path.dirname(where)))
        assert not leftovers, f"{leftovers} left\n{context}"
        got = long_output(where)
        assert_same_answers(got, self.fresh_run(key, options))  # never another job's output
        assert metadata_of(where)["model"] == metadata_of(self.oracle_path(key))["model"], context
        with open(report) as f:
            rep = json.load(f)
        counted = rep["documents"] if "--document-col" in options else rep["rows"]
        assert counted == got.num_rows, f"the report counts {counted} output rows, the output has {got.num_rows}\n{context}"
        assert rep["rows_this_run"] + rep["resumed_from_row"] == rep["rows"] or rep["resumed_from_row"] == 0, context
        if resumable:  # a rerun of an interrupted job answers only the rows its parts lacked
            assert rep["resumed_from_row"] > 0, f"it did not resume\n{context}"
            if self.engine == "local":
                assert rep["resumed_from_row"] == resumable, context

    def fresh_run(self, key: str, options: list[str]) -> pa.Table:
        """The oracle: the same command, uninterrupted, on the local engine, into a folder of its own."""
        if key not in self.oracle:
            out = self.oracle_path(key)
            r = cli(["run", self.inputs, "-o", out, "--model", self.model, *options])
            assert r.returncode == 0, r.stderr
            self.oracle[key] = long_output(out)
        return self.oracle[key]

    def oracle_path(self, key: str) -> str:
        os.makedirs(os.path.join(self.base, ".oracle"), exist_ok=True)
        return os.path.join(self.base, ".oracle", f"{key}.parquet")

    def work_dir(self, where: str) -> str:
        return where + ".partial"

    def rows_in_parts(self, where: str) -> int:
        work = self.work_dir(where)
        if not os.path.isdir(work):
            return 0
        found = 0
        for folder, _, files in os.walk(work):
            for n in files:
                if n.startswith("part-") and n.endswith(".parquet"):
                    try:
                        found += pq.read_metadata(os.path.join(folder, n)).num_rows
                    except Exception:  # noqa: BLE001 - a part being written
                        pass
        return found

    def candidate_outputs(self) -> list[str]:
        return [self.output_path(k)[2] for k in ("plain", "relative", "slash", "default_glob")]

    def user_files(self, where: str) -> list[str]:
        """What the user owns here: the inputs, the notes, the model, every output but this run's."""
        owned = [os.path.join(self.inputs, n) for n in os.listdir(self.inputs) if n.endswith(".parquet")]
        owned += [os.path.join(self.base, "notes.txt"), os.path.join(self.base, "q.txt"), self.model]
        owned += [w for w in self.candidate_outputs() if w != where and os.path.exists(w)]
        return owned

    def ray_args(self) -> list[str]:
        return []


class RayLifecycle(Lifecycle):
    """The same model on the Ray engine: outputs are folders with _SUCCESS, the oracle stays local."""

    engine = "ray"
    points = RAY_POINTS
    # plain processes: a forked driver, cancelled by SIGTERM, once exited 1 ("the core worker has
    # already been shutdown") where no plain run has; until that is understood, Ray's runs are not forked
    fork = False
    address = ""

    def ray_args(self) -> list[str]:
        return ["--ray-address", self.address, "--cpu-workers", "1"]


def examples(ci: int, long: int) -> int:
    """A fixed set in CI; the long profile's many (`--hypothesis-profile=long`). QA_LIFECYCLE_EXAMPLES=N
    runs N instead: the long profile split over processes, each with its own --hypothesis-seed."""
    if os.environ.get("QA_LIFECYCLE_EXAMPLES"):
        return int(os.environ["QA_LIFECYCLE_EXAMPLES"])
    return long if settings.default.max_examples > 25 else ci


def run_machine(machine, max_examples: int, steps: int) -> None:
    """Run the examples; print what their runs reached (`pytest -s` shows it). With the long
    profile's many examples, every crash point and the SIGTERM must have stopped some run."""
    REACHED.clear()
    run_state_machine_as_test(machine, settings=settings(
        max_examples=max_examples, stateful_step_count=steps, deadline=None,
        derandomize=settings.default.derandomize, suppress_health_check=list(HealthCheck)))
    seen = sorted(REACHED.items(), key=lambda kv: (str(kv[0][1]), kv[0][2], str(kv[0][3])))
    print(f"\n{machine.engine}: {sum(REACHED.values())} runs in {max_examples} examples; (stop, exit, refused): runs",
          {f"{stop} {code}" + (f" {refusal}" if refusal else ""): n for (_, stop, code, refusal), n in seen},
          file=sys.stderr)
    if max_examples >= 100:
        killed = {stop for (_, stop, code, _) in REACHED if code in (KILLED, 143)}
        missed = (set(machine.points) | {"SIGTERM"}) - killed
        assert not missed, f"these stops never stopped a run: {sorted(missed)}"


@pytest.mark.slow
def test_the_local_engine_keeps_the_lifecycle_contract():
    run_machine(Lifecycle, examples(ci=40, long=1000), steps=8)


@pytest.mark.slow
def test_the_ray_engine_keeps_the_lifecycle_contract():
    pytest.importorskip("ray.data")
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        RayLifecycle.address = ray.get_runtime_context().gcs_address
        run_machine(RayLifecycle, examples(ci=6, long=100), steps=4)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_the_fork_server_runs_the_cli_as_python_does(tmp_path):
    """The machines launch their runs from a fork server (tests/launcher.py); it must not change
    what a run does. Each case runs once with `python -m jobs.cli` and once forked: a finished run,
    the refusal of an existing output, a crash point (read from the environment at import), a
    SIGTERM after the first part, and a usage error."""
    source = pq.read_table(SAMPLE).select(["id", "passage", "question", "title"]).slice(12, 6)
    pq.write_table(source, tmp_path / "in.parquet")
    model = base_model()

    def args(out: str, *more: str) -> list[str]:
        return ["run", str(tmp_path / "in.parquet"), "-o", str(tmp_path / out), "--model", model, *FAST, *more]

    def summary(text: str) -> str:  # the summary line without its timings
        return re.sub(r"[\d.]+ (s|rows/s|chunks/s)\b", "", text.strip().splitlines()[-1])

    for name in ("a", "b"):  # finished; then the same output refused
        p, f = cli(args(f"plain-{name}.parquet"), fork=False), cli(args(f"fork-{name}.parquet"))
        assert (p.returncode, f.returncode) == (0, 0), p.stderr + f.stderr
        assert summary(p.stderr).replace("plain-", "fork-") == summary(f.stderr)
    assert_same_answers(pq.read_table(tmp_path / "fork-a.parquet"), pq.read_table(tmp_path / "plain-a.parquet"))
    p, f = cli(args("plain-a.parquet"), fork=False), cli(args("fork-a.parquet"))
    assert (p.returncode, f.returncode) == (2, 2)
    assert p.stderr.replace("plain-", "fork-") == f.stderr

    crash = {"QA_BATCH_CRASH_AT": "part_written:1"}  # pipeline.faults reads it at import
    p, f = cli(args("plain-c.parquet"), crash, fork=False), cli(args("fork-c.parquet"), crash)
    assert (p.returncode, f.returncode) == (KILLED, KILLED)
    parts = {k: sorted(os.listdir(tmp_path / f"{k}-c.parquet.partial")) for k in ("plain", "fork")}
    assert parts["plain"] == parts["fork"] and parts["plain"], parts

    for way in ("plain", "fork"):  # SIGTERM once a part is written: stops after the batches in flight
        run = launch(args(f"{way}-t.parquet", "--restart"), fork=way == "fork")
        partial = tmp_path / f"{way}-t.parquet.partial"
        deadline = time.monotonic() + 120
        while run.poll() is None and time.monotonic() < deadline and not list(partial.glob("part-*.parquet")):
            time.sleep(0.02)
        run.send_signal(signal.SIGTERM)
        done = run.finish(300)
        assert done.returncode == 143, done.stderr
        assert "parts are in" in done.stderr or "kept in" in done.stderr, done.stderr

    p, f = cli(["run", "--top-k", "nine"], fork=False), cli(["run", "--top-k", "nine"])
    assert (p.returncode, f.returncode) == (2, 2) and p.stderr == f.stderr
