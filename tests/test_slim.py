"""The slim replica: python -m export's model file, served by a process where torch cannot be imported, gives
torchvision's reference answers at every door (/predict*, /v2, /jobs, python -m classify), says what it
serves, and refuses to start on a file that does not give torch's answers."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from support import PHOTOS, REPO, TOLERANCE, export, large_jpeg, photo, photo_bytes, torch_is_mapped, without_torch

pytestmark = pytest.mark.server

# Real photos of many sizes: scikit-image's as they ship, and enlarged to a phone's or a camera's as JPEG.
SIZED = {f"{name}:{side}": large_jpeg(name, side) for name in ("chelsea.png", "rocket.jpg") for side in (300, 1200, 3000)}


def scores(answer: dict) -> torch.Tensor:
    found = torch.zeros(1000)
    for prediction in answer["predictions"]:
        found[prediction["index"]] = prediction["score"]
    return found


def difference(found: torch.Tensor, expected: torch.Tensor) -> float:
    return (found - expected).abs().max().item()


def test_predict_gives_the_reference_answers(slim_server, reference):
    for name in PHOTOS:
        answer = httpx.post(f"{slim_server.url}/predict/topk?k=1000", files={"file": (name, photo_bytes(name))}, timeout=60)
        assert difference(scores(answer.json()), reference(photo(name))) < TOLERANCE
    for name, data in SIZED.items():
        answer = httpx.post(f"{slim_server.url}/predict/topk?k=1000", files={"file": ("p.jpg", data)}, timeout=60)
        assert difference(scores(answer.json()), reference(Image.open(io.BytesIO(data)))) < TOLERANCE
    top = httpx.post(f"{slim_server.url}/predict", files={"file": ("c.png", photo_bytes("chelsea.png"))}).json()
    assert top["index"] == int(reference(photo("chelsea.png")).argmax())


def test_v2_gives_the_reference_answers_for_photos_and_for_preprocessed_images(slim_server, reference):
    body = {"inputs": [{"name": "image", "shape": [len(PHOTOS)], "datatype": "BYTES",
                        "data": [base64.b64encode(photo_bytes(name)).decode() for name in PHOTOS]}]}
    answer = httpx.post(f"{slim_server.url}/v2/models/resnet18/infer", json=body, timeout=60).json()
    rows = torch.tensor(answer["outputs"][0]["data"]).reshape(len(PHOTOS), 1000)
    for row, name in zip(rows, PHOTOS):
        assert difference(row, reference(photo(name))) < TOLERANCE

    from torchvision.models import ResNet18_Weights  # this test process has torch; the server does not

    batch = torch.stack([ResNet18_Weights.DEFAULT.transforms()(photo(name).convert("RGB")) for name in PHOTOS]).numpy()
    body = {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32", "data": batch.reshape(-1).tolist()}]}
    answer = httpx.post(f"{slim_server.url}/v2/models/resnet18/infer", json=body, timeout=60).json()
    rows = torch.tensor(answer["outputs"][0]["data"]).reshape(len(PHOTOS), 1000)
    for row, name in zip(rows, PHOTOS):
        assert difference(row, reference(photo(name))) < TOLERANCE
    metadata = httpx.get(f"{slim_server.url}/v2/models/resnet18").json()
    assert metadata["platform"] == "onnxruntime_onnx"


def test_jobs_give_the_reference_answers(slim_server, reference):
    files = [("files", (name, photo_bytes(name), "image/png")) for name in PHOTOS] + [("files", ("bad.txt", b"no"))]
    job = httpx.post(f"{slim_server.url}/jobs?k=1000", files=files, timeout=60).json()
    done = httpx.get(f"{slim_server.url}/jobs/{job['id']}", headers={"Prefer": "wait=60"}, timeout=90).json()
    assert done["status"] == "succeeded", done
    entries = httpx.get(f"{slim_server.url}/jobs/{job['id']}/results", timeout=60).json()["results"]
    for entry, name in zip(entries, PHOTOS):
        assert difference(scores(entry), reference(photo(name))) < TOLERANCE
    assert entries[-1]["error"]["status"] == 400


def test_it_says_it_is_slim_and_which_weights_it_serves(slim_server, server, model_file):
    slim, full = httpx.get(f"{slim_server.url}/model").json(), httpx.get(f"{server.url}/model").json()
    assert (slim["runtime"], slim["backend"], slim["precision"]) == ("slim", "onnxruntime", "fp32")
    assert full["runtime"] == "torch" and full["slim"] is None
    assert slim["weights_hash"] == full["weights_hash"]  # the hash of the weights the file was exported from
    assert slim["version"] == full["version"]  # same weights, same precision: the same answers, the same version
    assert slim["weights"] == full["weights"] and slim["preprocessing"] == full["preprocessing"]
    assert slim["slim"]["model_file"] == model_file.name and slim["slim"]["format"] == "classifier-onnx/1"
    assert slim["slim"]["exported_with"].startswith(f"torch {torch.__version__}")
    assert 0 <= slim["max_score_difference"] <= 1e-4


def test_no_torch_library_is_loaded_in_it(slim_server, server):
    httpx.post(f"{slim_server.url}/predict", files={"file": ("c.png", photo_bytes("chelsea.png"))}, timeout=60)
    assert not torch_is_mapped(slim_server.process.pid)
    assert torch_is_mapped(server.process.pid)  # the check can tell


def test_classify_runs_slim_and_gives_the_reference_answers(model_file, reference, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        (folder / name).write_bytes(photo_bytes(name))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = tmp_path / "results.jsonl"
    result = subprocess.run([sys.executable, "-m", "classify", str(folder), "--out", str(out), "--k", "1000"], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MODEL_ONNX": str(model_file), "MODEL_WEIGHTS": "",
                                 **without_torch(tmp_path / "guard")})
    assert result.returncode == 1, result.stderr  # one file failed
    lines = {Path(line["path"]).name: line for line in map(json.loads, out.read_text().splitlines())}
    for name in PHOTOS:
        assert difference(scores(lines[name]), reference(photo(name))) < TOLERANCE
    assert lines["broken.jpg"]["error"]["status"] == 400


def start_slim(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Load the model as a slim replica's start-up does, in a fresh process without torch."""
    code = ("import sys, model\nfrom classifier import errors, settings\n"
            "try: print(model.load(settings.get_settings()).max_score_difference)\n"
            "except errors.ModelLoadError as error: sys.exit(f'Cannot load the model: {error}')")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MODEL_WEIGHTS": "", **without_torch(tmp_path / "guard"), **env})


