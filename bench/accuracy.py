"""What an opt-in speed setting changes in the answers, measured over real photos of many sizes.

    python -m bench.accuracy [--sizes 375,512,768,1024,1536,2048,3000] [--out bench/results/accuracy.json]

Measures JPEG_DRAFT=true against the exact decode, PRECISION=bf16 against fp32, and PRECISION=int8 against
fp32 (the model python -m quantize builds, calibrated on photos kept apart from the ones measured; or the one
--int8-model names). The default path is exact (torchvision's reference pipeline); every setting that trades
accuracy for speed is compared with it here, image by image: the largest softmax difference and how often the
top-1 label and the top-5 set stay the same. The photos are the photographs inside the scikit-image wheel, each resized so
its shorter side takes every size in --sizes (with a little sensor-like noise, so an enlarged photo keeps
the fine detail a camera's has), plus a square and a 16:9 crop, saved as JPEG.

Without MODEL_WEIGHTS a seeded random ResNet18 stands in for the pretrained weights, which cannot be had
here. Its answers are flat (top-1 scores of a few per cent), which shrinks score differences, so each figure
is also given "sharpened": the same logits scaled until the median top-1 score is 0.8, as confident as trained
weights are on ImageNet photos. Run it again with MODEL_WEIGHTS pointing at your weights, and on your own
photos, before you rely on these figures.
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from bench.harness import REPO, service_env

if TYPE_CHECKING:
    import torch  # the model's own import, at start-up, loads it; here only for annotations

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "moon.png", "coins.png", "brick.png",
          "grass.png", "gravel.png")


def source(name: str) -> Image.Image:
    return Image.open(importlib.resources.files("skimage") / "data" / name).convert("RGB")


def crops(image: Image.Image) -> Iterator[tuple[str, Image.Image]]:
    width, height = image.size
    yield "full", image
    side = min(width, height)
    yield "square", image.crop(((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2))
    if width / height < 16 / 9:
        band = round(width * 9 / 16)
        yield "16:9", image.crop((0, (height - band) // 2, width, (height - band) // 2 + band))


def photo_set(sizes: list[int], seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """(name, JPEG bytes) for every photo, crop and shorter-side size."""
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        for crop, image in crops(source(name)):
            for short in sizes:
                scale = short / min(image.size)
                resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
                pixels = np.asarray(resized, dtype=np.float32) + rng.normal(0, 2, (resized.height, resized.width, 3))
                buffer = io.BytesIO()
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
                yield f"{name}:{crop}:{resized.width}x{resized.height}", buffer.getvalue()


def sharpening(logits, median_top1: float = 0.8) -> float:
    """The temperature that makes the median top-1 score median_top1, found by bisection.

    Random stand-in weights give flat answers (top-1 scores of 1-4 %), which shrink every score difference;
    trained weights are confident (a median top-1 near 0.8 on ImageNet photos). Scaling the logits by this
    factor, as sharper weights would, shows the differences at a trained network's scale.
    """
    import torch

    low, high = 1.0, 1000.0
    for _ in range(60):
        middle = (low + high) / 2
        if torch.softmax(logits * middle, 1).max(1).values.median().item() < median_top1:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def compare(reference_logits, candidate_logits, temperature: float = 1.0) -> dict:
    """Logits [N, 1000] of the reference and of the setting under test -> the figures, on softmax scores."""
    import torch

    reference = torch.softmax(reference_logits * temperature, 1)
    candidate = torch.softmax(candidate_logits * temperature, 1)
    differences = (candidate - reference).abs().max(dim=1).values
    same_top1 = (candidate.argmax(1) == reference.argmax(1)).sum().item()
    top5 = [len(set(a) & set(b)) for a, b in zip(candidate.topk(5).indices.tolist(), reference.topk(5).indices.tolist())]
    confident = (reference.topk(2).values[:, 0] - reference.topk(2).values[:, 1]) > 0.1  # top-1 leads by > 0.1
    # Where top-1 changed: how far apart the reference's first two scores were (a near-tie flips easily).
    best_two = reference.topk(2).values
    flipped = (candidate.argmax(1) != reference.argmax(1)).nonzero().flatten().tolist()
    return {"images": len(reference), "temperature": temperature,
            "reference_median_top1": reference.max(1).values.median().item(),
            "score_max_abs_difference": differences.max().item(),
            "score_median_max_difference": differences.median().item(), "same_top1": same_top1,
            "top5_overlap_mean": statistics.mean(top5),
            "confident": int(confident.sum()),
            "confident_same_top1": int((candidate.argmax(1) == reference.argmax(1))[confident].sum()),
            "top1_changed_reference_margins": [(best_two[i, 0] - best_two[i, 1]).item() for i in flipped],
            "worst": differences.argsort(descending=True)[:5].tolist()}


def logits_of(images: list[np.ndarray], forward) -> torch.Tensor:
    """The logits of prepared images (Runtime.prepare), 16 at a time, by forward (images -> logits)."""
    import torch

    with torch.inference_mode():
        return torch.cat([forward(torch.from_numpy(np.stack(images[i : i + 16]))) for i in range(0, len(images), 16)])


def measure_draft(photos: list[tuple[str, bytes]], reference, runtime, fp32) -> dict:
    """JPEG_DRAFT=true against the full decode (reference: its fp32 logits): the answers at the stand-in's
    scale and sharpened, and the time it saves in decoding."""
    drafted, timings = [], {True: [], False: []}
    for name, data in photos:
        for draft in (False, True):
            started = time.perf_counter()
            runtime.decode(data, MAX_PIXELS, draft)
            timings[draft].append(time.perf_counter() - started)
        drafted.append(runtime.prepare(data, MAX_PIXELS, draft=True))
    candidate = logits_of(drafted, fp32)
    resize = runtime.preprocessing.resize
    big = [i for i, (name, _) in enumerate(photos) if min(map(int, name.rsplit(":", 1)[1].split("x"))) >= 4 * resize]
    return {"as_is": compare(reference, candidate), "sharpened": compare(reference, candidate, sharpening(reference)),
            "decoded_smaller": len(big),
            "decode_ms_full_median_big": 1000 * statistics.median(timings[False][i] for i in big) if big else None,
            "decode_ms_draft_median_big": 1000 * statistics.median(timings[True][i] for i in big) if big else None}


def measure_precision(exact: list, reference, network, precision: str) -> dict:
    """PRECISION=bf16 (the whole forward pass in bfloat16) against fp32 (reference: the fp32 logits of the
    exactly decoded photos, exact)."""
    import torch

    from classifier.inference.runtimes import torch_runtime

    candidate = logits_of(exact, torch_runtime.torch_forward(network, torch.device("cpu"), precision))
    return {"as_is": compare(reference, candidate), "sharpened": compare(reference, candidate, sharpening(reference))}


MAX_PIXELS = 0  # MAX_IMAGE_PIXELS, as the settings say (measure_all reads them)
SIZES = [375, 512, 768, 1024, 1536, 2048, 3000]  # the shorter sides each photo is measured at, by default


# int8 is calibrated on variants of these photos and measured on the others': never on its calibration photos.
CALIBRATION_PHOTOS = ("astronaut.png", "coffee.png", "motorcycle_left.png", "retina.jpg", "coins.png")
INT8_SIZES = [300, 375, 448, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3000]


def measure_int8(model_file: Path, runtime, fp32) -> dict:
    """PRECISION=int8 (the model python -m quantize built) against fp32, on photos it was not calibrated on."""
    from classifier.inference.runtimes import torch_runtime

    photos = list(int8_measured_set())
    exact = [runtime.prepare(data, MAX_PIXELS) for _, data in photos]
    reference = logits_of(exact, fp32)
    forward, made = torch_runtime.int8_forward(model_file, runtime.threads, runtime.weights_hash)
    candidate = logits_of(exact, forward)
    return {"photos": len(photos), "made": made, "as_is": compare(reference, candidate),
            "sharpened": compare(reference, candidate, sharpening(reference)), "names": [name for name, _ in photos]}


def int8_measured_set() -> Iterator[tuple[str, bytes]]:
    """The photos int8 is measured on: JPEGs of the other photos at INT8_SIZES, 360 in all."""
    return ((name, data) for name, data in photo_set(INT8_SIZES, seed=1) if name.split(":")[0] not in CALIBRATION_PHOTOS)


def calibration_set() -> Iterator[tuple[str, bytes]]:
    """The photos int8 is calibrated on: JPEGs of CALIBRATION_PHOTOS at five sizes, 75 in all."""
    return ((name, data) for name, data in photo_set([256, 384, 512, 768, 1024], seed=2)
            if name.split(":")[0] in CALIBRATION_PHOTOS)


def build_int8(work: Path) -> Path:
    """An int8 model of the loaded weights, built by python -m quantize from calibration_set()."""
    from classifier.cli import quantize

    folder = work / "calibration"
    folder.mkdir(exist_ok=True)
    for name, data in calibration_set():
        (folder / (name.replace(":", "_") + ".jpg")).write_bytes(data)
    out = work / "int8.onnx"
    if quantize.main(["--calibration", str(folder), "--out", str(out)]) != 0:
        raise SystemExit("python -m quantize failed")
    return out


def report(name: str, figures: dict, names: list[str]) -> None:
    print(f"{name}: largest score difference {figures['score_max_abs_difference']:.4f} "
          f"(median per image {figures['score_median_max_difference']:.1e}), same top-1 {figures['same_top1']}/{figures['images']}, "
          f"top-5 overlap {figures['top5_overlap_mean']:.2f}/5; reference median top-1 score {figures['reference_median_top1']:.3f}; "
          f"where the reference's top-1 leads by > 0.1: same top-1 {figures['confident_same_top1']}/{figures['confident']}")
    if figures["top1_changed_reference_margins"]:
        print("  where top-1 changed, the reference's two best scores were apart by "
              + ", ".join(f"{margin:.1e}" for margin in figures["top1_changed_reference_margins"]))
    print("  largest differences on: " + ", ".join(names[i] for i in figures["worst"][:3]))


def measure_draft_and_bf16(sizes: list[int], skip: set[str], runtime, network, fp32) -> dict:
    """JPEG_DRAFT and bf16 against the exact fp32 default, on every photo at every size, with their reports."""
    photos = list(photo_set(sizes))
    names = [name for name, _ in photos]
    shown = sorted({name.rsplit(":", 1)[1] for name in names}, key=lambda s: int(s.split("x")[0]) * int(s.split("x")[1]))
    print(f"{len(photos)} JPEGs from {len(PHOTOS)} photos, {shown[0]} to {shown[-1]}; weights {os.environ['MODEL_WEIGHTS']}\n")
    results: dict = {"photos": len(photos)}
    exact = [runtime.prepare(data, MAX_PIXELS, draft=False) for _, data in photos]  # the default path, decoded once
    reference = logits_of(exact, fp32)
    if "draft" not in skip:
        draft = results["draft"] = measure_draft(photos, reference, runtime, fp32)
        report("JPEG_DRAFT=true vs exact, stand-in weights as they are", draft["as_is"], names)
        report(f"JPEG_DRAFT=true vs exact, sharpened x{draft['sharpened']['temperature']:.0f} like trained weights",
               draft["sharpened"], names)
        if draft["decoded_smaller"]:
            print(f"{draft['decoded_smaller']} photos with a shorter side >= {4 * runtime.preprocessing.resize} px decode at a reduced "
                  f"scale: median decode {draft['decode_ms_draft_median_big']:.1f} ms instead of {draft['decode_ms_full_median_big']:.1f} ms")
        print()
    if "bf16" not in skip:
        bf16 = results["bf16"] = measure_precision(exact, reference, network, "bf16")
        report("PRECISION=bf16 vs fp32, stand-in weights as they are", bf16["as_is"], names)
        report(f"PRECISION=bf16 vs fp32, sharpened x{bf16['sharpened']['temperature']:.0f} like trained weights",
               bf16["sharpened"], names)
    return results


def measure_all(sizes: list[int], skip: set[str], int8_model: Path | None) -> dict:
    """In a process whose environment chose the settings: int8 (built by python -m quantize unless int8_model is
    given), then JPEG_DRAFT and bf16 at these sizes, each unless skipped."""
    import torch

    import model
    from classifier.inference.runtimes import torch_runtime
    from classifier.settings import get_settings

    global MAX_PIXELS
    settings = get_settings()
    MAX_PIXELS = settings.max_image_pixels  # every photo here is decoded as the service decodes it
    runtime = model.load(settings)
    network, _, _ = torch_runtime.load_network(settings)
    fp32 = torch_runtime.torch_forward(network, torch.device("cpu"), "fp32")  # what the service runs by default
    results: dict = {"sizes": sizes}
    if "int8" not in skip:  # on photos of its own, kept apart from its calibration photos
        int8 = results["int8"] = measure_int8(int8_model or build_int8(Path(tempfile.mkdtemp(prefix="accuracy-int8-"))),
                                              runtime, fp32)
        print(f"{int8['photos']} photos not used to calibrate; calibration {int8['made']}")
        report("PRECISION=int8 vs fp32, stand-in weights as they are", int8["as_is"], int8["names"])
        report(f"PRECISION=int8 vs fp32, sharpened x{int8['sharpened']['temperature']:.0f} like trained weights",
               int8["sharpened"], int8["names"])
        print()
    if not {"draft", "bf16"} <= skip:
        results.update(measure_draft_and_bf16(sizes, skip, runtime, network, fp32))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        type=lambda text: [int(size) for size in text.split(",")], help="shorter sides, in pixels")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "accuracy.json")
    parser.add_argument("--int8-model", type=Path, help="measure this int8 model (default: build one with python -m quantize)")
    parser.add_argument("--skip", default="", type=lambda text: set(text.split(",")), help="comma-separated: draft, bf16, int8")
    args = parser.parse_args()

    os.environ.update(service_env(Path(tempfile.mkdtemp(prefix="accuracy-"))))
    os.environ["JPEG_DRAFT"] = "false"  # the reference side is the default, exact path
    results = measure_all(args.sizes, args.skip, args.int8_model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
