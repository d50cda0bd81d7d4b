# Two commands: `make demo` and `make test`. Both create .venv from requirements*.txt when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv lint test demo bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

demo: venv
	$(BIN)/python demo.py

bench: venv
	$(BIN)/python bench/dispatch.py
	$(BIN)/python bench/federated.py
	$(BIN)/python bench/aggregation.py

clean:
	rm -rf data logs checkpoints model_cache .pytest_cache .mypy_cache .ruff_cache