def refused(result: subprocess.CompletedProcess, *phrases: str) -> bool:
    return (result.returncode != 0 and "Traceback" not in result.stderr
            and all(phrase in result.stderr for phrase in phrases))


def rewritten(model_file: Path, out: Path, **changes: str) -> Path:
    """A copy of the model file with some of its classifier.* metadata changed."""
    import onnx

    graph = onnx.load(str(model_file))
    for entry in graph.metadata_props:
        if entry.key.removeprefix("classifier.") in changes:
            entry.value = changes[entry.key.removeprefix("classifier.")]
    onnx.save(graph, str(out))
    return out


def test_a_file_whose_probe_torch_disagrees_with_is_refused(model_file, tmp_path):
    from classifier.inference.runtimes import onnx_runtime

    recorded = onnx_runtime.read(model_file, 1)
    shifted = np.roll(recorded.probe_scores, 1, axis=1)  # someone else's answers
    tampered = rewritten(model_file, tmp_path / "tampered.onnx",
                         probe_scores=base64.b64encode(shifted.astype("<f4").tobytes()).decode())
    result = start_slim({"MODEL_ONNX": str(tampered)}, tmp_path)
    assert refused(result, "Cannot load the model", "differ from those torch recorded", "> 1e-04"), result.stderr
    assert float(start_slim({"MODEL_ONNX": str(model_file)}, tmp_path).stdout) <= 1e-4  # the file as written starts


