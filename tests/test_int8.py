"""PRECISION=int8: python -m quantize builds the model from the service's weights and real photos; the service
serves it, says so, isolates a bad image, agrees with bench/accuracy.py's offline evaluation, and refuses a
model made from other weights, a missing or corrupt file, and int8 without a model."""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from support import PHOTOS, REPO, Server, assert_refused, photo_bytes, start_server

pytestmark = pytest.mark.unit


CALIBRATION = ("motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png",
               "camera.png", "moon.png", "coins.png", "brick.png", "grass.png", "gravel.png")


def calibration_photos(folder: Path) -> Path:
    """scikit-image's photographs other than the ones the tests compare answers on, and one unreadable file."""
    folder.mkdir()
    data = importlib.resources.files("skimage") / "data"
    for name in CALIBRATION:
        shutil.copy(data / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"not a photo")
    return folder


@pytest.fixture(scope="module")
def int8_model(weights_file, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("int8")
    out = work / "resnet18-int8.onnx"
    result = subprocess.run([sys.executable, "-m", "quantize", "--calibration", str(calibration_photos(work / "photos")),
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "MODEL_WEIGHTS": str(weights_file)})
    assert result.returncode == 0, result.stderr
    assert f"calibrated on {len(CALIBRATION)} photos" in result.stderr and "skipped" in result.stderr and out.is_file()
    return out


@pytest.fixture(scope="module")
def int8_server(int8_model, weights_file, tmp_path_factory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("int8-server"), PRECISION="int8", INT8_MODEL=str(int8_model),
                          CACHE_ENTRIES="0")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def offline_scores(int8_model, runtime, service) -> dict[str, torch.Tensor]:
    """bench/accuracy.py's int8 path on the test photos: the scores every door must give."""
    from bench.accuracy import logits_of
    from classifier.inference.runtimes import torch_runtime

    forward, _ = torch_runtime.int8_forward(int8_model, 2, runtime.weights_hash)
    logits = logits_of([service.prepare(photo_bytes(name)) for name in PHOTOS], forward)
    return dict(zip(PHOTOS, torch.softmax(logits, 1)))


def assert_scores(predictions: list[dict], expected: torch.Tensor) -> None:
    assert len(predictions) == 1000
    assert max(abs(p["score"] - expected[p["index"]].item()) for p in predictions) < 1e-5


@pytest.mark.server
def test_the_service_serves_int8_and_says_how_it_was_made(int8_server, int8_model, runtime):
    served = httpx.get(f"{int8_server.url}/model").json()
    assert (served["precision"], served["backend"]) == ("int8", "onnxruntime")
    assert httpx.get(f"{int8_server.url}/v2/models/resnet18").json()["platform"] == "onnxruntime_onnx"  # what runs it
    made = served["int8"]
    assert made["weights"] == runtime.weights_hash and made["calibration_images"] == len(CALIBRATION)
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted((int8_model.parent / "photos").iterdir()):
        if path.name != "broken.jpg":
            digest.update(hashlib.blake2b(path.read_bytes(), digest_size=16).digest())
    assert made["calibration_hash"] == digest.hexdigest() and made["calibration_method"].startswith("nncf")
    assert made["speedup_vs_fp32"] > 1 and 0 < served["max_score_difference"] < 1


@pytest.mark.server
def test_every_door_gives_the_offline_evaluations_scores(int8_server, offline_scores, tmp_path, int8_model):
    for name in PHOTOS:  # /predict/topk
        answer = httpx.post(f"{int8_server.url}/predict/topk?k=1000", files={"file": (name, photo_bytes(name))}, timeout=60)
        assert_scores(answer.json()["predictions"], offline_scores[name])

    body = {"inputs": [{"name": "image", "shape": [len(PHOTOS)], "datatype": "BYTES",  # /v2
                        "data": [base64.b64encode(photo_bytes(name)).decode() for name in PHOTOS]}]}
    answer = httpx.post(f"{int8_server.url}/v2/models/resnet18/infer", json=body, timeout=60).json()
    rows = torch.tensor(answer["outputs"][0]["data"]).reshape(len(PHOTOS), 1000)
    assert max((rows[i] - offline_scores[name]).abs().max().item() for i, name in enumerate(PHOTOS)) < 1e-5

    files = [("files", (name, photo_bytes(name), "image/png")) for name in PHOTOS]  # /jobs
    job = httpx.post(f"{int8_server.url}/jobs?k=1000", files=files, timeout=60).json()
    done = httpx.get(f"{int8_server.url}/jobs/{job['id']}", headers={"Prefer": "wait=60"}, timeout=90).json()
    assert done["status"] == "succeeded", done
    entries = httpx.get(f"{int8_server.url}/jobs/{job['id']}/results", timeout=60).json()["results"]
    for name, entry in zip(PHOTOS, entries):
        assert_scores(entry["predictions"], offline_scores[name])

    folder = tmp_path / "photos"  # python -m classify
    folder.mkdir()
    for name in PHOTOS:
        (folder / name).write_bytes(photo_bytes(name))
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "classify", str(folder), "--out", str(out), "--k", "1000"], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PRECISION": "int8", "INT8_MODEL": str(int8_model)})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(line["path"]).name for line in lines) == sorted(PHOTOS)
    for line in lines:
        assert_scores(line["predictions"], offline_scores[Path(line["path"]).name])


