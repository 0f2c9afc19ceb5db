"""A caller's deadline is known to the pipeline: X-Request-Timeout-Ms over HTTP (capped by REQUEST_TIMEOUT_S),
Triton's `timeout` parameter on /v2, the gRPC deadline (tests/test_grpc.py). An image past its deadline is
dropped before it is decoded or before its forward pass, the request answered 504, the drop counted by stage;
a deadline that passes costs nothing to the requests that share its batch or its bytes."""

from __future__ import annotations

import base64
import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from support import in_process, metric, photo_bytes, upload, wait_until

pytestmark = pytest.mark.app

FORWARD_DELAY_S = 0.4  # long enough for a short deadline to pass while an image waits behind another's pass


@contextmanager
def slowed(settings, runtime, tmp_path, **changes: str) -> Iterator[tuple[object, list[int]]]:
    """An app on the session's model whose forward pass takes FORWARD_DELAY_S longer (settings changed as
    given), and the size of each batch that reached it."""
    from app import create_app
    from classifier.settings import Settings

    batches: list[int] = []

    def predict(batch):
        batches.append(len(batch))
        time.sleep(FORWARD_DELAY_S)
        return runtime.predict(batch)

    env = {"MODEL_WEIGHTS": str(settings.model_weights), "GRPC_PORT": "0", "RUNTIME_CACHE_DIR": str(settings.runtime_cache_dir),
           "JOBS_DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.sqlite3'}", **changes}
    with in_process(create_app(Settings.from_env(env), dataclasses.replace(runtime, predict=predict))) as client:
        yield client, batches


@pytest.fixture
def slow(settings, runtime, tmp_path) -> Iterator[tuple[object, list[int]]]:
    with slowed(settings, runtime, tmp_path) as app:
        yield app


def occupied(client, batches: list[int]) -> threading.Thread:
    """A request whose forward pass is under way when this returns: the next image queues behind it."""
    busy = threading.Thread(target=lambda: client.post("/predict", files=upload(photo_bytes("coffee.png"))))
    busy.start()
    wait_until(lambda: batches)
    return busy


def dropped(client, stage: str) -> float:
    return metric(client.get("/metrics").text, "deadline_exceeded_images_total", stage=stage)


def test_an_image_whose_deadline_passes_in_the_queue_never_reaches_a_forward_pass(slow):
    client, batches = slow
    before = dropped(client, "forward")
    busy = occupied(client, batches)

    started = time.monotonic()
    late = client.post("/predict", files=upload(photo_bytes("chelsea.png")), headers={"X-Request-Timeout-Ms": "150"})
    answered_in = time.monotonic() - started
    assert late.status_code == 504 and "deadline" in late.json()["detail"]
    assert answered_in < FORWARD_DELAY_S  # at its deadline, not after the pass it waited behind
    busy.join()
    wait_until(lambda: dropped(client, "forward") == before + 1)
    assert batches == [1]  # chelsea never went through a forward pass
    assert metric(client.get("/metrics").text, "rejected_requests_total", reason="deadline_exceeded") >= 1

    # Its bytes are not at fault: the same photo without a deadline is answered, not refused from the cache.
    again = client.post("/predict", files=upload(photo_bytes("chelsea.png")))
    assert again.status_code == 200 and batches == [1, 1]


def test_a_deadline_already_past_is_refused_before_decoding(client):
    before = dropped(client, "received")
    late = client.post("/predict", files=upload(photo_bytes("rocket.jpg")), headers={"X-Request-Timeout-Ms": "0.001"})
    assert late.status_code == 504
    assert dropped(client, "received") == before + 1


def test_a_deadline_long_enough_changes_nothing(client):
    plain = client.post("/predict/topk", files=upload(photo_bytes("astronaut.png")))
    timed = client.post("/predict/topk", files=upload(photo_bytes("astronaut.png")), headers={"X-Request-Timeout-Ms": "30000"})
    assert timed.status_code == plain.status_code == 200 and timed.json() == plain.json()


@pytest.mark.parametrize("value", ["soon", "-5", "0", "nan", "inf"])
def test_a_malformed_timeout_header_is_a_bad_request_that_names_it(client, value):
    answer = client.post("/predict", files=upload(photo_bytes("coffee.png")), headers={"X-Request-Timeout-Ms": value})
    assert answer.status_code == 400 and "X-Request-Timeout-Ms" in answer.json()["detail"]


def test_the_header_is_capped_by_request_timeout(settings, runtime, tmp_path):
    # REQUEST_TIMEOUT_S lowered below the forward pass it waits behind: the header's minute is not granted.
    with slowed(settings, runtime, tmp_path, REQUEST_TIMEOUT_S="0.1") as (client, batches):
        busy = occupied(client, batches)
        started = time.monotonic()
        capped = client.post("/predict", files=upload(photo_bytes("chelsea.png")), headers={"X-Request-Timeout-Ms": "60000"})
        assert capped.status_code == 504 and time.monotonic() - started < FORWARD_DELAY_S
        busy.join()


def test_triton_timeout_parameter_on_v2(client):
    def infer(parameters: dict) -> httpx.Response:
        document = {"parameters": parameters, "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                         "data": [base64.b64encode(photo_bytes("coffee.png")).decode()]}]}
        return client.post("/v2/models/resnet18/infer", json=document)

    late = infer({"timeout": 1})  # microseconds, as Triton counts them
    assert late.status_code == 504 and "deadline" in late.json()["error"]
    assert infer({"timeout": 0}).status_code == 200  # Triton's "no timeout"
    assert infer({"timeout": 30_000_000}).status_code == 200
    for wrong in ("soon", -1, 1.5, True):
        refused = infer({"timeout": wrong})
        assert refused.status_code == 400 and "timeout" in refused.json()["error"]


def test_identical_bytes_without_a_deadline_are_answered_when_the_first_callers_deadline_passes(slow):
    client, batches = slow
    busy = occupied(client, batches)
    answers: dict[str, int] = {}

    def send(name: str, headers: dict[str, str]) -> None:
        answers[name] = client.post("/predict", files=upload(photo_bytes("chelsea.png")), headers=headers).status_code

    senders = [threading.Thread(target=send, args=("hurried", {"X-Request-Timeout-Ms": "150"})),
               threading.Thread(target=send, args=("patient", {}))]
    for sender in senders:
        sender.start()
    for sender in [*senders, busy]:
        sender.join()
    assert answers == {"hurried": 504, "patient": 200}


def test_the_openapi_document_offers_the_deadline_where_it_is_honoured(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/predict", "/predict/topk", "/predict/batch", "/v2/models/{name}/infer"):
        operation = paths[path]["post"]
        assert "X-Request-Timeout-Ms" in [parameter["name"] for parameter in operation["parameters"]]
        assert "504" in operation["responses"]
    assert not any("X-Request-Timeout-Ms" in str(operation) for operation in paths["/jobs"].values())


def test_a_deadline_the_queue_would_outlast_is_never_decoded(slow):
    client, batches = slow
    assert client.post("/predict", files=upload(photo_bytes("rocket.jpg"))).status_code == 200  # one pass timed
    busy = occupied(client, batches)
    before = dropped(client, "received")
    started = time.monotonic()
    hopeless = client.post("/predict", files=upload(photo_bytes("chelsea.png")), headers={"X-Request-Timeout-Ms": "150"})
    assert hopeless.status_code == 504 and "could not be met" in hopeless.json()["detail"]
    assert 0.15 <= time.monotonic() - started < FORWARD_DELAY_S  # at its deadline, never decoded
    assert dropped(client, "received") == before + 1
    busy.join()
    assert batches == [1, 1]