def test_corrupt_missing_and_foreign_files_are_refused(model_file, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_file.read_bytes()[: 10_000_000])
    assert refused(start_slim({"MODEL_ONNX": str(truncated)}, tmp_path), "is not an ONNX model")
    assert refused(start_slim({"MODEL_ONNX": str(tmp_path / "nowhere.onnx")}, tmp_path), "does not exist")
    other_format = rewritten(model_file, tmp_path / "v9.onnx", format="classifier-onnx/9")
    assert refused(start_slim({"MODEL_ONNX": str(other_format)}, tmp_path), "not a model file python -m export wrote")
    broken_labels = rewritten(model_file, tmp_path / "labels.onnx", labels="[not json")
    assert refused(start_slim({"MODEL_ONNX": str(broken_labels)}, tmp_path), "malformed metadata")


def test_settings_that_contradict_a_slim_replica_are_refused(model_file, weights_file, tmp_path):
    both = start_slim({"MODEL_ONNX": str(model_file), "MODEL_WEIGHTS": str(weights_file)}, tmp_path)
    assert refused(both, "Invalid setting: MODEL_ONNX serves the weights its file was exported from")
    bf16 = start_slim({"MODEL_ONNX": str(model_file), "PRECISION": "bf16"}, tmp_path)
    assert refused(bf16, "MODEL_ONNX runs in fp32 on the CPU")


def test_export_checks_its_arguments_and_needs_weights(tmp_path):
    nowhere = export(tmp_path / "missing" / "x.onnx")
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr
    base = {name: value for name, value in os.environ.items() if name != "MODEL_WEIGHTS"}
    without_weights = subprocess.run([sys.executable, "-m", "export", "--out", str(tmp_path / "x.onnx")], cwd=REPO,
                                     capture_output=True, text=True, timeout=300,
                                     env={**base, "TORCH_HOME": str(tmp_path / "empty-torch-home")})
    assert refused(without_weights, "Cannot load the model", "MODEL_WEIGHTS is not set")
    assert list(tmp_path.glob("x.onnx*")) == []  # nothing written
    in_slim = export(tmp_path / "x.onnx", **without_torch(tmp_path / "guard"))
    assert in_slim.returncode == 2 and "needs torch" in in_slim.stderr and "Traceback" not in in_slim.stderr


def test_the_file_is_self_describing_onnx(model_file, weights_file):
    import onnx
    from torchvision.models import ResNet18_Weights

    graph = onnx.load(str(model_file))
    onnx.checker.check_model(graph)
    fields = {entry.key: entry.value for entry in graph.metadata_props}
    assert json.loads(fields["classifier.labels"]) == ResNet18_Weights.DEFAULT.meta["categories"]
    assert json.loads(fields["classifier.preprocessing"]) == {"resize": 256, "crop": 224, "interpolation": "bilinear",
                                                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert fields["classifier.weights_source"] == f"file:{weights_file.name}"
    assert len(json.loads(fields["classifier.probe_images"])) >= 4


def test_batching_limits_and_metrics_hold(slim_server):
    files = [("files", (f"{i}.png", photo_bytes(PHOTOS[i % len(PHOTOS)]), "image/png")) for i in range(8)]
    assert httpx.post(f"{slim_server.url}/predict/batch", files=files, timeout=60).status_code == 200
    too_big = httpx.post(f"{slim_server.url}/predict", files={"file": ("big.jpg", b"\xff" * (21 * 1024 * 1024))}, timeout=60)
    assert too_big.status_code == 413
    metrics = httpx.get(f"{slim_server.url}/metrics").text
    assert 'rejected_requests_total{reason="too_large"}' in metrics
    batches = [line for line in metrics.splitlines() if line.startswith("inference_batch_size_count")]
    assert batches and float(batches[0].split()[-1]) >= 1
