"""New weights in a running replica: SIGHUP loads the file MODEL_WEIGHTS names again beside the model serving,
checks it as start-up does and swaps it in between two forward passes. Under load no request fails and every
answer's X-Model-Version is the version whose scores it carries; a broken file leaves the old version serving
and says why; a job keeps the version it was submitted to."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import httpx
import pytest
import torch
from torchvision.models import resnet34

from support import (Server, metric, other_weights, photo, photo_bytes, results, start_server, submit, upload, variants, wait_for,
                     wait_until)

pytestmark = pytest.mark.server

PHOTO = "coffee.png"


def put(weights: Path, served: Path) -> None:
    """New weights under the name MODEL_WEIGHTS gives, as a deployment puts them: written beside, then renamed."""
    staged = served.with_suffix(".new")
    shutil.copyfile(weights, staged)
    os.replace(staged, served)


def model(server: Server) -> dict:
    return httpx.get(f"{server.url}/model", timeout=10).json()


def reload(server: Server, outcome: str) -> dict:
    """SIGHUP, then the reload's record once it has one newer than the last (GET /model's last_reload)."""
    before = model(server)["last_reload"]
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: model(server)["last_reload"] not in (None, before), timeout_s=120)
    last = model(server)["last_reload"]
    assert last["outcome"] == outcome, last
    return last


def scores(answer: dict) -> dict[int, float]:
    return {prediction["index"]: prediction["score"] for prediction in answer["predictions"]}


@pytest.fixture
def served(weights_file: Path, tmp_path: Path) -> tuple[Server, Path]:
    path = tmp_path / "weights" / "resnet18.pth"
    path.parent.mkdir()
    shutil.copyfile(weights_file, path)
    # The cache off: every answer below is computed, so each one shows the model that made it.
    server = start_server(tmp_path / "server", MODEL_WEIGHTS=str(path), CACHE_ENTRIES="0")
    yield server, path
    server.stop()


def test_reloads_under_load_fail_no_request_and_each_answer_names_the_weights_that_made_it(
        served, weights_file, tmp_path, reference):
    server, path = served
    other = other_weights(tmp_path)
    first = model(server)["version"]
    answers: list[tuple[int, str | None, dict]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                response = http.post(f"{server.url}/predict/topk?k=5", files=upload(photo_bytes(PHOTO)))
                answers.append((response.status_code, response.headers.get("X-Model-Version"), response.json()))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        versions = [first]
        for weights in (other, weights_file, other):  # back and forth, while four clients keep asking
            put(weights, path)
            count = len(answers)
            last = reload(server, "loaded")
            versions.append(model(server)["version"])
            assert last["detail"] == f"version {versions[-1]} replaced {versions[-2]}"
            wait_until(lambda: len(answers) > count + 8)  # answers before and after the swap
    finally:
        stop.set()
        for thread in clients:
            thread.join()

    assert versions[0] == versions[2] != versions[1] == versions[3]
    assert {status for status, _, _ in answers} == {200}, "no request may fail during a reload"
    by_version: dict[str, list[dict]] = {}
    for _, version, answer in answers:
        by_version.setdefault(version, []).append(scores(answer))
    assert set(by_version) == {versions[0], versions[1]}
    for version, seen in by_version.items():  # one model's answer per version, never the other's
        assert all(s.keys() == seen[0].keys() and all(abs(s[i] - seen[0][i]) < 1e-5 for i in s) for s in seen), version
    expected = reference(photo(PHOTO))  # the first weights' answers are still the reference pipeline's
    assert all(abs(score - expected[index].item()) < 1e-5 for index, score in by_version[first][0].items())
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'model_reloads_total{outcome="loaded"} 3.0' in metrics
    assert f'model_version_info{{version="{versions[-1]}"}} 1.0' in metrics
    assert f'model_version_info{{version="{first}"}}' not in metrics


@pytest.mark.parametrize("broken", ["truncated", "another architecture", "not weights"])
def test_a_broken_file_leaves_the_old_version_serving_and_says_why(served, tmp_path, broken):
    server, path = served
    before = model(server)["version"]
    bad = tmp_path / "bad.pth"
    if broken == "truncated":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif broken == "another architecture":
        torch.save(resnet34().state_dict(), bad)
    else:
        bad.write_text("weights\n")
    put(bad, path)
    last = reload(server, "refused")
    assert f"MODEL_WEIGHTS={path}" in last["detail"]
    response = httpx.post(f"{server.url}/predict", files=upload(photo_bytes(PHOTO)), timeout=60)
    assert response.status_code == 200 and response.headers["X-Model-Version"] == before == model(server)["version"]
    assert 'model_reloads_total{outcome="refused"} 1.0' in httpx.get(f"{server.url}/metrics").text


def test_the_same_file_again_changes_nothing(served):
    server, _ = served
    before = model(server)
    last = reload(server, "unchanged")
    assert before["version"] in last["detail"] and model(server)["loaded_at"] == before["loaded_at"]


def test_a_job_submitted_before_a_reload_keeps_its_version(weights_file, tmp_path):
    path = tmp_path / "weights" / "resnet18.pth"
    path.parent.mkdir()
    shutil.copyfile(weights_file, path)
    # One image per forward pass (not 8): the reload comes with most of the job still to do.
    server = start_server(tmp_path / "server", MODEL_WEIGHTS=str(path), CACHE_ENTRIES="0", MAX_BATCH_SIZE="1")
    try:
        job = submit(server, variants(120)).json()
        wait_for(server, job["id"], lambda j: j["done"] >= 2)
        put(other_weights(tmp_path), path)
        reload(server, "loaded")
        new = model(server)["version"]
        assert new != job["model_version"]
        answered = results(server, job["id"])
        assert answered and {entry.get("model_version") for entry in answered} == {job["model_version"]}, [e for e in answered if "error" in e][:3]
        # The rest waits for its version (none serves it now) until moved or canceled: nothing of the new is mixed in.
        wait_until(lambda: metric(httpx.get(f"{server.url}/metrics").text, "job_images_waiting_for_other_version") > 0)
        assert httpx.post(f"{server.url}/jobs/{job['id']}/adopt").status_code == 409
        assert {entry["model_version"] for entry in results(server, job["id"])} == {job["model_version"]}
        online = httpx.post(f"{server.url}/predict", files=upload(photo_bytes(PHOTO)), timeout=60)
        assert online.headers["X-Model-Version"] == new
    finally:
        server.stop()
