"""Which int8 PRECISION=int8 serves: each candidate against fp32 on this CPU, speed and agreement side by side.

    python -m bench.int8_candidates [--out docs/results/int8-candidates.json]
    # the OpenVINO rows need OpenVINO, which the service does not: pip install openvino

Candidates, each calibrated on the same 75 photos (bench/accuracy.py's calibration set), measured on others:
- NNCF's post-training quantization of the ONNX graph, run by ONNX Runtime (what python -m quantize builds);
- ONNX Runtime's own static quantization (QDQ, per-channel int8 weights, uint8 activations), with each of its
  calibration methods: MinMax, Entropy, Percentile;
- OpenVINO running NNCF's quantization of its own graph (performance preset);
- torch's own x86 post-training quantization (torch.ao FX graph mode, the x86 backend: FBGEMM/oneDNN).
Speed is the forward pass alone, a batch of 8 on THREADS threads, the best of 15 runs; agreement is
bench/accuracy.py's comparison with fp32 torch (top-1, and top-1 where fp32's leads by more than 0.1 once
sharpened to a trained network's confidence).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.accuracy import build_int8, calibration_set, compare, int8_measured_set, logits_of, sharpening
from bench.harness import REPO, cpu_description, print_rows, service_env


def onnxruntime_static(prepared: Path, calibration: list, method: str, work: Path) -> Path:
    """ONNX Runtime's quantize_static (QDQ, per-channel) of the prepared fp32 graph, with one of its calibration
    methods."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(calibration)

        def get_next(self) -> dict | None:
            image = next(self.remaining, None)
            return None if image is None else {"images": image[None]}

    out = work / f"ort-{method}.onnx"
    quantize_static(str(prepared), str(out), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))
    return out


def openvino_candidates(fp32: Path, calibration: list, threads: int) -> dict[str, Callable]:
    import nncf
    import openvino as ov
    import torch

    core = ov.Core()
    network = core.read_model(str(fp32))
    int8 = nncf.quantize(network, nncf.Dataset([image[None] for image in calibration]),
                         preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(calibration))
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}

    def runner(graph) -> Callable:
        compiled = core.compile_model(graph, "CPU", config)
        return lambda images: torch.from_numpy(compiled(images.numpy())[0].copy())

    return {"openvino fp32": runner(network), "int8: NNCF + openvino": runner(int8)}


def torch_x86_candidate(network, calibration: list) -> Callable:
    import copy

    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(network).eval(), get_default_qconfig_mapping("x86"),
                          (torch.from_numpy(calibration[0][None]),))
    with torch.inference_mode():
        for image in calibration:
            prepared(torch.from_numpy(image[None]))
    return convert_fx(prepared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "int8-candidates.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="int8-candidates-"))
    os.environ.update(service_env(work))
    import torch

    from bench.harness import served_model
    from classifier.inference.runtimes import onnx_runtime
    from classifier.inference.runtimes import torch_runtime as torch_runtime
    from classifier.settings import get_settings

    runtime, prepare = served_model()
    network, _, weights_hash = torch_runtime.load_network(get_settings())
    threads = runtime.threads
    calibration = [prepare(data) for _, data in calibration_set()]
    measured = [prepare(data) for _, data in int8_measured_set()]
    torch_fp32 = torch_runtime.torch_forward(network, torch.device("cpu"), "fp32")
    reference = logits_of(measured, torch_fp32)
    temperature = sharpening(reference)
    batch = torch.from_numpy(np.stack(measured[:8]))

    candidates: dict[str, Callable] = {"torch fp32": torch_fp32,
                                       "onnxruntime fp32": torch_runtime.onnx_forward(network, threads)}
    candidates["int8: NNCF + onnxruntime (python -m quantize)"], _ = torch_runtime.int8_forward(
        build_int8(work), threads, weights_hash)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, prepared = work / "fp32.onnx", work / "prepared.onnx"  # exported and prepared once, for every candidate
    fp32.write_bytes(torch_runtime.export_onnx(network))
    quant_pre_process(str(fp32), str(prepared))
    for method in ("MinMax", "Entropy", "Percentile"):
        made = onnxruntime_static(prepared, calibration, method, work)
        candidates[f"int8: onnxruntime quantize_static {method}"] = torch_runtime.session_forward(onnx_runtime.session(str(made), threads))
    try:
        candidates.update(openvino_candidates(fp32, calibration, threads))
    except ImportError:
        print("openvino rows skipped: pip install openvino to measure them", flush=True)
    try:
        candidates["int8: torch x86 (torch.ao FX)"] = torch_x86_candidate(network, calibration)
    except (ImportError, RuntimeError) as error:
        print(f"torch x86 int8 skipped: {type(error).__name__}: {error}", flush=True)

    rows, fp32_ms = [], None
    for name, forward in candidates.items():
        per_image = 1000 * torch_runtime.best_time(forward, batch, tries=15) / len(batch)
        fp32_ms = fp32_ms or per_image
        figures = compare(reference, logits_of(measured, forward), temperature)
        rows.append({"row": name, "ms_per_image_batch8": round(per_image, 1), "speedup_vs_torch_fp32": round(fp32_ms / per_image, 2),
                     "same_top1": f"{figures['same_top1']}/{figures['images']}",
                     "confident_same_top1": f"{figures['confident_same_top1']}/{figures['confident']}",
                     "score_max_abs_difference": round(figures["score_max_abs_difference"], 4)})
    print(f"{cpu_description()}, {threads} threads; {len(calibration)} calibration photos, {len(measured)} measured "
          f"(sharpened x{temperature:.0f})", flush=True)
    print_rows(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": cpu_description(), "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
                                    "threads": threads, "calibration_photos": len(calibration),
                                    "measured_photos": len(measured), "rows": rows}, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
