# `make run` and `make test` each set up what they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
BIN := $(VENV)/bin

.PHONY: run test bench clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

run: $(BIN)/.installed
	$(BIN)/uvicorn app:app --host $(HOST) --port $(PORT)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/.installed
	command -v hey >/dev/null || apt-get install -y hey
	$(BIN)/python bench/benchmark.py

clean:
	rm -rf $(VENV)
