"""PRECISION and DEVICE: what runs where, what start-up refuses, and what bf16 changes."""

from __future__ import annotations

import httpx
import pytest
import torch

from support import PHOTOS, assert_refused, load, photo, photo_bytes, start_server

pytestmark = pytest.mark.unit


def test_precision_rules():
    from classifier.inference.runtimes import torch_runtime

    precision_problem = torch_runtime.precision_problem

    assert precision_problem("cpu", "fp32", False, False) is None
    assert precision_problem("cpu", "bf16", True, False) is None
    assert "no native bfloat16" in precision_problem("cpu", "bf16", False, False)
    assert precision_problem("cpu", "bf16", False, True) is None  # FORCE_PRECISION
    assert "for GPUs" in precision_problem("cpu", "fp16", True, True)
    assert precision_problem("cuda", "fp16", False, False) is None
    assert precision_problem("cuda", "bf16", False, False) is None


@pytest.mark.app
def test_auto_picks_cuda_only_where_torch_sees_a_gpu(runtime):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    from classifier.inference.runtimes import torch_runtime

    assert torch_runtime.pick_device("auto").type == expected
    assert torch_runtime.pick_device("cpu").type == "cpu"
    assert runtime.device_type == expected  # the service's own choice under DEVICE=auto


@pytest.mark.app
def test_cuda_without_a_gpu_fails_clearly(weights_file, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert_refused({"MODEL_WEIGHTS": str(weights_file), "DEVICE": "cuda"}, tmp_path, monkeypatch,
                   "DEVICE=cuda, but torch sees no CUDA device")


@pytest.mark.app
def test_fp16_on_the_cpu_is_refused(weights_file, tmp_path, monkeypatch):
    assert_refused({"MODEL_WEIGHTS": str(weights_file), "DEVICE": "cpu", "PRECISION": "fp16"}, tmp_path, monkeypatch,
                   "PRECISION=fp16 is for GPUs")


def confident_weights(weights_file, folder) -> str:
    """The stand-in with its logits sharpened (x3): on the start-up probe its top scores look like a trained
    model's rather than near-uniform, so bf16's rounding moves them by more than 1e-2 (1.4e-2 on an AVX512_BF16
    CPU), as real pretrained weights do."""
    state = torch.load(weights_file, weights_only=True)
    state["fc.weight"] *= 3
    state["fc.bias"] *= 3
    torch.save(state, folder / "confident.pth")
    return str(folder / "confident.pth")


@pytest.mark.app
def test_bf16_starts_with_confident_weights(weights_file, tmp_path, monkeypatch):
    # FORCE_PRECISION: the test also runs on CPUs without native bf16, where the service would refuse it.
    runtime = load({"MODEL_WEIGHTS": confident_weights(weights_file, tmp_path), "PRECISION": "bf16", "DEVICE": "cpu",
                    "FORCE_PRECISION": "true"}, tmp_path, monkeypatch)
    assert runtime.precision == "bf16" and runtime.max_score_difference > 0


@pytest.mark.app
def test_reduced_precision_is_measured_and_refused_only_when_broken(reference_network):
    from classifier.errors import ModelLoadError
    from classifier.inference.runtimes import torch_runtime

    def rounded(batch):  # a forward pass whose scores differ from fp32's far beyond rounding
        return reference_network(batch) * 3

    check = torch_runtime.check_parity
    assert check(rounded, reference_network, "bf16", None) > 0.1  # shown, not refused: bench/accuracy.py judges it
    with pytest.raises(ModelLoadError, match="differs from fp32 torch"):
        check(rounded, reference_network, "fp32")  # fp32 must match
    with pytest.raises(ModelLoadError, match="not numbers"):
        check(lambda batch: torch.full((len(batch), 1000), float("nan")), reference_network, "bf16", None)


@pytest.mark.app
def test_onnxruntime_with_reduced_precision_is_a_settings_error():
    from classifier.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="need BACKEND=torch"):
        Settings.from_env({"BACKEND": "onnxruntime", "PRECISION": "bf16"})


@pytest.mark.app
def test_model_info_shows_fp32_and_its_difference(client):
    info = client.get("/model").json()
    assert info["precision"] == "fp32"
    # On a CPU the default (BACKEND=auto) serves the runtime start-up measured faster (tests/test_fastest.py).
    assert info["backend"] == ("torch" if torch.cuda.is_available() else min(
        info["backend_choice"]["timings_ms"], key=lambda name: sum(info["backend_choice"]["timings_ms"][name].values())))
    assert 0 <= info["max_score_difference"] < 1e-4
    assert info["max_batch_size"] == (32 if torch.cuda.is_available() else 8)


@pytest.mark.server
def test_bf16_on_the_cpu_answers_close_to_the_reference(weights_file, reference, tmp_path):
    # FORCE_PRECISION: the test also runs on CPUs without native bf16, where the service would refuse it.
    server = start_server(tmp_path, DEVICE="cpu", PRECISION="bf16", FORCE_PRECISION="true")
    try:
        info = httpx.get(f"{server.url}/model").json()
        assert (info["precision"], info["device"]) == ("bf16", "cpu")
        assert 0 < info["max_score_difference"] < 1e-2  # measured, not zero: bf16 is not exact
        for name in PHOTOS:
            answer = httpx.post(f"{server.url}/predict/topk?k=1000", files={"file": (name, photo_bytes(name))}).json()
            scores = torch.zeros(1000)
            for p in answer["predictions"]:
                scores[p["index"]] = p["score"]
            assert (scores - reference(photo(name))).abs().max().item() < 1e-2
    finally:
        server.stop()
