"""Full-size benchmark of the ONNX target on the synthetic gpt-oss-20b: as executorch_20b, with
`ossedge convert --target onnx` (recipe int4 by default: 4-bit QMoE experts, 14 GB; recipe mobile's
exact int8 experts take 24 GB, more than this machine's RAM) and ONNX Runtime's CPU provider.

    python -m ossedge.benchmarks.onnx_20b [--ckpt out/gpt-oss-20b-synth] [--out out/20b-onnx]
        [--recipe int4] [--prompt 1024] [--gen 64] [--skip-convert]

Prints one JSON object: conversion time and peak RSS, artifact bytes, load, prefill and decode
tok/s, RSS split into anonymous and file-backed, and decode against the bandwidth roofline.
"""

from ossedge.benchmarks.executorch_20b import main

if __name__ == "__main__":
    main(target="onnx", out="out/20b-onnx", recipe="int4")
