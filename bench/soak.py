"""Soak: many requests with bad inputs mixed in; no 5xx allowed, memory must stay flat.

    python -m bench.soak [--requests 20000] [--concurrency 32] [--bad-every 20]

Starts the service, warms it up, then drives it with `wrk` (Debian package `wrk`: light on CPU) whose
Lua script sends an ImageNet-size JPEG, and every `--bad-every`-th request one of several broken uploads
(5 % by default). Prints the counts by status, latency percentiles and the RSS before and after.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from bench.harness import BOUNDARY, hey, imagenet_size_jpeg, multipart, service_env, start_server

LUA = r"""
local bodies, threads = {}, {}
local sent, answered, limit, bad_every = 0, 0, 0, 0
statuses = {}

local function read(path)
  local file = assert(io.open(path, "rb")); local data = file:read("*a"); file:close(); return data
end

function setup(thread) table.insert(threads, thread) end

function init(args)
  limit, bad_every = tonumber(args[1]), tonumber(args[2])
  for i = 3, #args do bodies[#bodies + 1] = read(args[i]) end
end

function request()
  sent = sent + 1
  local body = bodies[1]
  if sent % bad_every == 0 then body = bodies[2 + math.floor(sent / bad_every) % (#bodies - 1)] end
  return wrk.format("POST", "/predict", {["Content-Type"] = "multipart/form-data; boundary=BOUNDARY"}, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  answered = answered + 1
  if answered >= limit then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local totals = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do totals[status] = (totals[status] or 0) + count end
  end
  for status, count in pairs(totals) do io.write(string.format("status %d %d\n", status, count)) end
  for _, p in ipairs({50, 90, 99, 99.9}) do io.write(string.format("p%s %.1f\n", p, latency:percentile(p) / 1000)) end
  io.write(string.format("errors connect=%d read=%d write=%d timeout=%d\n", summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout))
end
""".replace("BOUNDARY", BOUNDARY)


def bad_uploads() -> dict[str, bytes]:
    jpeg = imagenet_size_jpeg()
    bomb = io.BytesIO()
    Image.new("L", (8000, 8000)).save(bomb, "PNG")  # 64 megapixels of zeros in about 60 KB
    return {
        "text": b"this is not an image\n" * 50,
        "truncated": jpeg[: len(jpeg) // 3],
        "empty": b"",
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "bomb": bomb.getvalue(),
    }


def predict_requests(url: str) -> int:
    """POST /predict requests the service has answered, from its own metrics."""
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    return int(sum(float(n) for n in re.findall(r'^http_requests_total\{endpoint="/predict",method="POST",status="\d+"\} (\S+)$',
                                                  metrics, re.M)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bad-every", type=int, default=20, help="one bad upload every N requests (20: 5 %%)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    env = service_env(work)
    bodies = [work / "good.multipart"]
    bodies[0].write_bytes(multipart(imagenet_size_jpeg()))
    for name, data in bad_uploads().items():
        bodies.append(work / f"{name}.multipart")
        bodies[-1].write_bytes(multipart(data, f"{name}.bin"))
    script = work / "soak.lua"
    script.write_text(LUA)

    service = start_server(env)
    rss_started = service.rss_mib()
    hey(f"{service.url}/predict", args.concurrency, requests=500, body=bodies[0])  # warm-up
    rss_warm = service.rss_mib()
    threads = 2
    print(f"soak: {args.requests} requests, concurrency {args.concurrency}, one bad upload in {args.bad_every}", flush=True)
    answered_before = predict_requests(service.url)
    wrk = subprocess.Popen(
        ["wrk", "-t", str(threads), "-c", str(args.concurrency), "-d", "60m", "--timeout", "30s", "-s", str(script),
         service.url, "--", str(args.requests // threads), str(args.bad_every), *map(str, bodies)],
        stdout=subprocess.PIPE, text=True,
    )
    # The Lua script stops sending at the count, but wrk sleeps out its whole -d before reporting;
    # SIGINT ends that sleep. The server's own counter says when every request is answered.
    while predict_requests(service.url) - answered_before < args.requests and wrk.poll() is None:
        time.sleep(0.5)
    wrk.send_signal(signal.SIGINT)
    result_stdout = wrk.communicate(timeout=60)[0]
    rss_end, rss_peak = service.rss_mib(), service.rss_mib("VmHWM")
    alive = service.process.poll() is None
    service.stop()
    shutil.rmtree(work)

    statuses = {int(s): int(n) for s, n in re.findall(r"^status (\d+) (\d+)$", result_stdout, re.M)}
    percentiles = dict(re.findall(r"^(p[\d.]+) ([\d.]+)$", result_stdout, re.M))
    rate = re.search(r"Requests/sec:\s+([\d.]+)", result_stdout)
    errors = re.search(r"^errors .*$", result_stdout, re.M)
    server_errors = sum(n for s, n in statuses.items() if s >= 500)
    growth = (rss_end - rss_warm) / rss_warm * 100
    print(f"statuses: {dict(sorted(statuses.items()))} (total {sum(statuses.values())})")
    print(f"latency ms: {', '.join(f'{p} {v}' for p, v in percentiles.items())}; {rate.group(1) if rate else '?'} req/s")
    print(f"socket {errors.group(0) if errors else 'errors: none reported'}")
    print(f"RSS: {rss_started:.0f} MiB at start, {rss_warm:.0f} MiB after warm-up, {rss_end:.0f} MiB at the end"
          f" ({growth:+.1f} %), peak {rss_peak:.0f} MiB; server alive: {alive}")
    ok = server_errors == 0 and growth < 5 and alive
    print("PASS: zero 5xx, RSS growth under 5 %" if ok else f"FAIL: {server_errors} 5xx, RSS growth {growth:+.1f} %")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
