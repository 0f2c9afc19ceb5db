"""Inference never blocks the event loop, and two forward passes never share the cores."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import block_the_worker, photo_bytes, upload

pytestmark = pytest.mark.app


def test_health_answers_while_inference_is_in_flight(client, service, monkeypatch):
    started, release = block_the_worker(service, monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/predict", files=upload(photo_bytes("coffee.png")))
        try:
            assert started.wait(30), "the forward pass never started"
            # The forward pass is stuck until we release it: /health must still answer.
            assert client.get("/health").status_code == 200
            assert not pending.done()
        finally:
            release.set()
        assert pending.result(30).status_code == 200


def test_forward_passes_never_overlap(client, service, monkeypatch, uncached):
    running, most = 0, 0
    lock = threading.Lock()
    real_predict = service.batcher.predict

    def counting_predict(batch):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return real_predict(batch)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(service.batcher, "predict", counting_predict)
    photos = [photo_bytes(name) for name in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")] * 3
    with ThreadPoolExecutor(len(photos)) as pool:
        responses = list(pool.map(lambda data: client.post("/predict", files=upload(data)), photos))
    assert [r.status_code for r in responses] == [200] * len(photos)
    assert most == 1
