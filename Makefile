# `make run` and `make test` each set up what they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
BIN := $(VENV)/bin
CHROMIUM := /usr/bin/chromium

IMAGE ?= registry.example.com/classifier:1.0.0

.PHONY: run demo test test-fast bench image docs protos clean postgresql buildah

# Serving needs requirements-runtime.txt alone; the tests, benchmarks and docs add requirements.txt's tools.
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed

$(RUNTIME): requirements-runtime.txt requirements-slim.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-runtime.txt
	touch $@

$(DEV): $(RUNTIME) requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# The browser tests drive Debian's chromium; nothing is downloaded at test time.
$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium

# The job store's tests also run on a real PostgreSQL server (Debian's package; the tests start their own).
postgresql:
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; }

# The image tests build and run the image with Buildah (no Docker daemon needed); debootstrap makes its base.
buildah:
	command -v buildah >/dev/null && command -v debootstrap >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends buildah debootstrap; }

# The images deploy/ runs (the default, and the slim replica's tagged -slim): docker build where Docker runs,
# else buildah (tools/image_build.py says how).
image:
	$(PYTHON) tools/image_build.py --tag $(IMAGE)

# HTTP on HOST:PORT, gRPC on HOST:GRPC_PORT (default 8001; GRPC_PORT=0 turns it off).
run: $(RUNTIME)
	HOST=$(HOST) PORT=$(PORT) $(BIN)/python -m app

# Without the pretrained weights: seeded stand-in weights, and every answer, page and log line says so.
demo: $(RUNTIME)
	DEMO=true MODEL_WEIGHTS= HOST=$(HOST) PORT=$(PORT) $(BIN)/python -m app

# The documentation site (MkDocs): tools/generate_docs.py's pages from their sources, then the site in site/.
docs: $(DEV)
	$(BIN)/python -m tools.generate_docs
	$(BIN)/mkdocs build --strict

# The gRPC binding's code, generated from its .proto (committed, so the service needs no grpcio-tools).
protos: $(DEV)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. classifier/v2/protos/inference.proto

# Every tier (docs/development.md): unit, app (in process, one loaded model), server (processes), system
# (browser, PostgreSQL, the image build, fuzzing).
test: $(DEV) $(CHROMIUM) postgresql buildah
	$(BIN)/python -m pytest -q tests

# The inner loop: unit and app tiers only, nothing to install beyond requirements.txt.
test-fast: $(DEV)
	$(BIN)/python -m pytest -q tests --tiers unit,app

bench: $(DEV)
	command -v hey >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q hey; }
	$(BIN)/python -m bench.benchmark
	$(BIN)/python -m bench.tracing
	$(BIN)/python -m bench.reload
	$(BIN)/python -m bench.offline

clean:
	rm -rf $(VENV)
