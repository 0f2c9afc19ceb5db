"""The offline batch job: classify a folder (recursively) or a list of files, no HTTP.

    python -m classify PHOTOS_DIR --out results.jsonl [--k 5] [--batch-size 16] [--workers N]
                      [--format jsonl|csv] [--resume] [--shard i/n]

One line per image, appended and flushed as each batch finishes, so a crash loses at most one batch and
`--resume` carries on where the file ends. Each line is an image's outcome as the API gives it:
{"path", "predictions": [{label, index, score}, ...]} or {"path", "error": {"status", "detail"}} (CSV: the
columns path, status, error, then label/index/score by rank). Decoding and the forward pass are the service's
(model.Runtime.prepare, batching.predict_each: a batch that fails is retried image by image), with the
service's settings (MODEL_WEIGHTS, BACKEND, PRECISION, MAX_IMAGE_PIXELS, JPEG_DRAFT, ...). Exit status: 0
when every image was classified, 1 when any failed, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from classifier.inference.images import SUFFIXES
from classifier.inference.runtime import NUM_CLASSES

if TYPE_CHECKING:
    from classifier.inference.cache import ResultCache
    from classifier.inference.runtime import Runtime



def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard {text}: i must be from 0 to n-1")
    return index, count


def existing(inputs: list[str]) -> list[Path]:
    """The inputs as paths, or exit 2 naming the first that is not a local file or folder (checked when the job
    runs, not when its arguments are parsed: a manifest's are checked on machines without its files)."""
    for text in inputs:
        # Path() would fold "s3://bucket/key" into "s3:/bucket/key", a file that is simply not there.
        problem = ("only local files and folders are read, not URLs" if "://" in text
                   else None if Path(text).exists() else "no such file or folder")
        if problem:
            print(f"python -m classify: error: {text}: {problem}", file=sys.stderr)
            raise SystemExit(2)
    return [Path(text) for text in inputs]


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m classify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="folders (searched recursively) and image files")
    parser.add_argument("--out", type=Path, required=True, help="the results file")
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    parser.add_argument("--k", type=positive, default=5, help="labels per image (default 5)")
    parser.add_argument("--batch-size", type=positive, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--workers", type=positive, default=len(os.sched_getaffinity(0)),
                        help="decoding threads (default: the CPUs)")
    parser.add_argument("--resume", action="store_true", help="skip images already in --out and append to it")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="i/n",
                        help="classify only shard i of n (0-based); run n copies anywhere to split the work")
    args = parser.parse_args(argv)
    if args.k > NUM_CLASSES:
        parser.error(f"--k must be at most {NUM_CLASSES}")
    if args.out.exists() and not args.resume:
        parser.error(f"{args.out} exists: pass --resume to continue it, or choose another --out")
    return args


