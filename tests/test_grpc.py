"""The Open Inference Protocol over gRPC, driven by the real tritonclient[grpc] against a real server: health,
metadata, photos (BYTES) and preprocessed batches (FP32) with the same answers as /v2 over HTTP and
/predict/topk, every error as its status code, the API key, and overload refused while HTTP still answers."""

from __future__ import annotations

import io
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as tritonclient
from PIL import Image
from torchvision.models import ResNet18_Weights
from tritonclient.utils import InferenceServerException

from support import (API_KEY, PHOTOS, Server, corrupt_png, encode, free_port, large_jpeg, metric, photo, photo_bytes,
                     start_server, upload, wait_until)

pytestmark = pytest.mark.server

MODEL = "resnet18"


def grpc_server(tmp: Path, **env: str) -> tuple[Server, str]:
    port = free_port()
    return start_server(tmp, GRPC_PORT=str(port), **env), f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(weights_file, tmp_path_factory) -> tuple[Server, tritonclient.InferenceServerClient]:
    server, address = grpc_server(tmp_path_factory.mktemp("grpc"), CACHE_ENTRIES="0")
    yield server, tritonclient.InferenceServerClient(address)
    server.stop()


def photos_input(datas: list[bytes]) -> tritonclient.InferInput:
    image = tritonclient.InferInput("image", [len(datas)], "BYTES")
    image.set_data_from_numpy(np.array(datas, dtype=np.object_))
    return image


def test_health_metadata_and_readiness_agree_with_http(served):
    server, client = served
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    version = httpx.get(f"{server.url}/model").json()["version"]
    assert client.is_model_ready(MODEL, version) and not client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("resnet50")
    assert httpx.get(f"{server.url}/ready").status_code == 200
    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert metadata["name"] == MODEL and metadata["versions"] == [version]
    assert {(t["name"], t["datatype"], tuple(map(int, t["shape"]))) for t in metadata["inputs"]} == {
        ("image", "BYTES", (-1,)), ("input", "FP32", (-1, 3, 224, 224))}
    assert {"binary_tensor_data", "classification"} <= set(client.get_server_metadata(as_json=True)["extensions"])
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("resnet50")
    assert unknown.value.status() == "StatusCode.NOT_FOUND" and "unknown model 'resnet50'" in unknown.value.message()


def test_photos_as_bytes_match_the_reference_and_predict_topk(served, reference):
    server, client = served
    datas = [photo_bytes(name) for name in PHOTOS] + [large_jpeg("coffee.png", 1500)]
    result = client.infer(MODEL, [photos_input(datas)],
                          outputs=[tritonclient.InferRequestedOutput("probabilities"),
                                   tritonclient.InferRequestedOutput("probabilities", class_count=5)])
    full = result.as_numpy("probabilities")
    assert full.shape == (len(datas), 1000) and full.dtype == np.float32
    for row, data in zip(full, datas):
        assert np.abs(row - reference(Image.open(io.BytesIO(data))).numpy()).max() < 1e-5
    strings = client.infer(MODEL, [photos_input(datas)],
                           outputs=[tritonclient.InferRequestedOutput("probabilities", class_count=5)]).as_numpy("probabilities")
    assert strings.shape == (len(datas), 5)
    for row, data in zip(strings, datas):
        expected = httpx.post(f"{server.url}/predict/topk?k=5", files=upload(data), timeout=60).json()["predictions"]
        parsed = [element.decode().split(":", 2) for element in row]
        assert [(int(index), label) for _, index, label in parsed] == [(p["index"], p["label"]) for p in expected]
        assert all(abs(float(score) - p["score"]) < 1e-6 for (score, _, _), p in zip(parsed, expected))


def test_a_preprocessed_fp32_batch(served, reference):
    _, client = served
    transforms = ResNet18_Weights.DEFAULT.transforms()
    batch = torch.stack([transforms(photo(name).convert("RGB")) for name in PHOTOS]).numpy()
    tensor = tritonclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    result = client.infer(MODEL, [tensor], request_id="batch-1")
    assert result.get_response().id == "batch-1"
    for row, name in zip(result.as_numpy("probabilities"), PHOTOS):
        assert np.abs(row - reference(photo(name)).numpy()).max() < 1e-5


