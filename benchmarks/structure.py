"""The structure check `ossedge verify` runs (the target's `check_structure`: what it reads back
from the artifact's files) over a whole artifact against its checkpoint, in a child process of its
own so that its time and peak RSS are its own.

    python -m ossedge.benchmarks.structure ARTIFACT CKPT    # prints one JSON object
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from ossedge.benchmarks.rss import proc_status
from ossedge.runtime.errors import OssedgeError
from ossedge.targets import open_artifact, target_of
from ossedge.targets.source import weight_source


def check(root: str, ckpt: str) -> dict:
    """The check, in this process: every file hashed, the artifact opened without loading its
    programs where the target allows it, its time and this process's peak RSS."""
    t0 = time.perf_counter()
    target = target_of(root)
    if target is None or target.hook("check_structure") is None:
        raise SystemExit(f"{root}: not an artifact of a target with a structure check")
    model = open_artifact(root, checksums=True, engine="interpreter", load=False)
    r = target.check_structure(model, weight_source(ckpt, model.manifest["recipe"])[0])
    if r is None:
        raise SystemExit(f"{root}: its contract has nothing for the structure check to read back")
    r["seconds"] = round(time.perf_counter() - t0, 1)
    r["peak_rss_gb"] = round(proc_status()["VmHWM"] / 1e9, 2)
    return r


def in_child(root: str, ckpt: str) -> dict:
    """`check` in a child process, with the child's wall time (`wall_s`)."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "ossedge.benchmarks.structure", str(root),
                          str(ckpt)], capture_output=True, text=True, check=False)  # fmt: skip
    if run.returncode:
        raise SystemExit(f"the structure check failed:\n{run.stderr[-3000:]}")
    r = json.loads(run.stdout.strip().splitlines()[-1])
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    return r


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    try:
        print(json.dumps(check(sys.argv[1], sys.argv[2])))
    except OssedgeError as e:  # a corrupt artifact or checkpoint: one line, as the CLI says it
        raise SystemExit(f"error: {e}") from None
