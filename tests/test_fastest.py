"""BACKEND=auto, the default on a CPU in fp32: torch and ONNX Runtime are each checked against fp32 torch and
timed at start-up, the faster serves, and the export and the choice are kept in RUNTIME_CACHE_DIR by the
weights' hash, so a restart measures nothing and serves alike (classifier/inference/runtimes/fastest.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from support import load

pytestmark = [pytest.mark.app,
              pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the default is torch: nothing is chosen")]


def weights_env(weights_file, cache) -> dict[str, str]:
    return {"MODEL_WEIGHTS": str(weights_file), "RUNTIME_CACHE_DIR": str(cache)}


def test_the_faster_exact_runtime_serves_and_says_why(weights_file, tmp_path, monkeypatch):
    runtime = load(weights_env(weights_file, tmp_path / "cache"), tmp_path, monkeypatch)
    choice = runtime.choice
    assert set(choice.timings_ms) == {"torch", "onnxruntime"}
    assert all(set(timings) == {"1", "8"} and min(timings.values()) > 0 for timings in choice.timings_ms.values())
    assert runtime.backend == choice.backend == min(choice.timings_ms, key=lambda name: sum(choice.timings_ms[name].values()))
    assert not choice.remembered
    assert runtime.max_score_difference <= 1e-4  # whichever serves gives fp32 torch's answers


def test_a_restart_reuses_the_export_and_the_choice(weights_file, tmp_path, monkeypatch):
    env = weights_env(weights_file, tmp_path / "cache")
    first = load(env, tmp_path, monkeypatch)
    [export] = (tmp_path / "cache").glob("*.onnx")
    [record] = (tmp_path / "cache").glob("*.json")
    assert export.stem == first.weights_hash and record.name.startswith(first.weights_hash)
    written = export.stat().st_mtime_ns
    # Whatever timings the record holds are believed: make torch look faster, and torch serves.
    json_record = json.loads(record.read_text())
    record.write_text(json.dumps({**json_record, "backend": "torch"}))

    second = load(env, tmp_path, monkeypatch)
    assert second.choice.remembered and second.backend == "torch"
    assert second.choice.timings_ms == first.choice.timings_ms
    assert export.stat().st_mtime_ns == written  # read, not exported again
    batch = np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)
    assert np.abs(first.predict(batch) - second.predict(batch)).max() < 1e-5


def test_another_machine_or_batch_measures_again(weights_file, tmp_path, monkeypatch):
    env = weights_env(weights_file, tmp_path / "cache")
    load(env, tmp_path, monkeypatch)
    other = load({**env, "MAX_BATCH_SIZE": "4"}, tmp_path, monkeypatch)
    assert not other.choice.remembered and set(other.choice.timings_ms["torch"]) == {"1", "4"}
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2 and len(list((tmp_path / "cache").glob("*.onnx"))) == 1


def test_a_cache_that_cannot_be_written_costs_time_not_the_start(weights_file, tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        runtime = load(weights_env(weights_file, blocked / "cache"), tmp_path, monkeypatch)
    assert runtime.backend in ("torch", "onnxruntime") and not runtime.choice.remembered
    assert f"RUNTIME_CACHE_DIR={blocked / 'cache'} cannot be written" in caplog.text


def test_a_damaged_export_leaves_torch_serving_and_is_made_again(weights_file, tmp_path, monkeypatch, caplog):
    env = weights_env(weights_file, tmp_path / "cache")
    first = load(env, tmp_path, monkeypatch)
    export = tmp_path / "cache" / f"{first.weights_hash}.onnx"
    export.write_bytes(b"not an ONNX graph")
    for record in (tmp_path / "cache").glob("*.json"):
        record.unlink()
    with caplog.at_level(logging.WARNING):
        damaged = load(env, tmp_path, monkeypatch)
    assert damaged.backend == "torch" and set(damaged.choice.timings_ms) == {"torch"}
    assert "ONNX Runtime is not a candidate" in caplog.text and not export.exists()
    for record in (tmp_path / "cache").glob("*.json"):
        record.unlink()
    again = load(env, tmp_path, monkeypatch)
    assert set(again.choice.timings_ms) == {"torch", "onnxruntime"} and export.stat().st_size > 1_000_000


def test_pinned_backends_measure_nothing(weights_file, tmp_path, monkeypatch):
    for backend in ("torch", "onnxruntime"):
        runtime = load({**weights_env(weights_file, tmp_path / "cache"), "BACKEND": backend}, tmp_path, monkeypatch)
        assert runtime.backend == backend and runtime.choice is None
    assert not (tmp_path / "cache").exists()


def test_reduced_precision_is_not_a_candidate(weights_file, tmp_path, monkeypatch):
    # FORCE_PRECISION: the test also runs on CPUs without native bf16, where start-up would refuse it.
    runtime = load({**weights_env(weights_file, tmp_path / "cache"), "PRECISION": "bf16", "FORCE_PRECISION": "true"},
                   tmp_path, monkeypatch)
    assert runtime.backend == "torch" and runtime.choice is None
