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

# The main job: build the offline data, train the three stages, evaluate, write runs/tiny/final with its card.
# Re-running continues an interrupted run (--resume) and skips finished steps.
quickstart: $(STAMP)
	$(BIN)/unimoe run tiny --out runs/tiny --data data --resume

bench: $(STAMP)
	$(BIN)/python bench/moe_layer.py --processes 3 --json bench/results/moe_layer.json

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
