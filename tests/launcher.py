"""Run the CLI as a process of its own, without paying its imports every time.

A CLI run on a tiny model spends about five of its six seconds importing torch, transformers
and the BERT model code. The lifecycle machine makes thousands of runs, so it launches them
from a fork server: one process that has imported those libraries (and run nothing with them:
no torch thread pool, no tokenizer, no Ray yet) forks a child per run. The child is an
ordinary process of its own: it gets the run's arguments, environment and working directory,
imports qa-batch's own code afresh (so everything qa-batch reads from the environment at
import, such as the crash points of `pipeline.faults`, is read as under `python -m jobs.cli`),
runs `jobs.cli` as `__main__`, and ends as the interpreter does (non-daemon threads joined,
exit handlers run, streams flushed, the exit code of `SystemExit`, a traceback and 1 for an
uncaught exception), short of the module teardown, which crashes in a forked child of torch.
Its pid is the test's to signal. Only the libraries below are imported before the fork, with
the same base environment the runs get.

`tests/test_lifecycle.py::test_the_fork_server_runs_the_cli_as_python_does` holds it to a
plain `python -m jobs.cli` (`Exec`) on a finished run, a refusal, a crash point, a SIGTERM and
a usage error.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys

PRELOAD = ("numpy", "pyarrow", "pyarrow.parquet", "pyarrow.dataset", "polars", "typer", "tqdm", "tokenizers",
           "torch", "transformers", "transformers.models.bert.modeling_bert", "onnxruntime", "onnx")

SERVER = r"""
import importlib, json, os, signal, sys
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
request_in, reply_out = sys.stdin, sys.stdout
print(json.dumps({"ready": os.getpid()}), file=reply_out, flush=True)
child = None
for line in request_in:
    req = json.loads(line)
    if req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        print(json.dumps({"status": status}), file=reply_out, flush=True)
        continue
    pid = os.fork()
    if pid:
        print(json.dumps({"pid": pid}), file=reply_out, flush=True)
        continue
    # the child: a process as `python -m jobs.cli ARGS` would start it, libraries already imported
    child = req
    break
if child is None:
    sys.exit(0)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.dup2(os.open(child["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
os.dup2(os.open(child["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
sys.stdin = open(0, closefd=False)
sys.stdout = open(1, "w", buffering=1, closefd=False)
sys.stderr = open(2, "w", buffering=1, closefd=False)
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
os.environ.clear()
os.environ.update(child["env"])
os.chdir(child["cwd"])
sys.path[:] = [child["cwd"]] + [p for p in sys.path if p not in ("", child["cwd"])]
for name in [m for m in sys.modules if m == "pipeline" or m.startswith(("pipeline.", "jobs"))]:
    del sys.modules[name]
sys.argv = ["-m", *child["args"]]
import atexit, runpy, threading, traceback
code = 0
try:
    runpy.run_module("jobs.cli", run_name="__main__", alter_sys=True)
except SystemExit as e:  # as the interpreter reports it
    if e.code is None or isinstance(e.code, int):
        code = e.code or 0
    else:
        print(e.code, file=sys.stderr)
        code = 1
except KeyboardInterrupt:
    traceback.print_exc()
    code = -signal.SIGINT
except BaseException:
    traceback.print_exc()
    code = 1
# the interpreter's own exit, up to its module teardown (which crashes in a forked child of torch):
# wait for non-daemon threads, run the exit handlers, flush
threading._shutdown()
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
if code == -signal.SIGINT:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
os._exit(code & 0xFF)
"""


class ForkServer:
    """Start runs of `python -m jobs.cli` from one pre-imported process (see the module docstring)."""

    def __init__(self, env: dict, cwd: str, preload=PRELOAD):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(list(preload))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd, env=env)
        self.read()  # ready
        atexit.register(self.close)

    def read(self, timeout: float | None = None) -> dict:
        if timeout is not None and not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self.proc.poll()})")
        return json.loads(line)

    def send(self, request: dict) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def start(self, args: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> int:
        """Fork a run; its pid (send it signals as to any process)."""
        self.send({"op": "run", "args": list(map(str, args)), "env": env, "cwd": cwd, "stdout": stdout,
                   "stderr": stderr})
        return self.read()["pid"]

    def wait(self, pid: int, timeout: float) -> int:
        """The run's exit code as subprocess reports it (-N: killed by signal N); past the
        timeout the run is killed and TimeoutError raised."""
        self.send({"op": "wait", "pid": pid})
        try:
            status = self.read(timeout)["status"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self.read()
            raise
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


class Run:
    """One launched run: `pid`, `poll()`, `finish()` -> subprocess.CompletedProcess."""

    def __init__(self, server: ForkServer, args: list[str], env: dict, cwd: str, folder: str):
        self.server, self.args = server, ["-m", "jobs.cli", *map(str, args)]
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.out, self.err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        self.pid = server.start(list(map(str, args)), env, cwd, self.out, self.err)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code once the run has ended (without reaping it: `finish` does)."""
        if self.returncode is not None:
            return self.returncode
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "Z"
        return 0 if state == "Z" else None  # ended: the code itself comes from finish()

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def finish(self, timeout: float = 600) -> subprocess.CompletedProcess:
        self.returncode = self.server.wait(self.pid, timeout)
        with open(self.out) as o, open(self.err) as e:
            done = subprocess.CompletedProcess(self.args, self.returncode, o.read(), e.read())
        shutil.rmtree(self.folder, ignore_errors=True)
        return done


class Exec:
    """The same interface over a plain `python -m jobs.cli` process (the Ray machine's runs: their
    time goes to Ray's workers, and the driver's Ray client is best left a process of its own)."""

    def __init__(self, args: list[str], env: dict, cwd: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 600) -> subprocess.CompletedProcess:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
