"""A corpus of hostile and unusual uploads, sent over real HTTP to a running server, with torch and slim.

Each has its expected status, and each photo among them gets the reference pipeline's answer for the
picture it shows; after all of them the server answers normally and has written nothing.
"""

from __future__ import annotations

import io

import httpx
import pytest
import torch

from corpus import CORPUS, GOOD
from support import TOLERANCE

pytestmark = pytest.mark.unit

def test_the_corpus_has_at_least_25_cases():
    assert len(CORPUS) >= 25


@pytest.mark.server
@pytest.mark.parametrize("case", CORPUS)
def test_corpus_upload(any_server, reference, case):
    field, filename, data, status, shown = CORPUS[case]
    response = httpx.post(f"{any_server.url}/predict/topk?k=1000", files={field: (filename, data, "application/octet-stream")},
                          timeout=60)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    if status != 200:
        assert isinstance(response.json()["detail"], str)
        return
    answer = torch.zeros(1000)
    for prediction in response.json()["predictions"]:
        answer[prediction["index"]] = prediction["score"]
    assert (answer - reference(shown)).abs().max().item() < TOLERANCE


@pytest.mark.server
@pytest.mark.parametrize(
    ("request_options", "status"),
    [
        ({"json": {"file": "chelsea.png"}}, 422),
        ({"content": b"x" * (60 * 1024 * 1024), "headers": {"content-type": "multipart/form-data; boundary=x"}}, 413),
        ({"content": GOOD, "headers": {"content-type": "image/png"}}, 422),
        ({"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 422),
        ({"content": b"--\r\n", "headers": {"content-type": "multipart/form-data"}}, 400),
    ],
    ids=["JSON body", "60 MB body", "raw image body", "multipart with no part", "multipart without boundary"],
)
def test_corpus_request(any_server, request_options, status):
    response = httpx.post(f"{any_server.url}/predict", timeout=60, **request_options)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["detail"], str)


@pytest.mark.server
def test_after_the_corpus_the_server_answers_normally_and_wrote_nothing(any_server):
    server = any_server
    for case in CORPUS.values():
        field, filename, data, _, _ = case
        httpx.post(f"{server.url}/predict", files={field: (filename, data)}, timeout=60)
    response = httpx.post(f"{server.url}/predict/topk?k=3", files={"file": ("coffee.png", io.BytesIO(GOOD))}, timeout=60)
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 3
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert server.process.poll() is None
    assert list(server.workdir.iterdir()) == []
    assert list(server.tmpdir.iterdir()) == []
