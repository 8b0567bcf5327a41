"""Device profiles: what a phone, tablet or laptop offers an on-device LLM (memory an app can use,
bandwidth, CPU features, which targets run there). Profiles are data (`data/devices.json`),
validated strictly on load; `local` describes this machine, read from /proc at the call."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ossedge.runtime.errors import OssedgeError

GB = 1e9
COREML_TARGETS = ("ios18", "ios26")
OSES = ("ios", "ipados", "macos", "android", "linux")
LOCAL = "local"


class DeviceError(OssedgeError):
    """An unknown device name or a malformed device profile."""


@dataclass(frozen=True)
class CPU:
    arch: str  # "arm64" | "x86_64"
    neon_dotprod: bool
    i8mm: bool
    big_cores: int


@dataclass(frozen=True)
class Targets:
    coreml: str | None  # newest Core ML deployment target the device runs, None: no Core ML
    executorch: bool
    onnx: bool


@dataclass(frozen=True)
class Device:
    name: str
    display: str
    os: str
    ram_gb: float
    app_budget_gb: float
    budget_uncertainty_gb: float
    budget_source: str
    bandwidth_gbs: float
    bandwidth_source: str
    storage_read_gbs: float
    cpu: CPU
    targets: Targets

    @property
    def app_budget(self) -> int:
        """Bytes one app can keep resident."""
        return int(self.app_budget_gb * GB)

    def runs(self, target: str) -> bool:
        return bool(getattr(self.targets, target))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_NUMBERS = ("ram_gb", "app_budget_gb", "budget_uncertainty_gb", "bandwidth_gbs", "storage_read_gbs")


def _strict(d: Any, cls, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DeviceError(f"{where}: expected a JSON object, got {type(d).__name__}")
    fields = set(cls.__dataclass_fields__)
    unknown, missing = sorted(set(d) - fields), sorted(fields - set(d))
    if unknown:
        raise DeviceError(f"{where}: unknown key {unknown[0]!r}; known keys: {sorted(fields)}")
    if missing:
        raise DeviceError(f"{where}: missing key {missing[0]!r}")
    return d


def device_from_dict(d: Any, where: str = "device profile") -> Device:
    """A validated Device from its JSON form; DeviceError names the offending key."""
    d = dict(_strict(d, Device, where))
    where = f"{where} {d.get('name', '?')!r}"
    for key in _NUMBERS:
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise DeviceError(f"{where}: {key} must be a non-negative number, got {v!r}")
    if not 0 < d["app_budget_gb"] <= d["ram_gb"]:
        raise DeviceError(f"{where}: app_budget_gb {d['app_budget_gb']} must be in (0, ram_gb]")
    if d["os"] not in OSES:
        raise DeviceError(f"{where}: os {d['os']!r} is not one of {', '.join(OSES)}")
    for key in ("name", "display", "budget_source", "bandwidth_source"):
        if not isinstance(d[key], str) or not d[key]:
            raise DeviceError(f"{where}: {key} must be a non-empty string")
    cpu = _strict(d["cpu"], CPU, f"{where} cpu")
    if cpu["arch"] not in ("arm64", "x86_64"):
        raise DeviceError(f"{where}: cpu.arch must be arm64 or x86_64, got {cpu['arch']!r}")
    t = _strict(d["targets"], Targets, f"{where} targets")
    if t["coreml"] not in (None, *COREML_TARGETS):
        raise DeviceError(f"{where}: targets.coreml must be null or one of {COREML_TARGETS}")
    d["cpu"], d["targets"] = CPU(**cpu), Targets(**t)
    return Device(**d)


@cache
def builtin_devices() -> dict[str, Device]:
    """The packaged profiles, by name."""
    text = resources.files("ossedge.targets").joinpath("data/devices.json").read_text()
    out = {}
    for d in json.loads(text)["devices"]:
        dev = device_from_dict(d, "devices.json")
        if dev.name in out:
            raise DeviceError(f"devices.json: device {dev.name!r} is listed twice")
        out[dev.name] = dev
    return out


def device_names() -> list[str]:
    return [*builtin_devices(), LOCAL]


def get_device(name: str | Path) -> Device:
    """A packaged profile by name, `local` (this machine), or a JSON file holding one profile."""
    if str(name) == LOCAL:
        return local_device()
    if str(name) in builtin_devices():
        return builtin_devices()[str(name)]
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        try:
            return device_from_dict(json.loads(p.read_text()), str(p))
        except (OSError, ValueError) as e:
            raise DeviceError(f"{p}: not a readable device profile ({e})") from None
    raise DeviceError(
        f"unknown device {str(name)!r}; choose one of {', '.join(device_names())} "
        "(or give a JSON file with one profile)"
    )


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out


def cgroup_memory_limit() -> int | None:
    """This process's memory cgroup limit in bytes (v2 or v1), None when unlimited or unknown."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                f = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
            elif "memory" in controllers.split(","):
                f = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
            else:
                continue
            if f.is_file():
                v = f.read_text().strip()
                if v != "max" and int(v) < 1 << 60:
                    return int(v)
    except (OSError, ValueError):
        return None
    return None


def local_device() -> Device:
    """This machine: RAM from /proc/meminfo, the app budget what is available now (or the memory
    cgroup's limit, if lower). Bandwidth is a rough figure until `measure_bandwidth` is run."""
    if not Path("/proc/meminfo").is_file():
        raise DeviceError("--device local needs Linux (/proc/meminfo); name a device profile")
    info = _meminfo()
    budget = info.get("MemAvailable", info["MemTotal"])
    limit = cgroup_memory_limit()
    if limit is not None:
        budget = min(budget, limit)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    arm = os.uname().machine in ("aarch64", "arm64")
    return Device(
        name=LOCAL,
        display=f"this machine ({os.uname().machine}, {os.cpu_count()} CPUs)",
        os="linux",
        ram_gb=round(info["MemTotal"] / GB, 2),
        app_budget_gb=round(budget / GB, 2),
        budget_uncertainty_gb=0.0,
        budget_source="MemAvailable now" + (", capped by the memory cgroup" if limit else ""),
        bandwidth_gbs=round(measure_bandwidth() / GB, 1),
        bandwidth_source="measured: every CPU summing a 0.5 GB buffer, best of 3",
        storage_read_gbs=1.0,
        cpu=CPU(
            arch="arm64" if arm else "x86_64",
            neon_dotprod=arm and " asimddp" in flags,
            i8mm=arm and " i8mm" in flags,
            big_cores=os.cpu_count() or 1,
        ),
        targets=Targets(coreml=None, executorch=True, onnx=True),
    )


def measure_bandwidth(gb: float = 0.5, runs: int = 3, threads: int | None = None) -> float:
    """Read bandwidth of this machine in bytes/s, best of `runs`: `threads` threads (default: every
    CPU, as a decoding runtime reads) each sum their share of an in-memory buffer as rows of 4096
    floats added element-wise, which numpy vectorizes, so memory and not the adder sets the
    pace."""
    threads = threads or os.cpu_count() or 1
    a = np.ones(int(gb * GB) // 4 // 4096 * 4096, dtype=np.float32).reshape(-1, 4096)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(runs):
            t0 = time.perf_counter()
            list(pool.map(lambda part: part.sum(axis=0), parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best
