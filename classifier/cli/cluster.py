"""python -m classify's work as a Ray Data pipeline, for a Ray cluster: the same outcomes, many machines.

    python -m classifier.cli.cluster INPUT... --out DIR|s3://bucket/prefix [--format parquet|jsonl] [--k 5]
                                     [--batch-size 16] [--actors N]

    names (listed here, on the driver) --read + decode + preprocess: CPU tasks--> model inputs
          --forward pass: an autoscaling pool of actors, each loading the runtime once--> outcomes
          --Ray's writers--> part files in DIR or under s3://bucket/prefix

Inputs, settings and outcomes are python -m classify's: folders, files and s3:// prefixes; the service's
settings (MODEL_ONNX=FILE makes every actor a slim one, with no torch; the file must be readable on every node);
the AWS variables for S3. The rows are results.py's Parquet rows (path, status, error, model_version,
predictions), also as JSON lines. A bad image is a row with its error, never a failed run. Against an existing
cluster: RAY_ADDRESS=host:6379, or `ray job submit --working-dir . -- python -m classifier.cli.cluster ...`.
Ray is an optional dependency (requirements.txt); nothing else imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from typing import Any

import numpy as np

from classifier.cli import classify
from classifier.cli.results import parquet_schema, row
from classifier.inference.preprocessing import Preprocessing


# What an actor holds (a loaded runtime: about 1 GiB resident with torch, less slim): Ray places no more actors on a
# node than its memory takes. Declaring it also keeps the decode tasks out of the actors: Ray fuses consecutive
# stages whose resources match, and the images would then be decoded one at a time, inside the one process that
# also runs the forward pass.
ACTOR_MEMORY = 1 << 30


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m classifier.cli.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="folders (searched recursively), image files, s3://bucket/prefix")
    parser.add_argument("--out", required=True, help="a folder or s3://bucket/prefix: Ray writes its part files there")
    parser.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    parser.add_argument("--k", type=classify.positive, default=5, help="labels per image (default 5)")
    parser.add_argument("--batch-size", type=classify.positive, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--actors", type=classify.positive, default=1,
                        help="the most model actors the pool grows to (default 1; one per machine is typical)")
    return parser.parse_args(argv)


def forwarded_environment() -> dict[str, str]:
    """What workers on other machines must see as the driver does: the service's settings and the AWS variables."""
    from classifier.settings import Settings

    settings = {name.upper() for name in Settings.model_fields}
    return {name: value for name, value in os.environ.items()
            if name in settings or name.startswith(("AWS_", "OTEL_", "TORCH_HOME"))}


def model_preprocessing() -> Preprocessing:
    """The model's preprocessing constants, which the decode tasks need without loading the model."""
    from classifier.settings import get_settings

    settings = get_settings()
    if settings.model_onnx is not None:
        from classifier.inference.runtimes import onnx_runtime

        return onnx_runtime.read(settings.model_onnx, 1).preprocessing
    from classifier.inference.runtimes.torch_runtime import preprocessing

    return preprocessing


def read_and_prepare(batch: dict[str, np.ndarray], preprocessing: Preprocessing) -> dict[str, np.ndarray]:
    """A CPU task: each name's bytes -> its centre crop (uint8: a quarter of the bytes to move to an actor), or
    its error (status, detail) and a blank crop."""
    from classifier.errors import ServiceError
    from classifier.inference import images
    from classifier.inference.outcomes import failure
    from classifier.settings import get_settings

    settings = get_settings()
    # As the service's decoders (Runtime.init_decode_thread): the lowest CPU priority, so that decoding takes the
    # forward pass's gaps on a shared node instead of stalling its threads.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    inputs, statuses, details = [], [], []
    for name in batch["path"]:
        try:
            picture = images.decode(classify.read(name), preprocessing.resize, settings.max_image_pixels,
                                    settings.jpeg_draft)
            inputs.append(preprocessing.cropped(picture))
            statuses.append(0)
            details.append("")
        except ServiceError as error:
            problem = failure(error)
            inputs.append(np.zeros((preprocessing.crop, preprocessing.crop, 3), np.uint8))
            statuses.append(problem.status)
            details.append(problem.detail)
    return {"path": batch["path"], "image": np.stack(inputs), "status": np.asarray(statuses, np.int32),
            "detail": np.asarray(details, dtype=object)}


class Classifier:
    """An actor: the runtime the settings choose, loaded once; a batch of inputs -> their outcome rows."""

    def __init__(self, k: int) -> None:
        from classifier.inference import runtimes
        from classifier.settings import get_settings

        self.runtime, self.k = runtimes.load(get_settings()), k
        self.normalized = self.runtime.preprocessing.normalized

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        return pa.Table.from_pylist([row(line) for line in self.lines(batch)], parquet_schema())

    def lines(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        from classifier.inference.batching import predict_each
        from classifier.inference.outcomes import outcome
        from classifier.inference.runtime import scored

        good = [i for i, status in enumerate(batch["status"]) if status == 0]
        version = self.runtime.version
        computed = predict_each(lambda images: [scored(r, version) for r in self.runtime.predict(images)],
                                [self.normalized(batch["image"][i]) for i in good]) if good else []
        answers = dict(zip(good, computed))
        return [{"path": str(name), **(outcome(answers[i], self.k, self.runtime.labels) if i in answers else
                                       {"error": {"status": int(batch["status"][i]), "detail": str(batch["detail"][i])}})}
                for i, name in enumerate(batch["path"])]


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    classify.check_inputs(args.inputs)
    import ray

    import classifier

    # The package travels to every worker (a few hundred kB: never the folder it runs from, with its venv).
    ray.init(runtime_env={"env_vars": forwarded_environment(), "py_modules": [os.path.dirname(classifier.__file__)]})
    names = [{"path": name} for name in classify.listing(args.inputs) if classify.is_image(name)]
    if not names:
        raise classify.usage_error("no images in the inputs")
    dataset = (ray.data.from_items(names, override_num_blocks=max(1, len(names) // args.batch_size))
               .map_batches(read_and_prepare, fn_kwargs={"preprocessing": model_preprocessing()},
                            batch_size=args.batch_size, num_cpus=1)
               .map_batches(Classifier, fn_constructor_kwargs={"k": args.k}, batch_size=args.batch_size,
                            concurrency=(1, args.actors), num_cpus=1, memory=ACTOR_MEMORY))
    if args.format == "parquet":
        dataset.write_parquet(args.out)
    else:
        dataset.write_json(args.out)
    print(dataset.stats(), file=sys.stderr)  # where the time went, stage by stage
    print(f"classified {len(names)} images into {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
