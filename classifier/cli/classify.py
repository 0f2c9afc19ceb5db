"""The offline batch job: classify folders (recursively), files or objects in S3, no HTTP.

    python -m classify PHOTOS_DIR|s3://bucket/prefix ... --out results.jsonl|DIR/|s3://bucket/prefix
                      [--format jsonl|csv|parquet] [--k 5] [--batch-size 16] [--workers N] [--downloads 16]
                      [--part-size 1000] [--resume] [--shard i/n]

One outcome per image (results.py says where and how it is written, so that a crash loses at most a batch, or a
part, and `--resume` carries on exactly once). Each is an image's outcome as the API gives it: {"path",
"predictions": [{label, index, score}, ...], "model_version"} or {"path", "error": {"status", "detail"}}. The
images flow in three overlapping stages: reads (downloads, --downloads in flight), decoding (--workers threads,
one batch ahead), the forward pass. Listing an S3 prefix is streamed a page at a time. Decoding and the forward
pass are the service's (Runtime.prepare, batching.predict_each: a batch that fails is retried image by image),
with the service's settings (MODEL_WEIGHTS, BACKEND, PRECISION, MAX_IMAGE_PIXELS, JPEG_DRAFT, ...); S3 is
configured by the standard AWS variables (storage.py). Exit status: 0 when every image was classified, 1 when
any failed, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import itertools
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

from classifier import storage
from classifier.cli.results import FORMATS, open_results
from classifier.errors import ServiceError
from classifier.inference.images import SUFFIXES, NotAnImage
from classifier.inference.runtime import NUM_CLASSES
from classifier.storage import ObjectURL

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


def usage_error(message: str) -> SystemExit:
    print(f"python -m classify: error: {message}", file=sys.stderr)
    return SystemExit(2)


def check_inputs(inputs: list[str]) -> None:
    """Exit 2 naming the first input that is not a local file or folder, or an S3 prefix with objects below it
    (checked when the job runs, not when its arguments are parsed: a manifest's are checked on machines
    without its files)."""
    for text in inputs:
        if storage.is_url(text):
            try:
                next(storage.objects_below(ObjectURL.parse(text)))
            except StopIteration:
                raise usage_error(f"{text}: no objects there") from None
            except (ValueError, ServiceError) as error:
                raise usage_error(f"{text}: {error}") from None
        elif "://" in text:  # Path() would fold "http://host/x" into "http:/host/x", a file that is simply not there
            raise usage_error(f"{text}: only local files and folders and s3:// are read")
        elif not Path(text).exists():
            raise usage_error(f"{text}: no such file or folder")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m classify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="folders (searched recursively), image files, s3://bucket/prefix")
    parser.add_argument("--out", required=True,
                        help="a results file; a folder or s3://bucket/prefix for a dataset of parts (results.py)")
    parser.add_argument("--format", choices=FORMATS, default="jsonl", help="parquet: always a dataset of parts")
    parser.add_argument("--k", type=positive, default=5, help="labels per image (default 5)")
    parser.add_argument("--batch-size", type=positive, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--workers", type=positive, default=len(os.sched_getaffinity(0)),
                        help="decoding threads (default: the CPUs)")
    parser.add_argument("--downloads", type=positive, default=16, help="reads in flight (default 16)")
    parser.add_argument("--part-size", type=positive, default=1000,
                        help="images per part of a dataset (default 1000): a crash loses at most one part's work")
    parser.add_argument("--resume", action="store_true", help="skip images already in --out and add the rest")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="i/n",
                        help="classify only shard i of n (0-based); run n copies anywhere to split the work")
    args = parser.parse_args(argv)
    if args.k > NUM_CLASSES:
        parser.error(f"--k must be at most {NUM_CLASSES}")
    return args


def listing(inputs: Iterable[str]) -> Iterator[str]:
    """Every file and object the inputs name, in a stable order, streamed."""
    for text in inputs:
        if storage.is_url(text):
            yield from map(str, storage.objects_below(ObjectURL.parse(text)))
        elif Path(text).is_dir():
            yield from sorted(str(path) for path in Path(text).rglob("*") if path.is_file())
        else:
            yield text


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in SUFFIXES


def in_shard(name: str, shard: tuple[int, int]) -> bool:
    # A hash of the name, not its position, so a shard keeps its files when others are added.
    index, count = shard
    return zlib.crc32(name.encode()) % count == index


def read(name: str) -> bytes:
    """A file's or an object's bytes (in a read thread), or an error naming it."""
    if storage.is_url(name):
        return storage.read(ObjectURL.parse(name))
    try:
        return Path(name).read_bytes()
    except OSError as error:
        raise NotAnImage(f"the file could not be read ({error.strerror or type(error).__name__})") from None


@dataclass
class Prepared:
    key: bytes | None  # in the cache (None: unreadable, or no cache)
    answer: Any  # probabilities [1000] or an exception, when known without a forward pass; else None
    image: Any = None  # the model's input [3, 224, 224], when the answer is not known yet


def prepare_read(reading: Future[bytes], cache: ResultCache | None, prepare: Callable[[bytes], Any]) -> Prepared:
    """Read bytes -> their answer from the cache, or their model input, or why they have none (a decode thread)."""
    from classifier.inference import images

    try:
        data = reading.result()
    except ServiceError as error:
        return Prepared(None, error)
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


def batches(names: Iterator[str], readers: ThreadPoolExecutor, decoders: ThreadPoolExecutor, size: int, ahead: int,
            cache: ResultCache | None, prepare: Callable[[bytes], Any]) -> Iterator[tuple[list[str], list[Prepared]]]:
    """(names, what each became) a batch at a time. While one batch is predicted, the next decodes and the `ahead`
    after it are read: at most (ahead + 2) batches of bytes in memory, however long the listing."""
    reading: deque[tuple[list[str], list[Future[bytes]]]] = deque()
    decoding: deque[tuple[list[str], list[Future[Prepared]]]] = deque()

    def decode_next() -> None:
        chunk, reads = reading.popleft()
        decoding.append((chunk, [decoders.submit(prepare_read, done, cache, prepare) for done in reads]))

    def predict_next() -> tuple[list[str], list[Prepared]]:
        chunk, decodes = decoding.popleft()
        return chunk, [future.result() for future in decodes]

    while chunk := list(itertools.islice(names, size)):
        reading.append((chunk, [readers.submit(read, name) for name in chunk]))
        if len(reading) > ahead:
            decode_next()
        if len(decoding) > 1:
            yield predict_next()
    while reading or decoding:
        if reading:
            decode_next()
        if len(decoding) > 1 or not reading:
            yield predict_next()


@dataclass
class Tally:
    """What the listing held, counted as it streams past."""

    images: int = 0
    already_done: int = 0
    others: int = 0
    some_others: list[str] | None = None

    def todo(self, names: Iterable[str], shard: tuple[int, int], done: dict[str, str | None]) -> Iterator[str]:
        self.some_others = []
        for name in names:
            if not is_image(name):
                self.others += 1
                if len(self.some_others) < 10:
                    self.some_others.append(name)
            elif in_shard(name, shard):
                self.images += 1
                if name in done:
                    self.already_done += 1
                else:
                    yield name


def main(argv: list[str] | None = None, runtime: Runtime | None = None) -> int:
    """runtime: a model already loaded (tests share one); by default the one the settings choose."""
    args = arguments(argv)
    check_inputs(args.inputs)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.format == "parquet":
            import pyarrow  # noqa: F401 (the default image has it; a slim one does not)
        results = open_results(args.out, args.format, args.k, args.shard, args.part_size)
        if not args.resume and results.exists():
            raise usage_error(f"{args.out} exists: pass --resume to continue it, or choose another --out")
        done = results.done() if args.resume else {}
    except (ServiceError, ImportError) as error:
        raise usage_error(f"{args.out}: {error}") from None
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
    if other := set(done.values()) - {None, runtime.version}:  # one output, one model: never continued on other weights
        raise usage_error(f"{args.out} holds predictions of model version {', '.join(sorted(other))}; this run's is "
                          f"{runtime.version}: choose another --out")
    # Identical files are classified once per run (the same bytes: a copy, a re-export of the same file).
    cache = ResultCache(settings.cache_entries, runtime.answer_context(settings)) if settings.cache_entries else None

    def prepare(data: bytes) -> Any:
        return runtime.prepare(data, settings.max_image_pixels, settings.jpeg_draft)

    def predict(batch: Any) -> list[Any]:  # each row says the version that computed it, as the service's do
        return [scored(row, runtime.version) for row in runtime.predict(batch)]

    tally = Tally()
    failed = classified = 0
    started = time.perf_counter()
    ahead = -(-args.downloads // args.batch_size)  # batches read ahead: the downloads in flight
    with ThreadPoolExecutor(args.downloads, "read") as readers, \
            ThreadPoolExecutor(args.workers, "decode", initializer=runtime.init_decode_thread) as decoders, \
            tqdm(unit="img", file=sys.stderr, disable=None) as progress:
        todo = tally.todo(listing(args.inputs), args.shard, done)
        try:
            for names, prepared in batches(todo, readers, decoders, args.batch_size, ahead, cache, prepare):
                with tracing.tracer.start_as_current_span("classify batch", attributes={"images": len(names)}) as span:
                    lines = [{"path": name, **outcome(result, args.k, runtime.labels)}
                             for name, result in zip(names, answer(prepared, cache, predict))]
                    failed_here = sum("error" in line for line in lines)
                    span.set_attribute("images.failed", failed_here)
                    results.append(lines)
                failed += failed_here
                classified += len(lines) - failed_here
                progress.update(len(names))
            results.finish()
        except ServiceError as error:  # the listing, or writing a part, failed: what is written stays, for --resume
            tracing.shutdown()
            print(f"python -m classify: stopped: {error}; what was written stays: run again with --resume",
                  file=sys.stderr)
            return 1
    elapsed = time.perf_counter() - started
    tracing.shutdown()
    print(
        f"classified {classified}, failed {failed}, skipped {tally.already_done} already done"
        f" and {tally.others} non-image files, in {elapsed:.1f} s: {(classified + failed) / max(elapsed, 1e-9):.1f} images/s",
        file=sys.stderr,
    )
    for name in tally.some_others or []:
        print(f"  not an image by its extension: {name}", file=sys.stderr)
    if tally.others > 10:
        print(f"  ... and {tally.others - 10} more", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
