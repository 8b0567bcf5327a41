"""Running the `ossedge` command as a user would (a subprocess; usage errors in this process) and
checking its errors."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ossedge", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


def invoke(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`ossedge ARGS` in this process, through click's CliRunner isolation and the same entry
    point (`main`: exit codes, one-line errors) as `run` — for errors caught before anything is
    loaded (usage errors), without starting an interpreter each."""
    from click.testing import CliRunner

    from ossedge.cli.main import main

    with CliRunner().isolation(input=stdin) as (out, err, _):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return subprocess.CompletedProcess(["ossedge", *args], code, stdout, stderr)


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str, code: int = 1) -> None:
    """Exit `code`, no traceback, exactly one line on stderr containing every needle."""
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
