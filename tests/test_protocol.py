"""The Open Inference Protocol, driven by the real tritonclient[http] against a real server: health,
metadata, inference on encoded photos (BYTES) and on preprocessed batches (FP32), the classification and
binary-data extensions, and every error in the protocol's shape. A JSON-only request goes over plain httpx."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as tritonclient
from PIL import Image
from torchvision.models import ResNet18_Weights
from tritonclient.utils import InferenceServerException

from support import API_KEY, PHOTOS, Server, corrupt_png, large_jpeg, metric, photo, photo_bytes, start_server, upload

pytestmark = pytest.mark.server

MODEL = "resnet18"


def client_for(server: Server) -> tritonclient.InferenceServerClient:
    return tritonclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)


def photos_input(datas: list[bytes]) -> tritonclient.InferInput:
    image = tritonclient.InferInput("image", [len(datas)], "BYTES")
    image.set_data_from_numpy(np.array(datas, dtype=np.object_), binary_data=True)
    return image


def probabilities(server: Server, datas: list[bytes], **infer) -> np.ndarray:
    result = client_for(server).infer(MODEL, [photos_input(datas)], **infer)
    return result.as_numpy("probabilities")


def test_health_and_metadata(server: Server):
    client = client_for(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert {"binary_tensor_data", "classification"} <= set(client.get_server_metadata()["extensions"])
    metadata = client.get_model_metadata(MODEL)
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in metadata["inputs"]} == {
        ("image", "BYTES", (-1,)), ("input", "FP32", (-1, 3, 224, 224))}
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]
    assert not client.is_model_ready("resnet50")
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("resnet50")
    assert unknown.value.status() == "404" and "unknown model 'resnet50'" in unknown.value.message()


def test_photos_as_bytes_match_torchvision(server: Server, reference):
    one = probabilities(server, [photo_bytes("chelsea.png")], outputs=[tritonclient.InferRequestedOutput("probabilities")])
    assert one.shape == (1, 1000) and one.dtype == np.float32
    assert np.abs(one[0] - reference(photo("chelsea.png")).numpy()).max() < 1e-5

    datas = [photo_bytes(name) for name in PHOTOS] + [large_jpeg("coffee.png", 1200)]
    several = probabilities(server, datas)  # no outputs named: all of them (JSON here: binary_data_output unset)
    assert several.shape == (len(datas), 1000)
    for row, data in zip(several, datas):
        assert np.abs(row - reference(Image.open(io.BytesIO(data))).numpy()).max() < 1e-5


def test_a_preprocessed_fp32_batch(server: Server, reference):
    transforms = ResNet18_Weights.DEFAULT.transforms()
    batch = torch.stack([transforms(photo(name).convert("RGB")) for name in PHOTOS]).numpy()
    tensor = tritonclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=True)
    result = client_for(server).infer(MODEL, [tensor], outputs=[tritonclient.InferRequestedOutput("probabilities", binary_data=True)])
    for row, name in zip(result.as_numpy("probabilities"), PHOTOS):
        assert np.abs(row - reference(photo(name)).numpy()).max() < 1e-5


def test_classification_strings_equal_predict_topk(server: Server):
    datas = [photo_bytes(name) for name in PHOTOS]
    top = probabilities(server, datas, outputs=[tritonclient.InferRequestedOutput("probabilities", class_count=5)])
    assert top.shape == (len(datas), 5)
    for row, data in zip(top, datas):
        expected = httpx.post(f"{server.url}/predict/topk?k=5", files=upload(data)).json()["predictions"]
        parsed = [element.decode().split(":", 2) for element in row]
        assert [(int(index), label) for _, index, label in parsed] == [(p["index"], p["label"]) for p in expected]
        assert all(abs(float(score) - p["score"]) < 1e-6 for (score, _, _), p in zip(parsed, expected))


def test_errors_in_the_protocols_shape(server: Server):
    client = client_for(server)
    before = httpx.get(f"{server.url}/metrics").text
    with pytest.raises(InferenceServerException) as bad:
        probabilities(server, [photo_bytes("chelsea.png"), b"not an image", photo_bytes("coffee.png")])
    assert bad.value.status() == "400" and "element 1 of input 'image'" in bad.value.message()
    after = httpx.get(f"{server.url}/metrics").text
    bad_images = [metric(text, "rejected_requests_total", reason="bad_image") for text in (before, after)]
    assert bad_images[1] - bad_images[0] == 1  # counted once, as on /predict
    with pytest.raises(InferenceServerException) as broken:
        probabilities(server, [corrupt_png()])
    assert broken.value.status() == "400"
    with pytest.raises(InferenceServerException) as too_many:
        probabilities(server, [photo_bytes("chelsea.png")] * 33)  # MAX_BATCH_FILES is 32
    assert too_many.value.status() == "413" and "MAX_BATCH_FILES" in too_many.value.message()
    with pytest.raises(InferenceServerException) as too_large:
        probabilities(server, [b"\xff\xd8" + bytes(21 * 1024 * 1024)])  # over MAX_UPLOAD_BYTES (20 MiB)
    assert too_large.value.status() == "413"
    with pytest.raises(InferenceServerException) as wrong_input:
        wrong = tritonclient.InferInput("pixels", [1], "BYTES")
        wrong.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
        client.infer(MODEL, [wrong])
    assert wrong_input.value.status() == "400" and "unknown input 'pixels'" in wrong_input.value.message()

    # The same, raw: every error body is {"error": "<message>"}, each with its one status.
    infer = f"{server.url}/v2/models/{MODEL}/infer"
    for response, status, fragment in (
        (httpx.post(infer, content=b"{not json"), 400, "not a valid inference request"),
        (httpx.post(f"{server.url}/v2/models/resnet50/infer", json={"inputs": []}), 404, "unknown model 'resnet50'"),
        (httpx.post(f"{server.url}/v2/models/{MODEL}/versions/2/infer", json={"inputs": []}), 404, "version '2'"),
        *((httpx.post(infer, content=json.dumps(
            {"inputs": [{"name": "input", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [value] * 150528}]})),
           400, fragment)  # NaN (Python's JSON writes it), and a number beyond FP32
          for value, fragment in ((float("nan"), "finite"), (1e39, "finite"))),
        (httpx.post(infer, content=b'{"inputs": []}', headers={"Inference-Header-Content-Length": "999"}), 400,
         "Inference-Header-Content-Length"),
    ):
        assert response.status_code == status and set(response.json()) == {"error"}, response.text
        assert fragment in response.json()["error"], response.text


def test_the_versioned_routes_answer_like_the_plain_ones(server: Server, reference):
    version = httpx.get(f"{server.url}/model").json()["version"]  # the weights' and precision's (Runtime.version)
    versioned = f"{server.url}/v2/models/{MODEL}/versions/{version}"
    assert httpx.get(versioned).json() == httpx.get(f"{server.url}/v2/models/{MODEL}").json()
    assert httpx.get(f"{versioned}/ready").status_code == 200
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/1/ready").status_code == 404
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(photo_bytes("rocket.jpg")).decode()]}]}
    response = httpx.post(f"{versioned}/infer", json=body, timeout=60)
    answer = response.json()
    assert (answer["model_name"], answer["model_version"]) == (MODEL, version)
    assert response.headers["X-Model-Version"] == version
    assert np.abs(np.array(answer["outputs"][0]["data"]) - reference(photo("rocket.jpg")).numpy()).max() < 1e-5


def test_a_bad_photo_fails_only_its_own_request(server: Server, reference):
    """Requests arriving together share dynamic batches; the bad one fails alone."""
    good = [photo_bytes(name) for name in PHOTOS]

    def send(datas: list[bytes]):
        try:
            return probabilities(server, datas)
        except InferenceServerException as error:
            return error

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, [good, good[:2] + [corrupt_png()], good[1:], [good[0]], good, good[::-1]]))
    assert isinstance(answers[1], InferenceServerException) and answers[1].status() == "400"
    for datas, answer in zip([good, None, good[1:], [good[0]], good, good[::-1]], answers):
        if datas is not None:
            expected = np.stack([reference(Image.open(io.BytesIO(data))).numpy() for data in datas])
            assert np.abs(answer - expected).max() < 1e-5


def test_a_json_only_request(server: Server, reference):
    data = photo_bytes("coffee.png")
    body = {"id": "req-7", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                        "data": [base64.b64encode(data).decode()]}],
            "outputs": [{"name": "probabilities"}, {"name": "probabilities", "parameters": {"classification": 3}}]}
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    answer = response.json()
    assert (answer["model_name"], answer["id"]) == (MODEL, "req-7")
    full, top = answer["outputs"]
    assert (full["datatype"], full["shape"]) == ("FP32", [1, 1000])
    assert np.abs(np.array(full["data"]) - reference(photo("coffee.png")).numpy()).max() < 1e-5
    assert (top["datatype"], top["shape"]) == ("BYTES", [1, 3]) and int(top["data"][0].split(":")[1]) == int(np.argmax(full["data"]))


@pytest.fixture(scope="module")
def small_queue(weights_file: Path, tmp_path_factory: pytest.TempPathFactory):
    server = start_server(tmp_path_factory.mktemp("protocol"), MAX_QUEUE="4", MAX_BATCH_FILES="4", API_KEY=API_KEY)
    yield server
    server.stop()


def test_the_api_key_and_overload(small_queue: Server):
    client = client_for(small_queue)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": API_KEY + "x"}):
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL, [photos_input([photo_bytes("chelsea.png")])], headers=headers)
        assert refused.value.status() == "401" and "API key" in refused.value.message()
    versioned = httpx.post(f"{small_queue.url}/v2/models/{MODEL}/versions/any/infer", json={"inputs": []},
                           headers={"Authorization": "Bearer wrong"})
    assert versioned.status_code == 401 and set(versioned.json()) == {"error"}
    key = {"X-API-Key": API_KEY}
    result = client.infer(MODEL, [photos_input([photo_bytes("chelsea.png")])], headers=dict(key))  # it adds to the dict
    assert result.as_numpy("probabilities").shape == (1, 1000)
    assert client.is_server_ready()  # health and metadata stay open, like /ready

    four = [photo_bytes(name) for name in PHOTOS]

    def send(_: int) -> httpx.Response:
        body = {"inputs": [{"name": "image", "shape": [4], "datatype": "BYTES",
                            "data": [base64.b64encode(data).decode() for data in four]}]}
        return httpx.post(f"{small_queue.url}/v2/models/{MODEL}/infer", json=body, headers=key, timeout=60)

    for _ in range(10):  # 8 requests of 4 images at once against a queue of 4: the overlap is what is tested
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(send, range(8)))
        if any(r.status_code == 503 for r in responses):
            break
    refused = [r for r in responses if r.status_code == 503]
    assert refused and all(r.headers["retry-after"] and "MAX_QUEUE" in r.json()["error"] for r in refused)
    assert {r.status_code for r in responses} == {200, 503}
