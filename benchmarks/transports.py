"""Where a benchmark runs: `local` (this machine, optionally inside a memory cgroup) or `adb`
(an Android device: files pushed under /data/local/tmp/ossedge, the runner run with `adb shell`).
Both expose the same three calls — stage files, run a command, describe the device — so one
harness drives either. `$OSSEDGE_ADB` (default: `adb` on PATH) names the adb program."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path

from ossedge.benchmarks.limits import app_like, evict, memory_cgroup
from ossedge.runtime.errors import OssedgeError

REMOTE_ROOT = "/data/local/tmp/ossedge"


class TransportError(OssedgeError):
    """The device cannot be reached, or a file cannot be moved to or from it."""


class LocalTransport:
    name = "local"

    def __init__(self, memory_limit: int | None = None) -> None:
        self.memory_limit = memory_limit

    def stage(self, files: dict[str, Path]) -> dict[str, str]:
        """Remote path of each file (here: the file itself)."""
        return {key: str(Path(p).resolve()) for key, p in files.items()}

    def run(self, argv: list[str], *, env: dict[str, str] | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        if self.memory_limit is None:
            return subprocess.run(argv, capture_output=True, text=True, env=full_env,
                                  timeout=timeout, check=False)
        with memory_cgroup(self.memory_limit) as procs:
            return subprocess.run(app_like(argv, procs=procs), capture_output=True, text=True,
                                  env=full_env, timeout=timeout, check=False)

    def evict(self, paths: list[Path]) -> None:
        evict(paths)

    def describe(self) -> dict:
        cpu = ""
        info = Path("/proc/cpuinfo")
        if info.is_file():
            for line in info.read_text().splitlines():
                if line.startswith(("model name", "Hardware", "CPU part")):
                    cpu = line.split(":", 1)[1].strip()
                    break
        mem = 0
        if Path("/proc/meminfo").is_file():
            mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
        return {
            "transport": "local",
            "model": platform.node() or "this machine",
            "os": f"{platform.system()} {platform.release()}",
            "machine": platform.machine(),
            "cpu": cpu,
            "cpus": os.cpu_count(),
            "ram_bytes": mem,
            "memory_limit_bytes": self.memory_limit,
            "thermal": _local_thermal(),
        }


def _local_thermal() -> dict[str, float]:
    out = {}
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        try:
            out[(zone / "type").read_text().strip()] = int((zone / "temp").read_text()) / 1000
        except (OSError, ValueError):
            continue
    return out


class AdbTransport:
    name = "adb"

    def __init__(self, serial: str | None = None) -> None:
        self.adb = os.environ.get("OSSEDGE_ADB") or shutil.which("adb")
        if not self.adb:
            raise TransportError("adb not found; install Android platform-tools or set "
                                 "OSSEDGE_ADB to the adb program")
        self.serial = serial
        devices = self._devices()
        if serial is None:
            if len(devices) != 1:
                raise TransportError(
                    f"{len(devices)} Android devices attached ({', '.join(devices) or 'none'}); "
                    "name one with --device adb:SERIAL" if devices else
                    "no Android device attached (adb devices lists none); connect one and "
                    "enable USB debugging"
                )
            self.serial = devices[0]
        elif serial not in devices:
            raise TransportError(f"Android device {serial} is not reachable (adb devices lists: "
                                 f"{', '.join(devices) or 'none'})")

    def _adb(self, *args: str, timeout: float | None = 600) -> subprocess.CompletedProcess:
        cmd = [self.adb, *(["-s", self.serial] if self.serial else []), *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TransportError(f"adb {args[0]} failed ({e})") from None

    def _devices(self) -> list[str]:
        p = subprocess.run([self.adb, "devices"], capture_output=True, text=True, check=False)
        if p.returncode:
            raise TransportError(f"`adb devices` failed: {p.stderr.strip()[:200]}")
        lines = p.stdout.splitlines()[1:]
        return [ln.split()[0] for ln in lines if ln.strip() and ln.split()[-1] == "device"]

    def stage(self, files: dict[str, Path]) -> dict[str, str]:
        """Push each file (or directory) to REMOTE_ROOT/<key>; return the remote paths."""
        out = {}
        self._adb("shell", f"mkdir -p {REMOTE_ROOT}")
        for key, path in files.items():
            remote = f"{REMOTE_ROOT}/{key}"
            parent = remote.rsplit("/", 1)[0]
            self._adb("shell", f"mkdir -p {shlex.quote(parent)}")
            p = self._adb("push", str(path), remote, timeout=None)
            if p.returncode:
                raise TransportError(f"adb push {path} failed: {p.stderr.strip()[:200]}")
            if Path(path).is_file() and os.access(path, os.X_OK):
                self._adb("shell", f"chmod 755 {shlex.quote(remote)}")
            out[key] = remote
        return out

    def run(self, argv: list[str], *, env: dict[str, str] | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        cmd = f"cd {REMOTE_ROOT} && {prefix} {' '.join(shlex.quote(a) for a in argv)}"
        return self._adb("shell", cmd, timeout=timeout)

    def evict(self, paths: list[Path]) -> None:
        """Nothing to do: dropping a phone's page cache needs root."""

    def _prop(self, name: str) -> str:
        return self._adb("shell", f"getprop {name}").stdout.strip()

    def describe(self) -> dict:
        temps = self._adb(
            "shell", "for z in /sys/class/thermal/thermal_zone*; do "
            "echo $(cat $z/type) $(cat $z/temp); done").stdout
        thermal = {}
        for line in temps.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                thermal[parts[0]] = int(parts[1]) / 1000
        status = self._adb("shell", "dumpsys thermalservice | grep -m1 'Thermal Status'").stdout
        return {
            "transport": "adb",
            "serial": self.serial,
            "model": self._prop("ro.product.model"),
            "manufacturer": self._prop("ro.product.manufacturer"),
            "os": f"Android {self._prop('ro.build.version.release')}",
            "soc": self._prop("ro.soc.model"),
            "machine": self._prop("ro.product.cpu.abi"),
            "thermal": thermal,
            "thermal_status": status.strip().split(":")[-1].strip() if status else None,
        }


def open_transport(spec: str, *, memory_limit: int | None = None):
    """`local`, `adb` or `adb:SERIAL` → a transport."""
    if spec == "local":
        return LocalTransport(memory_limit)
    if spec == "adb" or spec.startswith("adb:"):
        if memory_limit is not None:
            raise TransportError("--memory-limit applies to --device local only")
        return AdbTransport(spec.partition(":")[2] or None)
    raise TransportError(f"unknown --device {spec!r}; use local, adb or adb:SERIAL")
