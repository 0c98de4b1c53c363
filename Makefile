# One entry point for setup, tests and the main job. Everything runs inside .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test quickstart lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

quickstart: $(STAMP)
	$(BIN)/unimoe quickstart --out runs/quickstart

bench: $(STAMP)
	$(BIN)/python bench/moe_layer.py --json bench/results/moe_layer.json

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
