"""The wheel holds every tracked module (sub-packages missing from `packages` would import in an
editable install but vanish from the wheel)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"ossedge": "ossedge", "runtime": "ossedge/runtime", "quantize": "ossedge/quantize",
                "targets": "ossedge/targets", "convert": "ossedge/convert",
                "benchmarks": "ossedge/benchmarks", "assets": "ossedge/assets"}


def test_wheel_contains_every_tracked_module(tmp_path: Path) -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    want = set()
    for f in tracked:
        top, _, rest = f.partition("/")
        shipped = ("/data/", "/glue/", "/kernels/", "/swift/")  # read at run time (bundle, plan)
        if top in PACKAGE_DIRS and (f.endswith(".py") or any(s in f for s in shipped)
                                    or top == "assets"):
            want.add(f"{PACKAGE_DIRS[top]}/{rest}")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("ossedge-*.whl")
    have = set(zipfile.ZipFile(wheel).namelist())
    assert want - have == set()
    assert "ossedge/runtime/data/gpt-oss-20b.config.json" in have
    assert "ossedge/assets/tiny-gpt-oss/model.safetensors" in have
    assert "ossedge/targets/data/devices.json" in have
    assert "ossedge/targets/executorch/kernels/moe_et.cpp" in have
