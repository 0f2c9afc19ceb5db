"""Build the int8 model PRECISION=int8 serves: the weights the service would load, quantized after training
with ranges calibrated on your own photos.

    python -m quantize --calibration PHOTOS_DIR --out resnet18-int8.onnx [--max-images 300]

NNCF's post-training quantization on the ONNX graph (performance preset: 8-bit weights per output channel,
8-bit activations with ranges measured on the calibration photos, then a bias correction), written as an
ONNX model with QuantizeLinear/DequantizeLinear pairs that ONNX Runtime runs on integer kernels (VNNI where
the CPU has it). The photos go through the service's own decoding and preprocessing. The file records the
weights it came from (their hash: the service refuses a model made from other weights) and the calibration
(how many photos, a hash of their bytes, the method). Then serve it:

    PRECISION=int8 INT8_MODEL=resnet18-int8.onnx make run

The settings that choose the weights apply (MODEL_WEIGHTS, TORCH_HOME); the calibration photos should look
like the ones the service will see. Nothing is ever quantized with data made up.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

MIN_PHOTOS = 10
METHOD = "nncf performance preset, fast bias correction"


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=Path, required=True, help="a folder of photos (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="the int8 model to write (ONNX)")
    parser.add_argument("--max-images", type=int, default=300, help="calibrate on at most this many photos")
    args = parser.parse_args(argv)
    if not args.calibration.is_dir():
        parser.error(f"--calibration {args.calibration} is not a folder")
    if not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.parent} does not exist")
    if args.max_images < MIN_PHOTOS:
        parser.error(f"--max-images {args.max_images}: at least {MIN_PHOTOS} photos are needed to calibrate")
    return args


def calibration_inputs(photos: list[Path], prepare: Callable[[bytes], np.ndarray]) -> tuple[list[np.ndarray], str]:
    """The model's inputs [1, 3, 224, 224] for the photos the service can read, and a hash of their bytes."""
    from classifier.inference import images

    inputs, digest = [], hashlib.blake2b(digest_size=16)
    for path in photos:
        data = path.read_bytes()
        try:
            inputs.append(prepare(data)[None])
        except images.ImageError as error:  # a photo the service would refuse calibrates nothing
            print(f"skipped {path}: {error}", file=sys.stderr)
            continue
        digest.update(hashlib.blake2b(data, digest_size=16).digest())
    return inputs, digest.hexdigest()


def quantize(fp32_graph: bytes, inputs: list[np.ndarray]):  # noqa: ANN201 (an onnx.ModelProto)
    """The fp32 ONNX graph, statically quantized with activation ranges measured on inputs."""
    os.environ["NNCF_CI"] = "1"  # NNCF reports its use to an analytics service unless it believes it runs in CI
    import nncf  # checked for by main()
    import onnx

    dataset = nncf.Dataset([{"images": batch} for batch in inputs])
    return nncf.quantize(onnx.load_from_string(fp32_graph), dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
                         subset_size=len(inputs))


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    if importlib.util.find_spec("nncf") is None:
        print("python -m quantize needs NNCF, which the service itself does not: pip install -r requirements.txt",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from classifier.cli.classify import is_image, listing
    from classifier.errors import ModelLoadError
    from classifier.inference import images
    from classifier.inference.runtimes import onnx_runtime, torch_runtime
    from classifier.settings import get_settings

    settings = get_settings()  # of them, those that choose the weights: the fp32 network is what gets quantized
    try:
        network, weights_source, weights_hash = torch_runtime.load_network(settings)
    except ModelLoadError as error:
        print(f"Cannot load the model: {error}", file=sys.stderr)
        return 1

    def prepare(data: bytes) -> np.ndarray:  # the service's decoding and preprocessing
        return torch_runtime.preprocess(images.decode(data, torch_runtime.preprocessing.resize, settings.max_image_pixels))

    photos = [Path(name) for name in listing([str(args.calibration)]) if is_image(name)]  # classify's choice of files
    inputs, photos_hash = calibration_inputs(photos[: args.max_images], prepare)
    if len(inputs) < MIN_PHOTOS:
        print(f"{len(inputs)} usable photos in {args.calibration}: at least {MIN_PHOTOS} are needed to calibrate",
              file=sys.stderr)
        return 2

    graph = quantize(torch_runtime.export_onnx(network), inputs)
    onnx_runtime.save(graph, {"weights": weights_hash, "weights_source": weights_source,
                            "calibration_images": str(len(inputs)), "calibration_hash": photos_hash,
                            "calibration_method": METHOD}, args.out)

    probe = np.concatenate(inputs[:8])
    int8_forward, _ = torch_runtime.int8_forward(args.out, settings.threads, weights_hash)
    fp32_forward = torch_runtime.torch_forward(network, torch.device("cpu"), "fp32")
    with torch.inference_mode():
        fp32_scores = torch.softmax(fp32_forward(torch.from_numpy(probe)), 1)
        int8_scores = torch.softmax(int8_forward(torch.from_numpy(probe)), 1)
    agree = int((int8_scores.argmax(1) == fp32_scores.argmax(1)).sum())
    print(f"wrote {args.out}: calibrated on {len(inputs)} photos; on {len(probe)} of them top-1 agrees with fp32 for "
          f"{agree}, largest score difference {(int8_scores - fp32_scores).abs().max():.3f}. Measure it on photos it "
          "was not calibrated on: python -m bench.accuracy --int8-model FILE", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
