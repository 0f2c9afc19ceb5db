"""How much decoding slows the forward pass when both share the cores, at each decode-thread priority.

    python -m bench.contention [--decoders 2]

The forward pass (batch 8, THREADS threads, in its own thread as in the service) runs while --decoders
threads decode and preprocess JPEGs non-stop, at nice 0, 10 and 19 (what model.init_decode_thread sets).
Prints the forward pass's ms per image, and how many images the decoders managed meanwhile.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.async_jobs import photos
from bench.harness import served_model, service_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoders", type=int, default=2)
    args = parser.parse_args()
    os.environ.update(service_env(Path(tempfile.mkdtemp(prefix="bench-"))))
    runtime, prepare = served_model()
    data = photos(64)
    batch = np.stack([prepare(image) for image in data[:8]])
    inference = runtime.forward_thread

    def forward_ms_per_image(batches: int = 15) -> float:
        started = time.perf_counter()
        for _ in range(batches):
            runtime.predict(batch)
        return (time.perf_counter() - started) / batches / len(batch) * 1000

    print(f"no decoding: {inference.submit(forward_ms_per_image).result():.1f} ms per image")
    for nice in (0, 10, 19):
        stop, decoded = threading.Event(), [0]

        def decode() -> None:
            torch.set_num_threads(1)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            while not stop.is_set():
                prepare(data[decoded[0] % len(data)])
                decoded[0] += 1

        threads = [threading.Thread(target=decode) for _ in range(args.decoders)]
        for thread in threads:
            thread.start()
        started = time.perf_counter()
        ms = inference.submit(forward_ms_per_image).result()
        rate = decoded[0] / (time.perf_counter() - started)
        stop.set()
        for thread in threads:
            thread.join()
        print(f"{args.decoders} decoders at nice {nice:2}: forward {ms:.1f} ms per image, {rate:.0f} images decoded/s meanwhile")


if __name__ == "__main__":
    main()
