"""The service on a CUDA GPU: same answers, errors and batching as on the CPU. Skipped without a GPU.

Run them on a machine with one: `.venv/bin/python -m pytest -q tests/test_gpu.py`.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from support import PHOTOS, photo, photo_bytes, start_server

pytestmark = [pytest.mark.server, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def scores_of(server, data: bytes) -> torch.Tensor:
    answer = httpx.post(f"{server.url}/predict/topk?k=1000", files={"file": ("photo", data)}, timeout=60).json()
    scores = torch.zeros(1000)
    for p in answer["predictions"]:
        scores[p["index"]] = p["score"]
    return scores


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-4), ("fp16", 1e-2), ("bf16", 1e-2)])
def test_gpu_answers_match_the_cpu_reference(weights_file, reference, tmp_path, precision, tolerance):
    server = start_server(tmp_path, DEVICE="cuda", PRECISION=precision)
    try:
        info = httpx.get(f"{server.url}/model").json()
        assert info["device"].startswith("cuda (") and info["precision"] == precision
        assert info["max_batch_size"] == 32 and info["max_score_difference"] < tolerance
        for name in PHOTOS:
            assert (scores_of(server, photo_bytes(name)) - reference(photo(name))).abs().max().item() < tolerance
        # A bad image in a batch fails alone; the others are classified as usual.
        files = [("files", ("good.png", photo_bytes("chelsea.png"))), ("files", ("bad.png", b"not an image")),
                 ("files", ("good.jpg", photo_bytes("rocket.jpg")))]
        results = httpx.post(f"{server.url}/predict/batch?k=1", files=files, timeout=60).json()["results"]
        assert [("error" in r) for r in results] == [False, True, False]
        assert results[1]["error"]["status"] == 400
        assert httpx.post(f"{server.url}/predict", files={"file": ("x", b"")}).status_code == 400
        assert "inference_batch_size_count" in httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
