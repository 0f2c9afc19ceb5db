"""Every setting of the service: one declaration each (its environment variable, type, default, bounds and
meaning), read from the environment once, read by the code at call time through get_settings().

The environment variable is the field's name in capitals (MAX_QUEUE for max_queue). An empty variable means
the default. An invalid value stops start-up with one line that names the variable and what it accepts.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


def cores() -> int:
    """The CPUs this process may run on: sched_getaffinity respects container CPU sets; cpu_count() does not."""
    return len(os.sched_getaffinity(0))


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's container (cgroup v2, then v1), or None when there is none."""
    for path in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        # v2 writes "max" for no limit, v1 a number near 2**63.
        return int(text) if text.isdigit() and int(text) < 1 << 62 else None
    return None


def default_body_budget() -> int:
    """MAX_BODY_BUFFER_BYTES: a quarter of the container's memory limit; 512 MiB where there is no limit."""
    limit = cgroup_memory_limit()
    return 512 * MiB if limit is None else max(16 * MiB, limit // 4)


def default_cache_dir() -> Path:
    """RUNTIME_CACHE_DIR: the XDG cache directory's classifier folder."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "classifier"


Names = Annotated[list[str], NoDecode]  # comma-separated in the environment, not JSON


class Settings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, env_ignore_empty=True, case_sensitive=False, extra="ignore")

    # The model
    model_weights: Path | None = Field(None, description="A ResNet18 state_dict file; unset: torchvision's cache under TORCH_HOME")
    model_onnx: Path | None = Field(None, description="Slim replica: serve the model file python -m export wrote, with "
                                    "ONNX Runtime and without torch (same answers, a fraction of the memory and start-up)")
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="What runs the forward pass. auto: in fp32 on a CPU, torch or ONNX Runtime, whichever "
        "start-up measures faster (both give the reference answers; the choice is kept in RUNTIME_CACHE_DIR), else "
        "torch; PRECISION=int8: always ONNX Runtime")
    runtime_cache_dir: Path = Field(default_factory=lambda: default_cache_dir(),
                                    description="Where start-up keeps what it derives from the weights, by their "
                                    "hash: the ONNX export and which runtime BACKEND=auto chose (default: "
                                    "$XDG_CACHE_HOME/classifier, else ~/.cache/classifier)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the forward pass runs; auto: a GPU if torch sees one")
    precision: Literal["fp32", "bf16", "fp16", "int8"] = Field(
        "fp32", description="Number type of the forward pass; bf16, fp16 and int8 trade exactness for speed (measured at start-up)")
    int8_model: Path | None = Field(None, description="PRECISION=int8: the quantized model python -m quantize built from "
                                    "these weights and your calibration photos")
    force_precision: bool = Field(False, description="Run PRECISION=bf16 even on a CPU without native bfloat16, or int8 "
                                  "where start-up measured it no faster than fp32 (slower)")

    demo: bool = Field(False, description="Serve seeded stand-in weights, not trained (the answers mean nothing), to try the "
                       "service without the pretrained ones; /model, the page, the log and every response say so")

    # CPU and batching
    threads: int = Field(default_factory=cores, ge=1, description="Threads of the forward pass (default: the CPUs this process may use)")
    decode_workers: int = Field(default_factory=cores, ge=1, description="Threads that decode and preprocess uploads (default: the CPUs)")
    jpeg_draft: bool = Field(False, description="Decode large JPEGs at a reduced scale: faster, answers change slightly (measured)")
    max_batch_size: int | None = Field(None, ge=1, description="Most images in one forward pass (default: 8 on a CPU, 32 on a GPU)")
    max_batch_delay_ms: float = Field(30, ge=0, description="Longest a batch waits for images still being decoded (never "
                                      "for nobody: with none decoding it starts at once); long enough for a burst's "
                                      "images to share one forward pass instead of waiting a whole pass behind it")
    job_batch_max_ms: float = Field(50, ge=0, description="Longest a job's forward pass may take while online requests are "
                                    "about (one arriving meanwhile waits for it): job batches hold as many images as fit, at least 1")
    job_full_batch_after_s: float = Field(2, ge=0, description="After this long without an online request, job batches "
                                          "grow back to MAX_BATCH_SIZE, the job's fastest")
    max_queue: int = Field(64, ge=1, description="Most images in flight (decoding, queued or in a forward pass); beyond it, 503")
    max_batch_files: int = Field(32, ge=1, description="Most images in one /predict/batch or /v2 request")
    request_timeout_s: float = Field(10, ge=0.01, description="Longest an online request may wait for its answer; then 503")

    # Uploads and memory
    max_upload_bytes: int = Field(20 * MiB, ge=1, description="Largest request body (and image) online; beyond it, 413")
    max_body_buffer_bytes: int = Field(default_factory=default_body_budget, ge=1,
                                       description="Most bytes of request bodies held at once (default: a quarter of the container's memory limit, else 512 MiB); beyond it, 503")
    max_image_pixels: int = Field(50_000_000, ge=1, description="Largest image in pixels, read from its header before decoding; beyond it, 413")
    cache_entries: int = Field(10_000, ge=0, description="Answers kept for repeated images (exact bytes), about 4.3 KB each "
                               "(the default about 42 MB); 0 turns the cache off")

    # Where it listens
    host: str = Field("127.0.0.1", min_length=1, description="The address HTTP and gRPC listen on (python -m app): "
                      "127.0.0.1 this machine only; 0.0.0.0 every interface (the container image's; HTTP on IPv4 only), :: IPv6 too")
    port: int = Field(8000, ge=1, le=65535, description="The port of HTTP (python -m app)")
    grpc_port: int = Field(8001, ge=0, le=65535, description="The port of the Open Inference Protocol over gRPC, on "
                           "HOST beside HTTP; 0 turns it off")

    # HTTP
    cors_origins: Names = Field([], description="Web origins allowed to call the API from a browser, comma-separated")
    api_key: str | None = Field(None, repr=False, description="When set, the key every prediction and job route requires")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe log level written")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text, or one JSON object each")
    shutdown_timeout_s: float = Field(20, ge=0, description="On SIGTERM, how long accepted requests may take to finish")
    otel_traces_exporter: Literal["none", "otlp", "console"] = Field(
        "none", description="Traces (OpenTelemetry): otlp sends them over OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT, console "
        "prints them; the SDK's other OTEL_* variables apply (docs/operations.md#traces)")

    # Asynchronous jobs
    jobs_database_url: str = Field("sqlite:///data/jobs.sqlite3",
                                   description="The job store: SQLite (one replica) or postgresql+psycopg://... (shared by replicas)")
    max_job_files: int = Field(1000, ge=1, description="Most images in one job")
    max_job_bytes: int = Field(default_factory=lambda data: min(256 * MiB, data["max_body_buffer_bytes"]), ge=1,
                               description="Largest job submission (default: 256 MiB, or MAX_BODY_BUFFER_BYTES if smaller)")
    jobs_max_pending_bytes: int = Field(2 * 1024 * MiB, ge=1,
                                        description="Most bytes of stored, unclassified job images; beyond it, submissions get 503")
    job_ttl_s: float = Field(86400, ge=1, description="How long a finished job's results are kept")
    job_lease_s: float = Field(60, ge=1, description="How long a claimed job image is held by its replica without renewal")
    webhook_secret: str | None = Field(None, repr=False,
                                       description="Signs webhooks (Standard Webhooks): whsec_ followed by base64 of at least 16 random bytes")
    webhook_allowed_hosts: Names = Field([], description="Hosts (or host:port) a job's webhook may call, comma-separated; empty: none")
    jobs_allowed_buckets: Names = Field([], description="S3 buckets a job may name objects in, and write its results to, "
                                        "comma-separated; empty: none (any object named: 403, never fetched)")
    webhook_first_retry_s: float = Field(7.5, ge=0.01, description="Wait before a failed webhook's first retry; each later wait is 4x")

    @field_validator("backend", "device", "precision", "log_level", "log_format", "otel_traces_exporter",
                     mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("model_weights", "model_onnx", "int8_model", "runtime_cache_dir", mode="after")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value else None

    @field_validator("cors_origins", "webhook_allowed_hosts", "jobs_allowed_buckets", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value

    @field_validator("webhook_allowed_hosts", mode="after")
    @classmethod
    def _host_names_are_case_blind(cls, hosts: list[str]) -> list[str]:
        return [host.lower() for host in hosts]

    @field_validator("api_key", "webhook_secret", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return (value.strip() or None) if isinstance(value, str) else value

    @field_validator("webhook_secret", mode="after")
    @classmethod
    def _standard_webhooks_secret(cls, secret: str | None) -> str | None:
        if secret is None:
            return None
        try:
            key = base64.b64decode(secret.removeprefix("whsec_") + "==", validate=True)
        except ValueError:
            key = b""
        if len(key) < 16:
            raise ValueError("WEBHOOK_SECRET must be whsec_ followed by at least 16 base64-encoded random bytes "
                             "(python -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(24)).decode())\")")
        return secret

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.backend == "onnxruntime" and (self.device == "cuda" or self.precision not in ("fp32", "int8")):
            raise ValueError("BACKEND=onnxruntime runs in fp32 on the CPU: DEVICE=cuda and PRECISION need BACKEND=torch")
        for name, limit in (("MAX_UPLOAD_BYTES", self.max_upload_bytes), ("MAX_JOB_BYTES", self.max_job_bytes)):
            if limit > self.max_body_buffer_bytes:
                what = "upload" if name == "MAX_UPLOAD_BYTES" else "job"
                raise ValueError(f"{name}={limit} must not exceed MAX_BODY_BUFFER_BYTES={self.max_body_buffer_bytes}: "
                                 f"the largest accepted {what} could never be received")
        if self.precision == "int8" and self.device == "cuda":
            raise ValueError("PRECISION=int8 runs on the CPU (ONNX Runtime): DEVICE=cuda needs PRECISION fp32, fp16 or bf16")
        if self.precision == "int8" and self.int8_model is None:
            raise ValueError("PRECISION=int8 needs INT8_MODEL=FILE, built from your own photos with "
                             "python -m quantize --calibration DIR --out FILE")
        if self.int8_model is not None and self.precision != "int8":
            raise ValueError("INT8_MODEL is set but PRECISION is not int8: set PRECISION=int8 to serve it, or unset INT8_MODEL")
        if self.model_onnx is not None:
            if self.model_weights is not None or self.demo:
                raise ValueError("MODEL_ONNX serves the weights its file was exported from: unset MODEL_WEIGHTS and "
                                 "DEMO (they choose what python -m export exports)")
            if self.precision != "fp32" or self.device == "cuda":
                raise ValueError("MODEL_ONNX runs in fp32 on the CPU (ONNX Runtime): unset PRECISION and DEVICE, "
                                 "or serve with torch (unset MODEL_ONNX)")
        if self.demo and self.model_weights is not None:
            raise ValueError("DEMO=true serves stand-in weights: unset MODEL_WEIGHTS, or unset DEMO to serve that file")
        if self.webhook_allowed_hosts and not self.webhook_secret:
            raise ValueError("WEBHOOK_ALLOWED_HOSTS is set but WEBHOOK_SECRET is not: webhooks are always signed")
        if self.max_batch_files > self.max_queue:
            raise ValueError(f"MAX_BATCH_FILES={self.max_batch_files} must not exceed MAX_QUEUE={self.max_queue}: "
                             "a full batch request could never be admitted")
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings from these environment variables (default: the process's). Raises SettingsError."""
        try:
            if env is None:
                return cls()
            given = {name.lower(): value for name, value in env.items() if name.lower() in cls.model_fields and value.strip()}
            return _Given(**given)
        except ValidationError as error:
            raise SettingsError(_sentence(error)) from None


class _Given(Settings):
    """Settings from the variables a caller gives (Settings.from_env(mapping)), the process's environment unread."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **environment_and_files):  # noqa: ANN001, ANN206
        return (init_settings,)


class SettingsError(ValueError):
    """A setting has a value the service cannot run with."""


# Pydantic's error types -> one line that names the variable and what it accepts.
_SENTENCES = {
    "int_parsing": "{name}={raw!r} is not a whole number",
    "int_from_float": "{name}={raw!r} is not a whole number",
    "float_parsing": "{name}={raw!r} is not a number",
    "bool_parsing": "{name}={raw!r} must be true or false",
    "greater_than_equal": "{name}={raw} must be at least {ge:g}",
    "finite_number": "{name}={raw} must be at least {ge:g}",
    "less_than_equal": "{name}={raw} must be at most {le:g}",
    "string_too_short": "{name} must not be empty",
    "literal_error": "{name}={raw!r} must be one of {expected}",
}


def _sentence(error: ValidationError) -> str:
    """Pydantic's report -> one line that names the variable and what it accepts, e.g. THREADS=0 must be at least 1."""
    for problem in error.errors():
        kind, context = problem["type"], problem.get("ctx") or {}
        if kind == "default_factory_not_called":  # a consequence of another field's error
            continue
        if kind == "value_error":
            return str(context.get("error", problem["msg"]))
        name = str(problem["loc"][0]).upper() if problem["loc"] else ""
        sentence = _SENTENCES.get(kind, "{name}={raw!r}: {msg}")
        return sentence.format(name=name, raw=problem.get("input"), msg=problem["msg"], ge=context.get("ge", 0),
                               le=context.get("le", 0), expected=str(context.get("expected", "")).replace(" or ", ", "))
    return str(error)


_current: Settings | None = None


def get_settings() -> Settings:
    """The service's settings, read from the environment on first use. An invalid one stops the process with
    one line. Modules call this when they need a value, never keep a copy: tests replace them with use()."""
    global _current
    if _current is None:
        try:
            _current = Settings.from_env()
        except SettingsError as error:
            raise SystemExit(f"Invalid setting: {error}") from None
    return _current


def use(settings: Settings | None) -> None:
    """Replace the settings every module reads (None: read the environment again on next use)."""
    global _current
    _current = settings
