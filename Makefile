# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := out/demo
MODEL := assets/tiny-gpt-oss
# the kernels' CMake builds run make inside make: no "Entering directory" lines for each
MAKEFLAGS += --no-print-directory

.PHONY: install kernels arm64-tools demo test bench-reference clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -qq -e '.[test]'
	touch $(STAMP)

# The ExecuTorch kernels of the ossedge:: operators, built with CMake against the executorch
# wheel into build/kernels and installed where load_kernels() looks. CMake: the system's (3.19+),
# else the PyPI wheel, installed into the venv only then.
KERNELS := targets/executorch/lib/libossedge_kernels.so
KERNEL_SRC := $(wildcard targets/executorch/kernels/*.cpp targets/executorch/kernels/*.h) \
	targets/executorch/kernels/CMakeLists.txt
CMAKE := $(or $(shell command -v cmake 2>/dev/null),$(BIN)/cmake)

$(BIN)/cmake: | $(BIN)/python
	$(BIN)/python -m pip install --quiet cmake

$(KERNELS): $(STAMP) $(KERNEL_SRC) | $(CMAKE)
	$(CMAKE) -S targets/executorch/kernels -B build/kernels -DCMAKE_BUILD_TYPE=Release \
		-DEXECUTORCH_ROOT="$$($(BIN)/python -c 'import executorch; print(list(executorch.__path__)[0])')" >/dev/null
	$(CMAKE) --build build/kernels -j2
	mkdir -p $(dir $(KERNELS)) && cp build/kernels/libossedge_kernels.so $(KERNELS).new && mv -f $(KERNELS).new $(KERNELS)

kernels: $(KERNELS)

# The native benchmark runner (benchmarks/runner), built the same way into build/runner and copied
# to benchmarks/runner/bin with the kernel library beside it, where it looks by default. Files are
# replaced by rename, so a process running the old ones keeps its mapping intact.
RUNNER := benchmarks/runner/bin/ossedge_runner
RUNNER_LIB := benchmarks/runner/bin/libossedge_kernels.so
RUNNER_SRC := benchmarks/runner/ossedge_runner.cpp benchmarks/runner/runner_support.h \
	benchmarks/runner/CMakeLists.txt

$(RUNNER): $(STAMP) $(KERNELS) $(RUNNER_SRC) | $(CMAKE)
	$(CMAKE) -S benchmarks/runner -B build/runner -DCMAKE_BUILD_TYPE=Release -DOSSEDGE_RUNNER_KERNELS=OFF \
		-DEXECUTORCH_ROOT="$$($(BIN)/python -c 'import executorch; print(list(executorch.__path__)[0])')" >/dev/null
	$(CMAKE) --build build/runner -j2
	mkdir -p $(dir $(RUNNER)) && cp build/runner/ossedge_runner $(RUNNER).new && mv -f $(RUNNER).new $(RUNNER)
	cp $(KERNELS) $(RUNNER_LIB).new && mv -f $(RUNNER_LIB).new $(RUNNER_LIB)

install: $(STAMP) $(KERNELS) $(RUNNER)

demo: install
	$(BIN)/ossedge inspect $(MODEL)
	$(BIN)/ossedge quantize $(MODEL) -o $(DEMO_DIR)/tiny-mobile --recipe mobile --force
	$(BIN)/ossedge eval $(DEMO_DIR)/tiny-mobile --reference $(MODEL)
	$(BIN)/ossedge generate $(DEMO_DIR)/tiny-mobile --prompt "class Stack:" --max-new-tokens 64 --temperature 0
	$(BIN)/ossedge profile-experts $(MODEL) -o $(DEMO_DIR)/tiny-profile.json --force
	$(BIN)/ossedge convert $(MODEL) --target executorch -o $(DEMO_DIR)/tiny-executorch --max-context 1024 --expert-profile $(DEMO_DIR)/tiny-profile.json --force
	$(BIN)/ossedge verify $(DEMO_DIR)/tiny-executorch --reference $(MODEL)
	$(BIN)/ossedge generate $(DEMO_DIR)/tiny-executorch --prompt "class Stack:" --max-new-tokens 64 --temperature 0
	$(BIN)/ossedge generate $(DEMO_DIR)/tiny-executorch --prompt "class Stack:" --max-new-tokens 64 --temperature 0 --expert-cache 2M
	$(BIN)/ossedge eval $(DEMO_DIR)/tiny-executorch --reference $(MODEL) --max-tokens 1024 --expert-cache 864K --cache-aware-routing 1
	$(BIN)/ossedge convert $(MODEL) --target coreml -o $(DEMO_DIR)/tiny-coreml --max-context 1024 --force
	$(BIN)/ossedge verify $(DEMO_DIR)/tiny-coreml --reference $(MODEL)
	$(BIN)/ossedge convert $(MODEL) --target onnx -o $(DEMO_DIR)/tiny-onnx --max-context 1024 --force
	$(BIN)/ossedge generate $(DEMO_DIR)/tiny-onnx --prompt "class Stack:" --max-new-tokens 64 --temperature 0
	$(BIN)/ossedge plan --device iphone-16-pro
	$(BIN)/ossedge bundle $(DEMO_DIR)/tiny-executorch --platform android --device pixel-9-pro -o $(DEMO_DIR)/tiny-android --force
	$(BIN)/ossedge verify $(DEMO_DIR)/tiny-android

# The arm64 (NEON) kernel path is tested under qemu-user: get the cross toolchain where apt can.
ARM64_PKGS := g++-aarch64-linux-gnu qemu-user
arm64-tools:
	@if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q $(ARM64_PKGS) || (apt-get update -q && apt-get install -y -q $(ARM64_PKGS))) \
			>/dev/null 2>&1 || echo "could not install $(ARM64_PKGS): the arm64 kernel tests will be skipped"; \
	else echo "no apt (or not root): the arm64 kernel tests will be skipped; install $(ARM64_PKGS)"; fi

test: install arm64-tools
	$(BIN)/python -m pytest -q

bench-reference: install
	$(BIN)/python -m ossedge.benchmarks.reference_20b

clean:
	rm -rf out build *.egg-info targets/executorch/lib benchmarks/runner/bin
