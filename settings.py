"""Every setting of the service, read from environment variables in one place."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path


def _cores() -> int:
    # sched_getaffinity respects container CPU sets; cpu_count() does not.
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
    return 512 * 1024 * 1024 if limit is None else max(16 * 1024 * 1024, limit // 4)


class SettingsError(ValueError):
    """A setting has a value the service cannot run with."""


def _int(env: dict[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def _float(env: dict[str, str], name: str, default: float, minimum: float = 0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not value >= minimum:  # also refuses nan
        raise SettingsError(f"{name}={raw} must be at least {minimum}")
    return value


def _choice(env: dict[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        raise SettingsError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise SettingsError(f"{name}={raw!r} must be true or false")
    return raw in ("1", "true", "yes", "on")


def _webhook_secret(env: dict[str, str]) -> str | None:
    """WEBHOOK_SECRET, in the Standard Webhooks form: whsec_ followed by base64 (e.g. 24 random bytes)."""
    raw = env.get("WEBHOOK_SECRET", "").strip()
    if not raw:
        return None
    try:
        key = base64.b64decode(raw.removeprefix("whsec_") + "==", validate=True)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise SettingsError("WEBHOOK_SECRET must be whsec_ followed by at least 16 base64-encoded random bytes "
                            "(python -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(24)).decode())\")")
    return raw


def _list(env: dict[str, str], name: str) -> list[str]:
    return [item.strip() for item in env.get(name, "").split(",") if item.strip()]


@dataclass(frozen=True)
class Settings:
    model_weights: Path | None
    backend: str
    device: str
    precision: str
    force_precision: bool
    threads: int
    decode_workers: int
    jpeg_draft: bool
    max_batch_size: int | None  # None: the device's default (model.DEFAULT_BATCH_SIZE)
    max_batch_delay_s: float
    max_queue: int
    max_batch_files: int
    request_timeout_s: float
    max_upload_bytes: int
    max_body_buffer_bytes: int
    max_image_pixels: int
    cors_origins: list[str]
    api_key: str | None = field(repr=False)
    log_level: str
    log_format: str
    shutdown_timeout_s: float
    jobs_database_url: str
    max_job_files: int
    max_job_bytes: int
    jobs_max_pending_bytes: int
    job_ttl_s: float
    job_lease_s: float
    webhook_secret: str | None = field(repr=False)
    webhook_allowed_hosts: list[str]
    webhook_first_retry_s: float

    def __post_init__(self) -> None:
        if self.backend == "onnxruntime" and (self.device == "cuda" or self.precision != "fp32"):
            raise SettingsError("BACKEND=onnxruntime runs in fp32 on the CPU: DEVICE=cuda and PRECISION need BACKEND=torch")
        if self.max_upload_bytes > self.max_body_buffer_bytes:
            raise SettingsError(
                f"MAX_UPLOAD_BYTES={self.max_upload_bytes} must not exceed MAX_BODY_BUFFER_BYTES={self.max_body_buffer_bytes}: "
                "the largest accepted upload could never be received"
            )
        if self.max_job_bytes > self.max_body_buffer_bytes:
            raise SettingsError(
                f"MAX_JOB_BYTES={self.max_job_bytes} must not exceed MAX_BODY_BUFFER_BYTES={self.max_body_buffer_bytes}: "
                "the largest accepted job could never be received"
            )
        if self.webhook_allowed_hosts and not self.webhook_secret:
            raise SettingsError("WEBHOOK_ALLOWED_HOSTS is set but WEBHOOK_SECRET is not: webhooks are always signed")
        if self.max_batch_files > self.max_queue:
            raise SettingsError(
                f"MAX_BATCH_FILES={self.max_batch_files} must not exceed MAX_QUEUE={self.max_queue}: "
                "a full batch request could never be admitted"
            )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        weights = env.get("MODEL_WEIGHTS", "").strip()
        body_budget = _int(env, "MAX_BODY_BUFFER_BYTES", default_body_budget())
        return cls(
            model_weights=Path(weights).expanduser() if weights else None,
            backend=_choice(env, "BACKEND", "torch", ("torch", "onnxruntime")),
            device=_choice(env, "DEVICE", "auto", ("auto", "cpu", "cuda")),
            precision=_choice(env, "PRECISION", "fp32", ("fp32", "bf16", "fp16")),
            force_precision=_bool(env, "FORCE_PRECISION", False),
            threads=_int(env, "THREADS", _cores()),
            decode_workers=_int(env, "DECODE_WORKERS", _cores()),
            jpeg_draft=_bool(env, "JPEG_DRAFT", False),
            max_batch_size=_int(env, "MAX_BATCH_SIZE", 0) or None,
            max_batch_delay_s=_float(env, "MAX_BATCH_DELAY_MS", 5) / 1000,
            max_queue=_int(env, "MAX_QUEUE", 64),
            max_batch_files=_int(env, "MAX_BATCH_FILES", 32),
            request_timeout_s=_float(env, "REQUEST_TIMEOUT_S", 10, minimum=0.01),
            max_upload_bytes=_int(env, "MAX_UPLOAD_BYTES", 20 * 1024 * 1024),
            max_body_buffer_bytes=body_budget,
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", 50_000_000),
            cors_origins=_list(env, "CORS_ORIGINS"),
            api_key=env.get("API_KEY", "").strip() or None,
            log_level=_choice(env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            log_format=_choice(env, "LOG_FORMAT", "text", ("text", "json")),
            shutdown_timeout_s=_float(env, "SHUTDOWN_TIMEOUT_S", 20),
            jobs_database_url=env.get("JOBS_DATABASE_URL", "").strip() or "sqlite:///data/jobs.sqlite3",
            max_job_files=_int(env, "MAX_JOB_FILES", 1000),
            max_job_bytes=_int(env, "MAX_JOB_BYTES", min(256 * 1024 * 1024, body_budget)),
            jobs_max_pending_bytes=_int(env, "JOBS_MAX_PENDING_BYTES", 2 * 1024**3),
            job_ttl_s=_float(env, "JOB_TTL_S", 86400, minimum=1),
            job_lease_s=_float(env, "JOB_LEASE_S", 60, minimum=1),
            webhook_secret=_webhook_secret(env),
            webhook_allowed_hosts=[host.lower() for host in _list(env, "WEBHOOK_ALLOWED_HOSTS")],
            webhook_first_retry_s=_float(env, "WEBHOOK_FIRST_RETRY_S", 7.5, minimum=0.01),
        )


try:
    settings = Settings.from_env()
except SettingsError as error:
    raise SystemExit(f"Invalid setting: {error}") from None