def failure(client, *inputs, model: str = MODEL, **options) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, list(inputs), **options)
    return raised.value


def test_every_error_is_its_status_code_and_names_the_problem(served):
    server, client = served
    bad = failure(client, photos_input([photo_bytes("chelsea.png"), b"not an image", photo_bytes("coffee.png")]))
    assert bad.status() == "StatusCode.INVALID_ARGUMENT" and "element 1 of input 'image'" in bad.message()
    assert failure(client, photos_input([corrupt_png()])).status() == "StatusCode.INVALID_ARGUMENT"
    svg = failure(client, photos_input([b'<svg xmlns="http://www.w3.org/2000/svg"/>']))
    assert svg.status() == "StatusCode.INVALID_ARGUMENT" and "SVG" in svg.message()
    too_many = failure(client, photos_input([photo_bytes("chelsea.png")] * 33))
    assert too_many.status() == "StatusCode.RESOURCE_EXHAUSTED" and "MAX_BATCH_FILES" in too_many.message()
    too_large = failure(client, photos_input([b"\xff\xd8" + bytes(21 * 1024 * 1024)]))  # over MAX_UPLOAD_BYTES
    assert too_large.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert failure(client, photos_input([photo_bytes("chelsea.png")]), model="resnet50").status() == "StatusCode.NOT_FOUND"
    wrong = tritonclient.InferInput("pixels", [1], "BYTES")
    wrong.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    unknown = failure(client, wrong)
    assert unknown.status() == "StatusCode.INVALID_ARGUMENT" and "unknown input 'pixels'" in unknown.message()
    nan = tritonclient.InferInput("input", [1, 3, 224, 224], "FP32")
    nan.set_data_from_numpy(np.full((1, 3, 224, 224), np.nan, dtype=np.float32))
    assert "finite" in failure(client, nan).message()
    k = failure(client, photos_input([photo_bytes("chelsea.png")]),
                outputs=[tritonclient.InferRequestedOutput("probabilities", class_count=1001)])
    assert k.status() == "StatusCode.INVALID_ARGUMENT" and "classification" in k.message()
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'^grpc_requests_total\{code="INVALID_ARGUMENT",method="ModelInfer"\} [1-9]', metrics, re.M)


def test_a_bad_photo_fails_only_its_own_call(served, reference):
    _, client = served
    good = [photo_bytes(name) for name in PHOTOS]
    calls = [good, good[:2] + [corrupt_png()], good[1:], [good[0]], good[::-1]]

    def send(datas: list[bytes]):
        try:
            return client.infer(MODEL, [photos_input(datas)]).as_numpy("probabilities")
        except InferenceServerException as error:
            return error

    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(send, calls))
    assert isinstance(answers[1], InferenceServerException) and answers[1].status() == "StatusCode.INVALID_ARGUMENT"
    for datas, answer in zip(calls, answers):
        if datas is not calls[1]:
            expected = np.stack([reference(Image.open(io.BytesIO(data))).numpy() for data in datas])
            assert np.abs(answer - expected).max() < 1e-5


@pytest.fixture(scope="module")
def guarded_grpc(weights_file, tmp_path_factory) -> tuple[Server, str]:
    server, address = grpc_server(tmp_path_factory.mktemp("grpc-guarded"), API_KEY=API_KEY, MAX_QUEUE="4",
                                  MAX_BATCH_FILES="4", CACHE_ENTRIES="0")
    yield server, address
    server.stop()


def test_the_api_key_as_metadata(guarded_grpc):
    _, address = guarded_grpc
    client = tritonclient.InferenceServerClient(address)
    for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": API_KEY + "x"}):
        refused = failure(client, photos_input([photo_bytes("chelsea.png")]), headers=headers)
        assert refused.status() == "StatusCode.UNAUTHENTICATED" and "API key" in refused.message()
    for headers in ({"authorization": f"Bearer {API_KEY}"}, {"x-api-key": API_KEY}):
        assert client.infer(MODEL, [photos_input([photo_bytes("chelsea.png")])], headers=headers
                            ).as_numpy("probabilities").shape == (1, 1000)
    assert client.is_server_ready() and client.get_model_metadata(MODEL, as_json=True)["name"] == MODEL  # open


