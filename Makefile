# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := out/demo
MODEL := assets/tiny-gpt-oss

.PHONY: install demo test bench-reference clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/ossedge inspect $(MODEL)
	$(BIN)/ossedge quantize $(MODEL) -o $(DEMO_DIR)/tiny-mobile --recipe mobile --force
	$(BIN)/ossedge eval $(DEMO_DIR)/tiny-mobile --reference $(MODEL)
	$(BIN)/ossedge generate $(DEMO_DIR)/tiny-mobile --prompt "def read_lines(path):" --max-new-tokens 64 --temperature 0.3 --seed 0

test: install
	$(BIN)/python -m pytest -q

bench-reference: install
	$(BIN)/python -m ossedge.benchmarks.reference_20b

clean:
	rm -rf out build *.egg-info
