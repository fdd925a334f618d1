# Set-up, the whole pipeline, and the tests, on a fresh machine with Python 3.11.
# torch is pinned to the CPU build that pip finds on this kind of machine; an open-ended
# requirement would pull a multi-gigabyte CUDA build instead.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/default

.PHONY: setup run test test-slow clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# --resume: a second `make run` keeps the stages already finished in $(OUT).
run: setup
	$(BIN)/stagewise run --preset default --out $(OUT) --resume

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
