"""New weights under load: the default replica at c=8, first without reloads, then with a SIGHUP every
`--seconds` alternating two sets of weights (six reloads), every answer checked against the scores of the version
its X-Model-Version names.

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


Answers = list[tuple[int, str, dict, float]]  # status, version, scores, latency (s)


def load(url: str, photo: bytes, seconds: float, during: threading.Thread | None = None) -> tuple[Answers, float]:
    """CONCURRENCY clients posting the photo for `seconds` (or while `during` runs): the answers, and the time."""
    answers: Answers = []
    started = time.monotonic()
    deadline = started + seconds

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while (during.is_alive() if during else time.monotonic() < deadline):
                started = time.perf_counter()
                response = http.post(url, files={"file": ("photo.jpg", photo, "image/jpeg")})
                took = time.perf_counter() - started
                scores = {p["index"]: p["score"] for p in response.json().get("predictions", [])}
                answers.append((response.status_code, response.headers.get("X-Model-Version", ""), scores, took))

    clients = [threading.Thread(target=client) for _ in range(CONCURRENCY)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    return answers, time.monotonic() - started


def measure(seconds: float) -> tuple[list[dict], list[Verdict]]:
    work = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    env = service_env(work)
    first, second = Path(env["MODEL_WEIGHTS"]), other_weights(work)
    served = work / "served.pth"
    shutil.copyfile(first, served)
    photo = imagenet_size_jpeg()
    server = start_server({**env, "MODEL_WEIGHTS": str(served)})
    url = f"{server.url}/predict/topk?k=5"
    reloader = Reloader(server, served)
    try:
        expected = {}
        for weights in (second, first):  # each loaded once (its export and timings kept), and its answer known
            reloader.to(weights)
            answer = httpx.post(url, files={"file": ("photo.jpg", photo, "image/jpeg")}, timeout=60)
            expected[answer.headers["X-Model-Version"]] = {p["index"]: p["score"] for p in answer.json()["predictions"]}
        load(url, photo, 3)  # warm-up
        steady, steady_s = load(url, photo, seconds * 3)
        rss_before = server.rss_mib()
        outcomes: list[str] = []

        def reloads() -> None:
            for turn in range(RELOADS):
                time.sleep(seconds)
                outcomes.append(reloader.to(second if turn % 2 == 0 else first)["outcome"])
            time.sleep(seconds)

        reloading = threading.Thread(target=reloads)
        reloading.start()
        during, during_s = load(url, photo, 0, during=reloading)
        rss_after = server.rss_mib()
    finally:
        server.stop()

    def row(name: str, answers: Answers, elapsed: float) -> dict:
        ok = [took for status, _, _, took in answers if status == 200]
        return {"row": name, "requests": len(answers), "non_200": len(answers) - len(ok), "ok_per_s": round(len(ok) / elapsed, 1),
                "p50_ms": round(percentile(ok, 50) * 1000, 1), "p99_ms": round(percentile(ok, 99) * 1000, 1)}

    rows = [row(f"c={CONCURRENCY}, no reload", steady, steady_s),
            row(f"c={CONCURRENCY}, a reload every {seconds:g} s", during, during_s)]
    mismatched = sum(1 for status, version, scores, _ in during if status == 200 and (
        version not in expected or any(abs(scores.get(i, -1) - s) > 1e-5 for i, s in expected[version].items())))
    versions = {version for _, version, _, _ in during}
    rows.append({"row": "reloads: outcomes, memory", "outcomes": outcomes, "versions_answered": len(versions),
                 "answers_not_matching_their_version": mismatched, "rss_before_mib": round(rss_before),
                 "rss_after_mib": round(rss_after)})
    print_rows(rows)
    steady_row, during_row = rows[0], rows[1]
    p99_ratio = during_row["p99_ms"] / steady_row["p99_ms"]
    rss_growth = rss_after / rss_before - 1
    targets: list[Verdict] = [
        (f"{RELOADS} reloads under load: 0 non-200 answers", "met" if during_row["non_200"] == 0 else "MISS",
         f"{during_row['non_200']} of {during_row['requests']} ({outcomes.count('loaded')} reloads loaded)"),
        ("every answer's X-Model-Version matches its scores", "met" if mismatched == 0 and len(versions) == 2 else "MISS",
         f"{mismatched} of {during_row['requests']} did not; {len(versions)} versions answered"),
        ("p99 during reloads <= 1.5x without", "met" if p99_ratio <= 1.5 else "MISS",
         f"{p99_ratio:.2f}x ({during_row['p99_ms']} vs {steady_row['p99_ms']} ms)"),
        ("RSS after the reloads within 5 % of before the first", "met" if abs(rss_growth) <= 0.05 else "MISS",
         f"{rss_growth:+.1%} ({round(rss_before)} -> {round(rss_after)} MiB)"),
    ]
    return rows, targets


def main() -> None:
    measure_and_write(__doc__, REPO / "docs" / "results" / "reload.json", measure, reloads=RELOADS)


if __name__ == "__main__":
    main()
