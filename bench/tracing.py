"""What tracing costs: the default replica with tracing off, and on with every request sampled and exported over
OTLP/HTTP to a receiver on this machine, at c=8 in one run (runs interleaved: off, on, off, on).

    python -m bench.tracing [--seconds 10] [--out docs/results/tracing.json]

Run by make bench after bench/benchmark.py; the performance page publishes its file with its own machine and
date. The runs with tracing off, apart, say what noise is on this machine.
"""

from __future__ import annotations

import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.harness import (REPO, Server, Verdict, hey, imagenet_size_jpeg, measure_and_write, multipart, percentile,
                           print_rows, service_env, start_server)
from bench.latency import verdict

ROUNDS = 3


class Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that takes every export and keeps only its size (a collector elsewhere would
    decode it; here it would take the cores the service is measured on)."""

    received_bytes = 0

    def do_POST(self) -> None:
        Receiver.received_bytes += len(self.rfile.read(int(self.headers["content-length"])))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def measure(seconds: float) -> tuple[list[dict], list[Verdict]]:
    work = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    env = service_env(work)
    body = work / "imagenet.multipart"
    body.write_bytes(multipart(imagenet_size_jpeg()))
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    traced = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_address[1]}",
              "OTEL_TRACES_SAMPLER": "always_on"}
    servers: dict[str, Server] = {}
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    answered: dict[str, list[float]] = {"off": [], "on": []}  # every 200's latency over the rounds
    try:
        for name, extra in (("off", {}), ("on", traced)):
            servers[name] = start_server({**env, **extra})
            hey(f"{servers[name].url}/predict", 8, seconds=2, body=body)  # warm-up
        for _ in range(ROUNDS):
            for name in ("off", "on"):
                load = hey(f"{servers[name].url}/predict", 8, seconds=seconds, body=body)
                runs[name].append({"ok_per_s": round(load.ok_per_s, 1), "p50_ms": round(load.percentile(50) * 1000, 1),
                                   "p99_ms": round(load.percentile(99) * 1000, 1), "statuses": load.statuses})
                answered[name] += load.latencies_s.get("200", [])
    finally:
        for server in servers.values():
            server.stop()
        receiver.shutdown()
    rows = []
    for name, measured in runs.items():
        # Percentiles of all the rounds' answers together: a 10 s run's p99 is its 5th slowest answer, and moves by
        # 15 % from one run to the next here.
        rows.append({"row": f"tracing {name} c=8" + (" (every request sampled, exported)" if name == "on" else ""),
                     "ok_per_s": round(sum(run["ok_per_s"] for run in measured) / len(measured), 1),
                     "p50_ms": round(percentile(answered[name], 50) * 1000, 1),
                     "p99_ms": round(percentile(answered[name], 99) * 1000, 1),
                     "runs": measured, **({"exported_bytes": Receiver.received_bytes} if name == "on" else {})})
    off, on = rows
    alone = [run["ok_per_s"] for run in runs["off"]]
    checked = [
        verdict("tracing on, all sampled: c=8 throughput >= 0.97x off", on["ok_per_s"], off["ok_per_s"], least=0.97,
                what=" req/s"),
        verdict("tracing on, all sampled: c=8 p99 <= 1.1x off", on["p99_ms"], off["p99_ms"], most=1.1, what=" ms"),
    ]
    noise = (max(alone) - min(alone)) / max(off["ok_per_s"], 1e-9)
    checked.append((f"tracing off: its {ROUNDS} runs apart (the noise here; no target)", "measured",
                    f"{noise:.1%} throughput ({', '.join(f'{rate:g}' for rate in alone)} req/s)"))
    print_rows(rows)
    return rows, checked


def main() -> None:
    measure_and_write(__doc__, REPO / "docs" / "results" / "tracing.json", measure, rounds=ROUNDS)


if __name__ == "__main__":
    main()
