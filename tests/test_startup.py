"""Weights are found the standard ways, or start-up fails at once with one message that says how to fix it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import REPO, assert_refused, free_port, load

pytestmark = pytest.mark.unit


def start(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """python -m app, as the container starts it, until it stops (it should, at once)."""
    base = {k: v for k, v in os.environ.items() if k != "MODEL_WEIGHTS"}
    return subprocess.run([sys.executable, "-m", "app"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**base, "TORCH_HOME": str(tmp_path / "torch-home"), "PORT": str(free_port()),
                               "GRPC_PORT": "0", "LOG_LEVEL": "warning", **env})


def assert_fails_clearly(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("Cannot load the model: ")
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.mark.server
def test_a_model_that_cannot_be_loaded_stops_the_service_with_one_line(tmp_path):
    missing = tmp_path / "nope.pth"
    assert_fails_clearly(start({"MODEL_WEIGHTS": str(missing)}, tmp_path), f"MODEL_WEIGHTS={missing} does not exist")


@pytest.mark.server
def test_under_uvicorn_too_a_model_that_cannot_be_loaded_is_one_line(tmp_path):
    missing = tmp_path / "nope.pth"
    result = subprocess.run([sys.executable, "-m", "uvicorn", "app:app", "--port", str(free_port())], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MODEL_WEIGHTS": str(missing), "GRPC_PORT": "0"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"Cannot load the model: MODEL_WEIGHTS={missing} does not exist" in result.stderr


def test_missing_weights_file(tmp_path, monkeypatch):
    missing = tmp_path / "nope.pth"
    assert_refused({"MODEL_WEIGHTS": str(missing)}, tmp_path, monkeypatch, f"MODEL_WEIGHTS={missing} does not exist")


def test_weights_file_that_is_not_a_state_dict(tmp_path, monkeypatch):
    text = tmp_path / "weights.pth"
    text.write_text("not weights")
    assert_refused({"MODEL_WEIGHTS": str(text)}, tmp_path, monkeypatch, "is not a PyTorch state_dict file")


def test_weights_of_another_model(tmp_path, monkeypatch):
    other = tmp_path / "other.pth"
    torch.save({"linear.weight": torch.zeros(2, 2)}, other)
    assert_refused({"MODEL_WEIGHTS": str(other)}, tmp_path, monkeypatch, "does not hold ResNet18 weights")


def test_no_weights_and_no_network_never_falls_back_to_random(tmp_path, monkeypatch):
    # A proxy on a closed port makes the download fail at once, with or without internet.
    closed = "http://127.0.0.1:9"
    assert_refused({"https_proxy": closed, "HTTPS_PROXY": closed}, tmp_path, monkeypatch,
                   "MODEL_WEIGHTS is not set", "resnet18-f37072fd.pth", str(tmp_path / "torch-home"))


@pytest.mark.app
def test_torchvision_cache_under_torch_home_is_used_offline(tmp_path, weights_file, monkeypatch):
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(weights_file.read_bytes())
    closed = "http://127.0.0.1:9"
    runtime = load({"https_proxy": closed, "HTTPS_PROXY": closed}, tmp_path, monkeypatch)
    assert runtime.weights_source == "torchvision:ResNet18_Weights.IMAGENET1K_V1"


@pytest.mark.app
def test_explicit_weights_file_is_used(tmp_path, weights_file, monkeypatch):
    assert load({"MODEL_WEIGHTS": str(weights_file)}, tmp_path, monkeypatch).weights_source == f"file:{weights_file.name}"


@pytest.mark.app
def test_settings_defaults():
    from classifier.settings import Settings

    settings = Settings.from_env({})
    assert settings.model_weights is None
    assert settings.threads == len(os.sched_getaffinity(0))
    assert settings.max_upload_bytes == 20 * 1024 * 1024
    assert settings.max_image_pixels == 50_000_000
    assert settings.cors_origins == []


@pytest.mark.app
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"THREADS": "two"}, "THREADS='two' is not a whole number"),
        ({"THREADS": "0"}, "THREADS=0 must be at least 1"),
        ({"MAX_UPLOAD_BYTES": "-5"}, "MAX_UPLOAD_BYTES=-5 must be at least 1"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='loud' must be one of"),
    ],
)
def test_bad_settings_are_refused(env, message):
    from classifier.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


@pytest.mark.server
def test_bad_setting_stops_the_service_with_its_name(tmp_path):
    result = start({"THREADS": "lots"}, tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Invalid setting: THREADS='lots' is not a whole number" in result.stderr


def test_importing_the_service_loads_no_model_and_imports_no_torch():
    # A fresh interpreter: this test process has torch already. Importing builds the application from the
    # environment's settings; the model loads only when it starts.
    code = ("import sys, app, model, classify, export, quantize; "
            "print(sorted(name for name in ('torch', 'torchvision', 'onnxruntime') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "GRPC_PORT": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
