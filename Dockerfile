# The classifier's image: the service (and python -m classify) on Debian's Python 3.11, non-root, read-only.
# Two targets: the default (the last stage) serves with torch; `--target slim` is the slim replica, without
# torch, serving the model file python -m export wrote (MODEL_ONNX; docs/deployment.md).
#
#   make image                                    # docker or buildah, tagged as deploy/ names it
#   docker build --target slim -t IMAGE-slim .    # the slim replica
#   docker run -p 8000:8000 -p 8001:8001 -v /srv/models:/models:ro IMAGE-slim   # serves /models/resnet18.onnx
#   docker run -p 8000:8000 -p 8001:8001 -v /srv/models:/models:ro -e MODEL_WEIGHTS=/models/resnet18-f37072fd.pth IMAGE
#   docker run -v /srv/models:/models:ro -v /srv/photos:/photos:ro -v /srv/out:/results \
#       -e MODEL_WEIGHTS=/models/resnet18-f37072fd.pth IMAGE python -m classify /photos --out /results/r.jsonl
#
# Build arguments:
#   TORCH_INDEX_URL  where torch and torchvision come from: PyTorch's CPU-only wheels by default; empty: PyPI,
#                    whose Linux torch is the CUDA build (several GB more, for GPU nodes).
#   TORCH_VERSION, TORCHVISION_VERSION   their versions (a pair PyTorch released together).
#   WEIGHTS          a weights file under weights/ in the build context, baked in at /models/weights.pth with
#                    MODEL_WEIGHTS pointing at it (air-gapped sites); empty (the default): none, mount them at
#                    MODEL_WEIGHTS or a TORCH_HOME volume.
# Every setting is an environment variable (docs/settings.md); the defaults below suit a container.

ARG BASE=debian:bookworm-slim

# Debian 12's Python 3.11, pinned (the version bookworm has carried since its release).
ARG PYTHON_DEB=3.11.2-1+b1

# What both targets install: Python, and the service's requirements without torch.
FROM ${BASE} AS slim-build
ARG PYTHON_DEB
RUN apt-get update \
    && apt-get install -y --no-install-recommends "python3=${PYTHON_DEB}" "python3-venv=${PYTHON_DEB}" \
    && rm -rf /var/lib/apt/lists/*
COPY requirements-slim.txt /tmp/
# Compiled now: the root filesystem is read-only at run time, and start-up need not compile.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements-slim.txt \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# The service's code: the entry points (app.py, classify.py, ...) and the package they run, whole, compiled.
# A stage of its own, copied last into each image: changing the code rebuilds no installed requirement.
FROM slim-build AS code
COPY *.py /app/
COPY classifier/ /app/classifier/
RUN /opt/venv/bin/python -m compileall -q /app

# The default image's: torch and torchvision as well.
FROM slim-build AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
COPY requirements-runtime.txt /tmp/
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && grep -v -E '^torch(vision)?==' /tmp/requirements-runtime.txt > /tmp/rest.txt \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/rest.txt \
    && /opt/venv/bin/python -m compileall -q -x '/testing/_internal/' /opt/venv/lib
ARG WEIGHTS=
RUN mkdir -p /models
COPY ${WEIGHTS:-requirements-runtime.txt} /models/baked
RUN if [ -n "${WEIGHTS}" ]; then mv /models/baked /models/weights.pth; else rm /models/baked; fi

# What both targets run on: Python, a non-root user, /data for the job store.
FROM ${BASE} AS runtime
ARG PYTHON_DEB
RUN apt-get update \
    && apt-get install -y --no-install-recommends "python3=${PYTHON_DEB}" \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 classifier \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin classifier \
    && mkdir /data /models /cache && chown 10001:10001 /data /cache
# /data: the job store when it is SQLite (mount a volume); /cache: the ONNX export and the runtime BACKEND=auto
# chose, by the weights' hash (RUNTIME_CACHE_DIR; a volume makes restarts quick); /tmp: the only other place
# anything is written (TMPDIR: SQLite would otherwise put its temporary files in /var/tmp).
ENV PATH=/opt/venv/bin:$PATH \
    RUNTIME_CACHE_DIR=/cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    HOST=0.0.0.0 \
    JOBS_DATABASE_URL=sqlite:////data/jobs.sqlite3
WORKDIR /app
# HTTP (PORT) and the Open Inference Protocol over gRPC (GRPC_PORT), both on HOST: every interface here.
EXPOSE 8000 8001
# Exec form: python is PID 1 and gets SIGTERM itself, so the drain runs (SHUTDOWN_TIMEOUT_S).
CMD ["python", "-m", "app"]

# The slim replica: no torch. MODEL_ONNX names the exported file (mount it, or bake it in a derived image).
FROM runtime AS slim
COPY --from=slim-build /opt/venv /opt/venv
COPY --from=code /app /app
ENV MODEL_ONNX=/models/resnet18.onnx
USER 10001:10001

# The default image: with torch; the weights from MODEL_WEIGHTS, a TORCH_HOME volume, or baked in (WEIGHTS).
FROM runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=build /models /models
COPY --from=code /app /app
ARG WEIGHTS=
ENV TORCH_HOME=/models/torch \
    MODEL_WEIGHTS=${WEIGHTS:+/models/weights.pth}
USER 10001:10001
