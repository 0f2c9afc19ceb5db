"""BACKEND=auto, the default where the forward pass is fp32 on a CPU: of the runtimes that give the reference
answers, the one that is fastest on this machine, measured at start-up and remembered.

    weights --export to ONNX (once per weights, kept in RUNTIME_CACHE_DIR)--> ONNX Runtime ─┐
    weights --torch_forward (BatchNorm folded, channels_last)--> torch ───────────────────────┤
        each checked against fp32 torch (<= 1e-4, torch_runtime.check_parity), then timed on one image
        and on a full batch --> the one whose two times add up to less serves

Which is faster depends on the CPU and its libraries, not on the answers (both are checked): on a 2-core Xeon
with AMX, ONNX Runtime took 13 ms for one image where torch took 19. One image is what a request pays at low
load, a full batch what each image pays at full load: the sum weighs both.

A restart with the same weights on the same machine (CPU, THREADS, MAX_BATCH_SIZE, torch and ONNX Runtime
versions) reads the export and the choice from RUNTIME_CACHE_DIR: it measures nothing and serves with the same
runtime. BACKEND=torch or BACKEND=onnxruntime pins one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]  # images [N, 3, 224, 224] -> logits [N, 1000]


@dataclass(frozen=True)
class Choice:
    """Which runtime serves, and the timings that chose it (GET /model shows them)."""

    backend: str
    timings_ms: dict[str, dict[str, float]]  # runtime -> batch size -> ms of the fastest of a few forward passes
    remembered: bool  # read from RUNTIME_CACHE_DIR, measured by an earlier start on this machine


def best_time(forward: Forward, batch: torch.Tensor, tries: int = 3) -> float:
    """Seconds of the fastest of `tries` forward passes over batch, after one untimed (warm-up)."""
    with torch.inference_mode():
        forward(batch)
        times = []
        for _ in range(tries):
            started = time.perf_counter()
            forward(batch)
            times.append(time.perf_counter() - started)
    return min(times)


def machine(threads: int, batch_size: int) -> str:
    """What decides the runtimes' speeds besides the weights, as a short hash: the CPU (its name and flags),
    THREADS, the full batch, and the libraries' versions."""
    from classifier.inference.runtimes.onnx_runtime import import_onnxruntime

    onnxruntime = import_onnxruntime()
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    described = [line for line in cpu.splitlines() if line.startswith(("model name", "flags"))][:2]
    parts = [*described, f"threads={threads}", f"batch={batch_size}", torch.__version__, onnxruntime.__version__]
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=8).hexdigest()


def kept(path: Path, make: Callable[[], bytes]) -> bytes:
    """The file's bytes, or make()'s, then kept at path for the next start."""
    try:
        return path.read_bytes()
    except OSError:
        pass
    made = make()
    keep(path, made)
    return made


def keep(path: Path, data: bytes) -> None:
    """Write atomically (a crash never leaves half a file under the name); a cache that cannot be written costs
    time at the next start, not this one: a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as error:
        log.warning("RUNTIME_CACHE_DIR=%s cannot be written (%s): the next start exports and measures again",
                    path.parent, error.strerror or error)


def remembered(record: Path) -> Choice | None:
    """The choice an earlier start with these weights on this machine made, if record holds one."""
    try:
        earlier = json.loads(record.read_text())
        return Choice(str(earlier["backend"]), dict(earlier["timings_ms"]), remembered=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def choose(candidates: dict[str, Forward], record: Path, batch_size: int) -> Choice:
    """The fastest of candidates (each already checked), measured now and kept in record for the next start."""
    probe = {size: torch.rand(size, 3, 224, 224, generator=torch.Generator().manual_seed(2)) for size in (1, batch_size)}
    # A full batch takes ~100 ms on a 2-core CPU: two tries of it keep start-up short.
    timings = {name: {str(size): round(best_time(forward, batch, tries=3 if size == 1 else 2) * 1000, 1)
                      for size, batch in probe.items()}
               for name, forward in candidates.items()}
    backend = min(timings, key=lambda name: sum(timings[name].values()))
    keep(record, json.dumps({"backend": backend, "timings_ms": timings}).encode())
    return Choice(backend, timings, remembered=False)
