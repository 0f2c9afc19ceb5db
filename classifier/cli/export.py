"""Export the weights the service would load into the model file a slim replica serves without torch.

    python -m export --out resnet18.onnx
    MODEL_ONNX=resnet18.onnx make run        # the service, python -m classify and the job worker, no torch

The file is an ONNX model whose metadata records the labels, the preprocessing constants, the weights' hash
and probe images with torch's scores for them (onnx_runtime.py gives the format). Before anything is written
under --out, the file is opened as a slim replica opens it and its probe checked: ONNX Runtime, fed by the
Pillow and numpy preprocessing, must give torch's scores within 1e-4, or nothing is written.

The settings that choose the weights apply (MODEL_WEIGHTS, TORCH_HOME, DEMO); the rest are ignored: the
export is fp32, on the CPU.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# The probe: pictures of the shapes and modes uploads come in (landscape, portrait, already 256 on the
# shorter side, smaller than the crop, greyscale, transparent), so start-up exercises decoding, resizing,
# cropping and the forward pass together.
PROBE_SHAPES = (((320, 240), "RGB"), ((240, 320), "RGB"), ((256, 256), "RGB"), ((200, 150), "RGB"),
                ((333, 500), "L"), ((300, 280), "RGBA"))


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the model file to write (ONNX)")
    args = parser.parse_args(argv)
    if not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.parent} does not exist")
    return args


def probe_images(seed: int = 0) -> list[bytes]:
    """PNGs of smooth random shapes with a little noise (a photo's statistics more than pure noise's)."""
    rng = np.random.default_rng(seed)
    pictures = []
    for (width, height), mode in PROBE_SHAPES:
        bands = len(mode)
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, bands), dtype=np.uint8)
        smooth = np.stack([np.asarray(Image.fromarray(coarse[..., band]).resize((width, height), Image.Resampling.BICUBIC))
                           for band in range(bands)], axis=-1).astype(np.int16)
        noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
        encoded = io.BytesIO()
        Image.fromarray(noisy[..., 0] if mode == "L" else noisy).save(encoded, "PNG")
        pictures.append(encoded.getvalue())
    return pictures


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    try:
        import torch
    except ImportError:
        print("python -m export needs torch, which a slim replica does not have: run it where requirements-runtime.txt "
              "is installed (the default image, or make's .venv)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torchvision

    from classifier.errors import ModelLoadError
    from classifier.inference import images
    from classifier.inference.runtimes import onnx_runtime, torch_runtime
    from classifier.settings import get_settings

    settings = get_settings()  # of them, those that choose the weights: the export is fp32, on the CPU
    try:
        network, weights_source, weights_hash = torch_runtime.load_network(settings)
    except ModelLoadError as error:
        print(f"Cannot load the model: {error}", file=sys.stderr)
        return 1
    preprocessing = torch_runtime.preprocessing
    pictures = probe_images()
    with torch.inference_mode():  # torchvision's own pipeline: its transforms, the model as loaded
        inputs = torch.stack([torch_runtime.transforms(images.decode(picture, preprocessing.resize, settings.max_image_pixels))
                              for picture in pictures])
        scores = torch.softmax(network(inputs), 1).numpy()
    import onnx

    graph = onnx.load_from_string(torch_runtime.export_onnx(network))
    records = onnx_runtime.describe(tuple(torch_runtime.WEIGHTS.meta["categories"]), preprocessing, weights_hash,
                                  weights_source, pictures, scores,
                                  f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    unchecked = args.out.with_name(args.out.name + ".unchecked")
    onnx_runtime.save(graph, records, unchecked)
    try:  # opened and probed exactly as a slim replica's start-up does
        file = onnx_runtime.read(unchecked, settings.threads)
        difference = onnx_runtime.check_probe(
            file, lambda data: file.preprocessing(images.decode(data, file.preprocessing.resize, settings.max_image_pixels)))
    except onnx_runtime.ModelFileError as error:
        unchecked.unlink()
        print(f"not written: {error}", file=sys.stderr)
        return 1
    os.replace(unchecked, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): weights {weights_hash} from "
          f"{weights_source}; on its {len(pictures)} probe images ONNX Runtime's scores are within "
          f"{difference:.1e} of torch's. Serve it without torch: MODEL_ONNX={args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
