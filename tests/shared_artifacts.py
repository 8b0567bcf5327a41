"""How the run's shared artifacts are converted (the `artifact_of` fixture in conftest.py)."""

# One conversion of the bundled model per target, shared by the whole run (read-only: copy it to
# break it), verified at conversion. ExecuTorch at context 2048: gpt-oss's proportions (4 query
# heads per KV head, prefill = window), so attention dominates the program's memory as at full
# size. Core ML and ONNX: long enough for verify's 72 tokens to pass the window and wrap the ring.
# A target without an entry gets its defaults.
ARTIFACT_OPTIONS = {"executorch": {"max_context": 2048}, "coreml": {"max_context": 128},
                    "onnx": {"max_context": 160}, "coreai": {"max_context": 128}}  # fmt: skip
VERIFY_TOKENS = 72
# the artifact directories' names (a bundle lists its models by them)
NAMES = {"executorch": "tiny-et"}
