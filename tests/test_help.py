"""`--help` as a user sees it: rendered by the installed typer and rich, read from a subprocess.

COLUMNS is very wide so that no help text wraps and each one can be looked for on one line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import typer

from jobs.cli import app

COMMANDS = ("run", "convert", "eval", "summary")


def rendered_help(*args: str) -> list[str]:
    exe = shutil.which("qa-batch", path=os.path.dirname(sys.executable))
    assert exe, "the qa-batch console script is installed"
    r = subprocess.run([exe, *args, "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "3000", "NO_COLOR": "1"})
    assert r.returncode == 0, r.stderr
    return [" ".join(line.split()) for line in r.stdout.splitlines()]  # spaces collapsed, line by line


def on_one_line(text: str, lines: list[str]) -> bool:
    return any(text in line for line in lines)


def written(text: str) -> str:
    """What a help text or docstring should show: its words, markup escapes removed."""
    return " ".join(text.replace("\\[", "[").split())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_text_and_paragraph_is_shown_whole(command):
    """Nothing eaten by rich markup ([ray], [...]) and no paragraph broken over lines."""
    lines = rendered_help(command)
    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        if getattr(param, "help", None) and param.name != "help":
            assert on_one_line(written(param.help), lines), (param.name, written(param.help))
    for paragraph in click_command.help.split("\n\n"):
        assert on_one_line(written(paragraph), lines), paragraph


def test_brackets_in_help_survive():
    lines = rendered_help("run")
    assert on_one_line("Ray Data actors (pip install -e '.[ray]' in a checkout)", lines)
    assert on_one_line("inputs = [...]", lines)
    assert on_one_line("(<output>.partial/)", lines)


def test_help_looks_as_in_typers_docs():
    """Types in capitals (TEXT, INTEGER, FLOAT), none after a flag or --help, INPUT... in the usage line."""
    lines = rendered_help("run")
    text = "\n".join(lines)
    assert "Usage: qa-batch run [OPTIONS] INPUT..." in lines
    assert not re.search(r"<(str|int|float|bool|list\[str\])>", text), "typer 0.27+ type labels"
    assert "{INPUT" not in text
    assert on_one_line("│ --help Show this message and exit. │", lines)
    assert on_one_line("│ --overwrite Replace an existing output file. │", lines)
    assert on_one_line("│ --allow-null --no-allow-null Allow 'no answer'", lines)
    assert on_one_line("│ --max-seq-len INTEGER Tokens per chunk", lines)
    assert on_one_line("│ --null-threshold FLOAT Margin the null score", lines)
    assert on_one_line("│ --output -o TEXT Output Parquet file (with --engine ray, a", lines)
    assert on_one_line("│ * INPUT... TEXT Parquet files, directories of Parquet files", lines)
    top = rendered_help()
    assert "Usage: qa-batch [OPTIONS] COMMAND [ARGS]..." in top
    assert on_one_line("│ --version Print the version and exit. │", top)