def find_images(inputs: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(images, other files) below the inputs, in a stable order."""
    images, others = [], []
    for path in inputs:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            (images if file.suffix.lower() in SUFFIXES else others).append(file)
    return images, others


def in_shard(path: Path, shard: tuple[int, int]) -> bool:
    # A hash of the path, not its position, so a shard keeps its files when others are added.
    index, count = shard
    return zlib.crc32(str(path).encode()) % count == index


class Results:
    """The output file: what it already holds, and appending a line per image."""

    def __init__(self, path: Path, format: str, k: int) -> None:
        self.path, self.format, self.k = path, format, k
        self.versions: set[str] = set()  # the model versions of the predictions already recorded (done() reads them)

    def done(self) -> set[str]:
        """Paths already recorded, and their model versions in self.versions. A torn last line (a crash mid-write)
        is cut off first."""
        if not self.path.exists():
            return set()
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        text = data.decode()
        if self.format == "jsonl":
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            lines = list(csv.DictReader(io.StringIO(text)))
        self.versions = {line["model_version"] for line in lines if line.get("model_version")}
        return {line["path"] for line in lines}

    def append(self, lines: list[dict]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as file:
            if self.format == "jsonl":
                file.writelines(json.dumps(line) + "\n" for line in lines)
            else:
                writer = csv.DictWriter(file, self.columns())
                if new:
                    writer.writeheader()
                writer.writerows(self.flat(line) for line in lines)
            file.flush()
            os.fsync(file.fileno())

    def columns(self) -> list[str]:
        ranked = [f"{name}_{rank}" for rank in range(1, self.k + 1) for name in ("label", "index", "score")]
        return ["path", "status", "error", "model_version", *ranked]

    def flat(self, line: dict) -> dict:
        error = line.get("error", {})
        row = {"path": line["path"], "status": error.get("status", ""), "error": error.get("detail", ""),
               "model_version": line.get("model_version", "")}
        for rank, prediction in enumerate(line.get("predictions", []), start=1):
            row.update({f"{name}_{rank}": value for name, value in prediction.items()})
        return row


@dataclass
class Prepared:
    key: bytes | None  # in the cache (None: unreadable, or no cache)
    answer: Any  # probabilities [1000] or an exception, when known without a forward pass; else None
    image: Any = None  # the model's input [3, 224, 224], when the answer is not known yet


def read_and_prepare(path: Path, cache: ResultCache | None, prepare: Callable[[bytes], Any]) -> Prepared:
    """A file -> its answer from the cache, or its model input, or why it has none (in a decode thread)."""
    from classifier.inference import images

    try:
        data = path.read_bytes()
    except OSError as error:
        return Prepared(None, images.NotAnImage(f"the file could not be read ({error.strerror or type(error).__name__})"))
    key = cache.key(data) if cache is not None else None
    if key is not None and (kept := cache.get(key)) is not None:
        return Prepared(key, kept)
    try:
        return Prepared(key, None, prepare(data))
    except images.ImageError as error:
        return Prepared(key, error)


def answer(batch: list[Prepared], cache: ResultCache | None, predict: Callable[[Any], Any]) -> list[Any]:
    """Each file's probabilities or exception: one forward pass for the images whose answer is not known, each
    distinct image once (a batch that fails is retried image by image, batching.predict_each), then kept."""
    from classifier.inference.batching import predict_each

    todo: dict[bytes | int, int] = {}  # key (or position, without a cache) -> index in the forward pass
    for position, item in enumerate(batch):
        if item.answer is None and item.key is not None and (kept := cache.get(item.key)) is not None:
            item.answer = kept  # computed since it was read: an identical file in the batch before
        elif item.answer is None:
            todo.setdefault(item.key or position, len(todo))
    images = {index: item.image for position, item in enumerate(batch) if item.answer is None
              for index in [todo[item.key or position]]}
    computed = predict_each(predict, [images[index] for index in range(len(todo))]) if todo else []
    if cache is not None:
        for key, index in todo.items():
            if isinstance(key, bytes):
                cache.put(key, computed[index])
    return [item.answer if item.answer is not None else computed[todo[item.key or position]]
            for position, item in enumerate(batch)]


def batches(paths: list[Path], pool: ThreadPoolExecutor, size: int, cache: ResultCache | None,
            prepare: Callable[[bytes], Any]) -> Iterator[tuple[list[Path], list[Prepared]]]:
    """(paths, what each became) a batch at a time; the next batch decodes while this one is predicted."""
    pending: deque[tuple[list[Path], list[Future]]] = deque()
    for start in range(0, len(paths), size):
        chunk = paths[start : start + size]
        pending.append((chunk, [pool.submit(read_and_prepare, path, cache, prepare) for path in chunk]))
        if len(pending) > 1:
            done, futures = pending.popleft()
            yield done, [future.result() for future in futures]
    while pending:
        done, futures = pending.popleft()
        yield done, [future.result() for future in futures]


def main(argv: list[str] | None = None, runtime: Runtime | None = None) -> int:
    """runtime: a model already loaded (tests share one); by default the one the settings choose."""
    args = arguments(argv)
    inputs = existing(args.inputs)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    from classifier.errors import ModelLoadError
    from classifier.inference import runtimes
    from classifier.inference.cache import ResultCache
    from classifier.inference.outcomes import outcome
    from classifier.inference.runtime import scored
    from classifier.settings import get_settings
    from classifier.tracing import Tracing

    settings = get_settings()
    tracing = Tracing(settings.otel_traces_exporter)  # a span per batch, when OTEL_TRACES_EXPORTER is set
    if runtime is None:
        try:
            runtime = runtimes.load(settings)
        except ModelLoadError as error:
            raise SystemExit(f"Cannot load the model: {error}") from None
    # Identical files are classified once per run (the same bytes: a copy, a re-export of the same file).
    cache = ResultCache(settings.cache_entries, runtime.answer_context(settings)) if settings.cache_entries else None

    def prepare(data: bytes) -> Any:
        return runtime.prepare(data, settings.max_image_pixels, settings.jpeg_draft)

    def predict(batch: Any) -> list[Any]:  # each row says the version that computed it, as the service's do
        return [scored(row, runtime.version) for row in runtime.predict(batch)]

    images, others = find_images(inputs)
    images = [path for path in images if in_shard(path, args.shard)]
    results = Results(args.out, args.format, args.k)
    already = results.done() if args.resume else set()
    if results.versions - {runtime.version}:  # one results file, one model: never continued on other weights
        print(f"python -m classify: error: {args.out} holds predictions of model version "
              f"{', '.join(sorted(results.versions))}; this run's is {runtime.version}: choose another --out",
              file=sys.stderr)
        raise SystemExit(2)
    todo = [path for path in images if str(path) not in already]

    failed = 0
    started = time.perf_counter()
    with ThreadPoolExecutor(args.workers, "decode", initializer=runtime.init_decode_thread) as pool, \
            tqdm(total=len(todo), unit="img", file=sys.stderr, disable=None) as progress:
        for paths, prepared in batches(todo, pool, args.batch_size, cache, prepare):
            with tracing.tracer.start_as_current_span("classify batch", attributes={"images": len(paths)}) as span:
                lines = [{"path": str(path), **outcome(result, args.k, runtime.labels)}
                         for path, result in zip(paths, answer(prepared, cache, predict))]
                failed_here = sum("error" in line for line in lines)
                span.set_attribute("images.failed", failed_here)
                results.append(lines)
            failed += failed_here
            progress.update(len(paths))
    elapsed = time.perf_counter() - started
    tracing.shutdown()
    classified = len(todo) - failed
    print(
        f"classified {classified}, failed {failed}, skipped {len(images) - len(todo)} already done"
        f" and {len(others)} non-image files, in {elapsed:.1f} s: {len(todo) / max(elapsed, 1e-9):.1f} images/s",
        file=sys.stderr,
    )
    for path in others[:10]:
        print(f"  not an image by its extension: {path}", file=sys.stderr)
    if len(others) > 10:
        print(f"  ... and {len(others) - 10} more", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
