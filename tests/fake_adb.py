"""A stand-in for `adb` with one attached "device" whose file system is a local directory
($FAKE_ADB_ROOT) and whose shell is this machine's: enough for the bench harness's adb transport
(devices, push, pull, shell with getprop / dumpsys / thermal zones) to run end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SERIAL = "FAKE01"
PROPS = {"ro.product.model": "Fake Pixel", "ro.product.manufacturer": "ossedge-test",
         "ro.build.version.release": "16", "ro.soc.model": "FakeSoC",
         "ro.product.cpu.abi": "x86_64"}


def local(root: Path, remote: str) -> Path:
    return root / remote.lstrip("/")


def main(argv: list[str]) -> int:
    root = Path(os.environ["FAKE_ADB_ROOT"])
    if argv[:1] == ["-s"]:
        if argv[1] != SERIAL:
            print(f"adb: device '{argv[1]}' not found", file=sys.stderr)
            return 1
        argv = argv[2:]
    cmd, args = argv[0], argv[1:]
    if cmd == "devices":
        print(f"List of devices attached\n{SERIAL}\tdevice\n")
        return 0
    if cmd == "push":
        src, dst = Path(args[0]), local(root, args[1])
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
        return 0
    if cmd == "pull":
        shutil.copy2(local(root, args[0]), args[1])
        return 0
    if cmd == "shell":
        line = " ".join(args)
        if line.startswith("getprop "):
            print(PROPS.get(line.split()[1], ""))
            return 0
        if line.startswith("dumpsys thermalservice"):
            print("Thermal Status: 0")
            return 0
        if "thermal_zone" in line:
            print("battery 31000\ncpu-big 45500")
            return 0
        line = line.replace("/data/local/tmp", str(root / "data/local/tmp"))
        return subprocess.run(["sh", "-c", line]).returncode
    print(f"adb: unknown command {cmd}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
