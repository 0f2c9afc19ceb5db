"""New weights under load: the default replica at c=8, in windows of `--seconds` taken in turn, one without a
reload and one that starts with a SIGHUP (six reloads, alternating two sets of weights), every answer checked
against the scores of the version its X-Model-Version names.

    python -m bench.reload [--seconds 10] [--out docs/results/reload.json]

Run by make bench; the performance page publishes its file with its own machine and date. Each set of weights is
loaded once before the measured runs, as a rollout's first replica would: BACKEND=auto's export and timings are
then on disk, and what is measured is the swap, not a first export.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.harness import (REPO, Server, Verdict, imagenet_size_jpeg, measure_and_write, other_weights, percentile,
                           print_rows, service_env, start_server)

RELOADS = 6
CONCURRENCY = 8


class Reloader:
    """Puts weights under the served name and sends SIGHUP; waits for GET /model to say the reload ended."""

    def __init__(self, server: Server, served: Path) -> None:
        self.server, self.served = server, served

    def to(self, weights: Path) -> dict:
        staged = self.served.with_suffix(".new")
        shutil.copyfile(weights, staged)
        os.replace(staged, self.served)
        before = self.model()["last_reload"]
        self.server.process.send_signal(signal.SIGHUP)
        while (last := self.model()["last_reload"]) in (None, before):
            time.sleep(0.05)
        return last

    def model(self) -> dict:
        return httpx.get(f"{self.server.url}/model", timeout=30).json()


Answer = tuple[float, int, str, dict, float]  # sent at (monotonic), status, version, scores, latency (s)


def load(url: str, photo: bytes, during: threading.Thread) -> list[Answer]:
    """CONCURRENCY clients posting the photo while `during` runs."""
    answers: list[Answer] = []

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while during.is_alive():
                sent = time.monotonic()
                response = http.post(url, files={"file": ("photo.jpg", photo, "image/jpeg")})
                took = time.monotonic() - sent
                scores = {p["index"]: p["score"] for p in response.json().get("predictions", [])}
                answers.append((sent, response.status_code, response.headers.get("X-Model-Version", ""), scores, took))

    clients = [threading.Thread(target=client) for _ in range(CONCURRENCY)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    return answers


def measure(seconds: float) -> tuple[list[dict], list[Verdict]]:
    """Windows of `seconds` in turn under one steady load: one without a reload, then one that starts with a reload,
    RELOADS times, so drift on the machine falls on both alike."""
    work = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    env = service_env(work)
    first, second = Path(env["MODEL_WEIGHTS"]), other_weights(work)
    served = work / "served.pth"
    shutil.copyfile(first, served)
    photo = imagenet_size_jpeg()
    server = start_server({**env, "MODEL_WEIGHTS": str(served)})
    url = f"{server.url}/predict/topk?k=5"
    reloader = Reloader(server, served)
    windows: dict[str, list[tuple[float, float]]] = {"quiet": [], "reload": []}
    outcomes: list[str] = []
    rss: dict[str, float] = {}
    try:
        expected = {}
        for weights in (second, first):  # each loaded once (its export and timings kept), and its answer known
            reloader.to(weights)
            answer = httpx.post(url, files={"file": ("photo.jpg", photo, "image/jpeg")}, timeout=60)
            expected[answer.headers["X-Model-Version"]] = {p["index"]: p["score"] for p in answer.json()["predictions"]}

        def windows_in_turn() -> None:
            time.sleep(3)  # warm-up
            rss["before"] = server.rss_mib()
            Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")  # VmHWM from now on: the peak while reloading
            for turn in range(RELOADS):
                opened = time.monotonic()
                time.sleep(seconds)
                windows["quiet"].append((opened, time.monotonic()))
                opened = time.monotonic()
                outcomes.append(reloader.to(second if turn % 2 == 0 else first)["outcome"])
                time.sleep(max(0.0, seconds - (time.monotonic() - opened)))
                windows["reload"].append((opened, time.monotonic()))
            rss["after"], rss["peak"] = server.rss_mib(), server.rss_mib("VmHWM")

        turns = threading.Thread(target=windows_in_turn)
        turns.start()
        answers = load(url, photo, turns)
    finally:
        server.stop()

    def row(name: str, phase: str) -> dict:
        inside = [a for a in answers if any(opened <= a[0] < closed for opened, closed in windows[phase])]
        ok = [took for _, status, _, _, took in inside if status == 200]
        elapsed = sum(closed - opened for opened, closed in windows[phase])
        return {"row": name, "requests": len(inside), "non_200": len(inside) - len(ok), "ok_per_s": round(len(ok) / elapsed, 1),
                "p50_ms": round(percentile(ok, 50) * 1000, 1), "p99_ms": round(percentile(ok, 99) * 1000, 1)}

    measured = [a for a in answers if a[0] >= windows["quiet"][0][0]]
    mismatched = sum(1 for _, status, version, scores, _ in measured if status == 200 and (
        version not in expected or any(abs(scores.get(i, -1) - s) > 1e-5 for i, s in expected[version].items())))
    versions = {version for _, _, version, _, _ in measured}
    non_200 = sum(1 for _, status, _, _, _ in measured if status != 200)
    rows = [row(f"c={CONCURRENCY}, {seconds:g} s windows without a reload", "quiet"),
            row(f"c={CONCURRENCY}, {seconds:g} s windows that start with a reload", "reload"),
            {"row": "reloads: outcomes, memory", "outcomes": outcomes, "versions_answered": len(versions),
             "answers_not_matching_their_version": mismatched, "rss_before_mib": round(rss["before"]),
             "rss_after_mib": round(rss["after"]), "peak_rss_while_reloading_mib": round(rss["peak"])}]
    print_rows(rows)
    quiet, reloading = rows[0], rows[1]
    p99_ratio = reloading["p99_ms"] / quiet["p99_ms"]
    rss_growth = rss["after"] / rss["before"] - 1
    targets: list[Verdict] = [
        (f"{RELOADS} reloads under load: 0 non-200 answers", "met" if non_200 == 0 else "MISS",
         f"{non_200} of {len(measured)} ({outcomes.count('loaded')} reloads loaded)"),
        ("every answer's X-Model-Version matches its scores", "met" if mismatched == 0 and len(versions) == 2 else "MISS",
         f"{mismatched} of {len(measured)} did not; {len(versions)} versions answered"),
        ("p99 during reloads <= 1.5x without", "met" if p99_ratio <= 1.5 else "MISS",
         f"{p99_ratio:.2f}x ({reloading['p99_ms']} vs {quiet['p99_ms']} ms)"),
        ("RSS after the reloads within 5 % of before the first", "met" if abs(rss_growth) <= 0.05 else "MISS",
         f"{rss_growth:+.1%} ({round(rss['before'])} -> {round(rss['after'])} MiB)"),
        ("memory during a reload: two models at once (no target)", "measured",
         f"peak RSS while reloading {round(rss['peak'])} MiB, {round(rss['peak'] - rss['before']):+} MiB over serving alone"),
    ]
    return rows, targets


def main() -> None:
    measure_and_write(__doc__, REPO / "docs" / "results" / "reload.json", measure, reloads=RELOADS)


if __name__ == "__main__":
    main()
