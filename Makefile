# `make run` and `make test` each set up what they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
BIN := $(VENV)/bin
CHROMIUM := /usr/bin/chromium

IMAGE ?= registry.example.com/classifier:1.0.0

.PHONY: run demo test bench image docs protos clean postgresql buildah

$(BIN)/.installed: requirements.txt requirements-runtime.txt requirements-slim.txt
	$(PYTHON) -m venv $(VENV)
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
# else buildah (bench/image_build.py says how).
image:
	$(PYTHON) bench/image_build.py --tag $(IMAGE)

run: $(BIN)/.installed
	$(BIN)/uvicorn app:app --host $(HOST) --port $(PORT)

# Without the pretrained weights: seeded stand-in weights, and every answer, page and log line says so.
demo: $(BIN)/.installed
	DEMO=true MODEL_WEIGHTS= $(BIN)/uvicorn app:app --host $(HOST) --port $(PORT)

# The documentation site (MkDocs): docs/generate.py's pages from their sources, then the site in site/.
docs: $(BIN)/.installed
	$(BIN)/python docs/generate.py
	$(BIN)/mkdocs build --strict

# The gRPC binding's code, generated from its .proto (committed, so the service needs no grpcio-tools).
protos: $(BIN)/.installed
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/inference.proto

test: $(BIN)/.installed $(CHROMIUM) postgresql buildah
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/.installed
	command -v hey >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q hey; }
	$(BIN)/python bench/benchmark.py

clean:
	rm -rf $(VENV)