def test_overload_is_unavailable_on_grpc_while_http_still_answers(guarded_grpc):
    server, address = guarded_grpc
    key = {"authorization": f"Bearer {API_KEY}"}
    four = [large_jpeg(name, 1200, seed=i) for i, name in enumerate(PHOTOS)]

    def send(_: int) -> str:
        client = tritonclient.InferenceServerClient(address)
        try:
            client.infer(MODEL, [photos_input(four)], headers=dict(key))
            return "OK"
        except InferenceServerException as error:
            return error.status()

    for _ in range(10):  # 8 calls of 4 images against a queue of 4: the overlap is what is tested
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(send, range(8)))
            online = httpx.get(f"{server.url}/health")  # HTTP meanwhile
        if "StatusCode.UNAVAILABLE" in codes:
            break
    assert set(codes) == {"OK", "StatusCode.UNAVAILABLE"} and online.status_code == 200
    after = httpx.post(f"{server.url}/predict", files=upload(photo_bytes("coffee.png")), headers={"X-API-Key": API_KEY})
    assert after.status_code == 200


def test_sigterm_drains_a_call_in_flight_and_refuses_new_ones(weights_file, tmp_path):
    server, address = grpc_server(tmp_path, SHUTDOWN_TIMEOUT_S="60", REQUEST_TIMEOUT_S="120", CACHE_ENTRIES="0")
    big = [encode(photo("astronaut.png").convert("RGB").resize((3000, 2250)), "JPEG", quality=95)] * 4
    answers: list[object] = []

    def call() -> None:
        try:
            answers.append(tritonclient.InferenceServerClient(address).infer(MODEL, [photos_input(big)]).as_numpy("probabilities").shape)
        except InferenceServerException as error:
            answers.append(error.status())

    sender = threading.Thread(target=call)
    sender.start()
    deadline = time.monotonic() + 60
    while "images_in_flight 0.0" in httpx.get(f"{server.url}/metrics").text:
        assert time.monotonic() < deadline and sender.is_alive()
        time.sleep(0.005)
    server.process.send_signal(signal.SIGTERM)
    sender.join(120)
    assert answers == [(4, 1000)]
    assert server.process.wait(60) in (0, -signal.SIGTERM)


def test_the_generated_code_is_what_the_proto_makes(tmp_path):
    """classifier/v2/protos/inference_pb2*.py are committed (the service needs no grpcio-tools); make protos
    regenerates them."""
    import shutil
    import subprocess
    import sys

    from support import REPO

    protos = Path("classifier", "v2", "protos")
    (tmp_path / protos).mkdir(parents=True)
    shutil.copy(REPO / protos / "inference.proto", tmp_path / protos)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
                    str(protos / "inference.proto")], cwd=tmp_path, check=True)
    for name in ("inference_pb2.py", "inference_pb2_grpc.py"):
        assert (tmp_path / protos / name).read_text() == (REPO / protos / name).read_text(), f"run make protos ({name})"


def test_tritons_timeout_and_the_grpc_deadline_are_honoured(served):
    server, client = served

    def dropped() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(metric(text, "deadline_exceeded_images_total", stage=stage)
                   for stage in ("received", "decode", "forward", "answer"))

    before = dropped()
    late = failure(client, photos_input([photo_bytes("coffee.png")]), timeout=1)  # Triton's parameter, microseconds
    assert late.status() == "StatusCode.DEADLINE_EXCEEDED" and "deadline" in late.message()
    assert dropped() == before + 1

    # The call's own deadline (tritonclient's client_timeout), shorter than decoding four photos and their pass.
    four = [large_jpeg(name, 1200, seed=i) for i, name in enumerate(PHOTOS)]
    late = failure(client, photos_input(four), client_timeout=0.02)
    assert late.status() == "StatusCode.DEADLINE_EXCEEDED"
    wait_until(lambda: dropped() >= before + 2)  # the server dropped them too, rather than computing for nobody
    on_time = client.infer(MODEL, [photos_input([photo_bytes("coffee.png")])], timeout=30_000_000, client_timeout=60)
    assert on_time.as_numpy("probabilities").shape == (1, 1000)
