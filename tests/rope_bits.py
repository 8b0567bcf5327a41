"""Prints torch's CPU capability and a sha256 of the 20b's rotary tables (4096 positions) and
inverse frequencies: run under each ATEN_CPU_CAPABILITY by test_model.py."""

from __future__ import annotations

import hashlib

import torch

from ossedge.runtime.config import preset
from ossedge.runtime.model import rope_tables, yarn_inv_freq

if __name__ == "__main__":
    cfg = preset("20b")
    cos, sin = rope_tables(cfg, torch.arange(4096))
    h = hashlib.sha256()
    for t in (yarn_inv_freq(cfg), cos, sin):
        h.update(t.numpy().tobytes())
    print(torch.backends.cpu.get_cpu_capability(), h.hexdigest())
