"""Running the `ossedge` command in a subprocess, as a user would, and checking its errors."""

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


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str, code: int = 1) -> None:
    """Exit `code`, no traceback, exactly one line on stderr containing every needle."""
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
