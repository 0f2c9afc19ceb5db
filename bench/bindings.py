"""The cost of each way in: POST /predict, the Open Inference Protocol over HTTP (/v2, binary) and over gRPC,
driven alike (Python threads, one client each, the same ImageNet-size JPEG), at c=1 and c=8.

    python -m bench.bindings [--seconds 10]

Also run by bench/benchmark.py (make bench). The service runs with its cache off, as in every other row.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

import httpx
import numpy as np

from bench.harness import drive, free_port, imagenet_size_jpeg, print_rows, service_env, start_server


def measure(seconds: float) -> list[dict]:
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client

    work = Path(tempfile.mkdtemp(prefix="bench-bindings-"))
    grpc_port = free_port()
    env = {**service_env(work), "GRPC_PORT": str(grpc_port), "JOBS_DATABASE_URL": f"sqlite:///{work / 'jobs.sqlite3'}"}
    photo = imagenet_size_jpeg()
    service = start_server(env)
    rows = []
    try:
        host = service.url.removeprefix("http://")
        local = threading.local()

        def clients():  # noqa: ANN202 (one of each per thread)
            if not hasattr(local, "http"):
                local.http = httpx.Client(timeout=60)
                local.v2 = http_client.InferenceServerClient(host, network_timeout=60)
                local.grpc = grpc_client.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            return local

        def predict() -> None:
            clients().http.post(f"{service.url}/predict", files={"file": ("photo.jpg", photo)}).raise_for_status()

        def v2() -> None:
            image = http_client.InferInput("image", [1], "BYTES")
            image.set_data_from_numpy(np.array([photo], dtype=np.object_), binary_data=True)
            clients().v2.infer("resnet18", [image], outputs=[http_client.InferRequestedOutput("probabilities", class_count=5)])

        def grpc() -> None:
            image = grpc_client.InferInput("image", [1], "BYTES")
            image.set_data_from_numpy(np.array([photo], dtype=np.object_))
            clients().grpc.infer("resnet18", [image], outputs=[grpc_client.InferRequestedOutput("probabilities", class_count=5)])

        for name, call in (("POST /predict", predict), ("/v2 over HTTP, binary", v2), ("/v2 over gRPC", grpc)):
            call()  # warm
            for concurrency in (1, 8):
                rows.append({"row": f"binding: {name} c={concurrency}", **drive(call, concurrency, seconds)})
    finally:
        service.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    print_rows(measure(parser.parse_args().seconds))


if __name__ == "__main__":
    main()
