# `make run` and `make test` each set up what they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
BIN := $(VENV)/bin
CHROMIUM := /usr/bin/chromium

.PHONY: run test bench clean postgresql

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# The browser tests drive Debian's chromium; nothing is downloaded at test time.
$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium

# The job store's tests also run on a real PostgreSQL server (Debian's package; the tests start their own).
postgresql:
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; }

run: $(BIN)/.installed
	$(BIN)/uvicorn app:app --host $(HOST) --port $(PORT)

test: $(BIN)/.installed $(CHROMIUM) postgresql
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/.installed
	command -v hey >/dev/null || apt-get install -y hey
	$(BIN)/python bench/benchmark.py

clean:
	rm -rf $(VENV)