@pytest.mark.server
def test_a_bad_image_fails_only_its_own_entry(int8_server):
    files = [("files", (name, photo_bytes(name))) for name in PHOTOS[:2]] + [("files", ("bad.jpg", b"not a photo"))]
    batch = httpx.post(f"{int8_server.url}/predict/batch?k=3", files=files, timeout=60).json()["results"]
    assert [("predictions" in entry, entry.get("error", {}).get("status")) for entry in batch] == [
        (True, None), (True, None), (False, 400)]


@pytest.mark.server
def test_a_model_quantized_from_other_weights_is_refused(int8_model, tmp_path, monkeypatch):
    other = tmp_path / "other.pth"
    torch.manual_seed(1)
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), other)
    assert_refused({"MODEL_WEIGHTS": str(other), "PRECISION": "int8", "INT8_MODEL": str(int8_model)}, tmp_path,
                   monkeypatch, "was quantized from other weights", "python -m quantize")


@pytest.mark.app
def test_a_missing_or_corrupt_int8_model_is_a_clear_error(weights_file, tmp_path, monkeypatch):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model")
    for path, message in ((tmp_path / "missing.onnx", "does not exist"), (corrupt, "is not an ONNX model")):
        assert_refused({"MODEL_WEIGHTS": str(weights_file), "PRECISION": "int8", "INT8_MODEL": str(path)}, tmp_path,
                       monkeypatch, message)


@pytest.mark.app
def test_int8_without_a_model_and_a_model_without_int8_are_refused(weights_file, tmp_path):
    from classifier.settings import Settings, SettingsError

    refusals = (({"PRECISION": "int8"}, "PRECISION=int8 needs INT8_MODEL=FILE"),
                ({"INT8_MODEL": str(tmp_path / "x.onnx")}, "INT8_MODEL is set but PRECISION is not int8"),
                ({"PRECISION": "int8", "INT8_MODEL": str(tmp_path / "x.onnx"), "DEVICE": "cuda"},
                 "PRECISION=int8 runs on the CPU"))
    for env, message in refusals:
        with pytest.raises(SettingsError, match=message):
            Settings.from_env({"MODEL_WEIGHTS": str(weights_file), **env})


def test_int8_slower_than_fp32_is_refused_unless_forced():
    from classifier.inference.runtimes import torch_runtime

    problem = torch_runtime.int8_problem(0.5, 0.4, force=False)
    assert problem and "not faster than fp32" in problem and "FORCE_PRECISION" in problem
    assert torch_runtime.int8_problem(0.5, 0.4, force=True) is None
    assert torch_runtime.int8_problem(0.2, 0.4, force=False) is None


@pytest.mark.server
def test_quantize_needs_enough_photos(weights_file, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    (folder / "one.png").write_bytes(photo_bytes("coffee.png"))
    result = subprocess.run([sys.executable, "-m", "quantize", "--calibration", str(folder), "--out",
                             str(tmp_path / "x.onnx")], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MODEL_WEIGHTS": str(weights_file)})
    assert result.returncode == 2 and "at least 10" in result.stderr and not (tmp_path / "x.onnx").exists()


@pytest.mark.server
@pytest.mark.parametrize(("arguments", "message"), [
    (["--calibration", "missing", "--out", "x.onnx"], "--calibration missing is not a folder"),
    (["--calibration", ".", "--out", "no/such/folder/x.onnx"], "the folder no/such/folder does not exist"),
    (["--calibration", ".", "--out", "x.onnx", "--max-images", "3"], "at least 10 photos are needed"),
])
def test_quantize_refuses_bad_arguments_before_loading_anything(arguments, message, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "quantize.py"), *arguments], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())
