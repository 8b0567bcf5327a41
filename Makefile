# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := out/tiny

.PHONY: install demo test bench-reference clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/ossedge synth $(DEMO_DIR) --preset tiny --seed 0 --force
	$(BIN)/ossedge inspect $(DEMO_DIR)
	$(BIN)/ossedge generate $(DEMO_DIR) --prompt "The quick brown fox" --max-new-tokens 24 --seed 0

test: install
	$(BIN)/python -m pytest -q

bench-reference: install
	$(BIN)/python -m ossedge.benchmarks.reference_20b

clean:
	rm -rf out build *.egg-info
