"""The batching pipeline: batches form, each caller gets its own row, failures and overload stay contained."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from support import PHOTOS, block_the_worker, encode, large_jpeg, photo, photo_bytes, upload

pytestmark = pytest.mark.unit


def make_batcher(predict, *, max_batch_size=8, max_delay_s=0.05, max_queue=64, prepare=None, idle_s=0.01, **job_batches):
    from classifier.inference.batching import Batcher

    def decode_number(data: bytes) -> np.ndarray:
        return np.full((2,), float(data.decode()), np.float32)

    return Batcher(prepare or decode_number, predict, max_batch_size=max_batch_size, max_delay_s=max_delay_s,
                   max_queue=max_queue, decode_workers=2, idle_s=idle_s, **job_batches)


async def until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.005)


def test_online_images_go_before_background_ones_and_never_share_their_batch():
    """Background (job) images queued first still wait: online images get the next forward pass, and a
    batch holds only one kind."""
    batches = []
    entered, gate = threading.Event(), threading.Event()

    def predict(batch: np.ndarray) -> np.ndarray:
        entered.set()
        gate.wait(30)
        batches.append(sorted(int(value) for value in batch[:, 0].tolist()))
        return batch

    async def scenario():
        batcher = make_batcher(predict, max_batch_size=4)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(b"1000", background=True))  # occupies the forward pass
            await until(entered.is_set)
            background = [asyncio.ensure_future(batcher.submit(str(1001 + i).encode(), background=True)) for i in range(6)]
            await until(lambda: batcher._background.qsize() == 6)  # decoded and queued before the online ones arrive
            with batcher.admit(3):
                online = [asyncio.ensure_future(batcher.submit(str(i).encode())) for i in range(3)]
                await until(lambda: batcher._queue.qsize() == 3)
                gate.set()
                await asyncio.gather(first, *background, *online)
        finally:
            await batcher.stop(timeout_s=1)

    asyncio.run(scenario())
    assert batches[0] == [1000]
    assert batches[1] == [0, 1, 2]  # online first, alone
    assert all(min(batch) >= 1000 for batch in batches[2:]) and sum(len(b) for b in batches[2:]) == 6


def test_background_images_wait_while_online_images_keep_arriving():
    """A steady online stream (gaps shorter than idle_s) keeps the forward pass; the job goes on after it."""
    order = []

    def predict(batch: np.ndarray) -> np.ndarray:
        order.extend("job" if value >= 1000 else "online" for value in batch[:, 0].tolist())
        return batch

    async def scenario():
        batcher = make_batcher(predict, max_delay_s=0, idle_s=0.2)
        await batcher.start()
        try:
            with batcher.admit(1):
                await batcher.submit(b"0")
            job = asyncio.ensure_future(batcher.submit(b"1000", background=True))
            for i in range(1, 10):  # an online image every 20 ms, for 180 ms
                with batcher.admit(1):
                    await batcher.submit(str(i).encode())
                await asyncio.sleep(0.02)
            assert not job.done()
            await asyncio.wait_for(job, 2)
        finally:
            await batcher.stop(timeout_s=1)

    asyncio.run(scenario())
    assert order == ["online"] * 10 + ["job"]


def test_batches_form_under_concurrency_and_each_caller_gets_its_own_row():
    sizes = []

    def predict(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return batch * 10

    async def scenario():
        batcher = make_batcher(predict)
        await batcher.start()
        try:
            with batcher.admit(20):
                rows = await asyncio.gather(*(batcher.submit(str(i).encode()) for i in range(20)))
        finally:
            await batcher.stop(timeout_s=1)
        return rows

    rows = asyncio.run(scenario())
    assert [row.tolist() for row in rows] == [[i * 10.0, i * 10.0] for i in range(20)]
    assert sum(sizes) == 20 and max(sizes) > 1 and max(sizes) <= 8


def test_a_failing_input_fails_only_its_own_caller():
    def predict(batch: np.ndarray) -> np.ndarray:
        if np.isnan(batch).any():
            raise ValueError("NaN in the input")
        return batch + 1

    async def scenario():
        batcher = make_batcher(predict)
        await batcher.start()
        try:
            with batcher.admit(5):
                return await asyncio.gather(*(batcher.submit(x) for x in [b"1", b"2", b"nan", b"4", b"5"]),
                                            return_exceptions=True)
        finally:
            await batcher.stop(timeout_s=1)

    results = asyncio.run(scenario())
    assert isinstance(results[2], ValueError)
    assert [r[0].item() for i, r in enumerate(results) if i != 2] == [2.0, 3.0, 5.0, 6.0]


def test_queue_full_is_refused_at_once():
    from classifier.inference.batching import Overloaded

    batcher = make_batcher(lambda batch: batch, max_queue=3)
    with batcher.admit(2):
        with batcher.admit(1):
            with pytest.raises(Overloaded, match="MAX_QUEUE=3"):
                with batcher.admit(1):
                    pass
        with batcher.admit(1):  # a place became free again
            pass
    assert batcher.in_flight == 0


def test_a_withdrawn_image_is_not_computed():
    seen, release = [], threading.Event()

    def predict(batch: np.ndarray) -> np.ndarray:
        seen.extend(batch[:, 0].tolist())
        release.wait(10)
        return batch

    async def scenario():
        batcher = make_batcher(predict, max_batch_size=1, max_delay_s=0)
        await batcher.start()
        try:
            first = asyncio.create_task(batcher.submit(b"1"))
            while not seen:  # the worker is now busy with image 1
                await asyncio.sleep(0.01)
            withdrawn = asyncio.create_task(batcher.submit(b"2"))
            await until(lambda: batcher._queue.qsize() == 1)  # image 2 is decoded and queued
            withdrawn.cancel()
            kept = asyncio.create_task(batcher.submit(b"3"))
            await until(lambda: batcher._queue.qsize() == 2)
            release.set()
            await asyncio.gather(first, kept)
        finally:
            await batcher.stop(timeout_s=1)

    asyncio.run(scenario())
    assert seen == [1.0, 3.0]


@pytest.mark.app
def test_different_photos_at_once_equal_their_single_answers(client, service, monkeypatch, uncached):
    singles = {name: client.post("/predict/topk?k=10", files=upload(photo_bytes(name))).json() for name in PHOTOS}
    sizes = []
    real_predict = service.batcher.predict

    def recording_predict(batch):
        sizes.append(len(batch))
        return real_predict(batch)

    monkeypatch.setattr(service.batcher, "predict", recording_predict)
    names = list(PHOTOS) * 4
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda n: client.post("/predict/topk?k=10", files=upload(photo_bytes(n))).json(), names))
    assert max(sizes) > 1, "no batch formed"
    for name, answer in zip(names, answers):
        assert [p["index"] for p in answer["predictions"]] == [p["index"] for p in singles[name]["predictions"]]
        for got, single in zip(answer["predictions"], singles[name]["predictions"]):
            assert got["score"] == pytest.approx(single["score"], abs=1e-5)


@pytest.mark.app
def test_overload_is_503_with_retry_after(client, service, monkeypatch):
    started, release = block_the_worker(service, monkeypatch)
    monkeypatch.setattr(service.batcher, "max_queue", 2)
    data = photo_bytes("coffee.png")
    with ThreadPoolExecutor(2) as pool:
        accepted = [pool.submit(client.post, "/predict", files=upload(data)) for _ in range(2)]
        try:
            assert started.wait(30)
            deadline = time.monotonic() + 30
            while service.batcher.in_flight < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = client.post("/predict", files=upload(data))
        finally:
            release.set()
        assert [f.result(30).status_code for f in accepted] == [200, 200]
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "MAX_QUEUE" in refused.json()["detail"]


@pytest.mark.app
def test_waiting_longer_than_the_timeout_is_503(app_with, monkeypatch):
    # A short timeout, so that the test need not wait 10 s for the default's.
    with app_with(REQUEST_TIMEOUT_S="0.3") as client:
        started, release = block_the_worker(client.app.state.service, monkeypatch)
        try:
            response = client.post("/predict", files=upload(photo_bytes("coffee.png")))
        finally:
            release.set()
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "REQUEST_TIMEOUT_S" in response.json()["detail"]
        assert client.post("/predict", files=upload(photo_bytes("coffee.png"))).status_code == 200


@pytest.mark.app
def test_a_disconnected_client_is_not_computed(client, service, monkeypatch, uncached):
    computed = []
    real_predict = service.batcher.predict
    monkeypatch.setattr(service.batcher, "predict", lambda batch: computed.append(len(batch)) or real_predict(batch))
    boundary = "x-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
            + photo_bytes("astronaut.png") + f"\r\n--{boundary}--\r\n".encode())
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    messages = [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def call():
        await client.app(scope, receive, send)

    client.portal.call(call)
    # Batches run in arrival order: once a later image is answered, the withdrawn one would have been computed.
    assert client.post("/predict", files=upload(photo_bytes("coffee.png"))).status_code == 200
    assert computed == [1]


def jpeg_of_size(width: int, height: int) -> bytes:
    return encode(photo("chelsea.png").convert("RGB").resize((width, height), Image.BICUBIC), "JPEG", quality=90)


@pytest.mark.app
@pytest.mark.parametrize("size", [(500, 375), (640, 480), (1000, 500), (1500, 1000)])
def test_draft_decode_leaves_photos_under_twice_its_floor_bit_identical(runtime, settings, size):
    # A shorter side under 2 x 512 px cannot be halved without going below 512: decoded in full.
    data = jpeg_of_size(*size)
    pixels = settings.max_image_pixels
    assert runtime.decode(data, pixels, draft=True).size == size
    assert np.array_equal(runtime.prepare(data, pixels, draft=True), runtime.prepare(data, pixels, draft=False))


@pytest.mark.app
def test_draft_decode_is_off_by_default(service, settings):
    data = large_jpeg("chelsea.png", 1200)
    assert settings.jpeg_draft is False
    assert np.array_equal(service.prepare(data), service.runtime.prepare(data, settings.max_image_pixels, draft=False))


@pytest.mark.app
@pytest.mark.parametrize("name", ["astronaut.png", "coffee.png", "hubble_deep_field.jpg", "motorcycle_right.png"])
@pytest.mark.parametrize("shorter_side", [1024, 1600, 3000])
def test_draft_decode_keeps_twice_the_resize_and_the_answer(runtime, settings, reference_network, name, shorter_side):
    data = large_jpeg(name, shorter_side)
    pixels = settings.max_image_pixels
    decoded = runtime.decode(data, pixels, draft=True)
    assert 512 <= min(decoded.size) < shorter_side  # reduced, but never below twice the 256 px resize
    assert min(decoded.size) < 1024  # the largest reduction that stays at or above 512
    drafted, full = runtime.prepare(data, pixels, draft=True), runtime.prepare(data, pixels, draft=False)
    with torch.inference_mode():
        logits = reference_network(torch.from_numpy(np.stack([drafted, full])))
    # The stand-in weights' answers are flat; sharpened x7 they are as confident as trained weights
    # (bench/accuracy.py), which is where a score difference shows. The performance page publishes what
    # make bench measured.
    for sharpening, bound in ((1, 0.03), (7, 0.06)):
        scores = torch.softmax(logits * sharpening, 1)
        difference = (scores[0] - scores[1]).abs().max().item()
        assert difference <= bound
        # The top-1 label stays, unless the exact answer's two best were closer than the difference can move them.
        best_two = scores[1].topk(2).values
        assert scores[0].argmax() == scores[1].argmax() or (best_two[0] - best_two[1]).item() <= 2 * difference


@pytest.mark.app
def test_draft_decode_keeps_exif_orientation(runtime, settings):
    upright = photo("astronaut.png").convert("RGB").resize((2048, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)
    assert runtime.decode(rotated, settings.max_image_pixels, draft=True).size == (2048 // 2, 1200 // 2)


@pytest.mark.app
def test_a_backend_that_disagrees_with_torch_is_refused(reference_network):
    from classifier.errors import ModelLoadError
    from classifier.inference.runtimes import torch_runtime

    def off_by_a_little(images: torch.Tensor) -> torch.Tensor:
        return reference_network(images) + torch.linspace(0, 1, 1000)

    with pytest.raises(ModelLoadError, match="differs from fp32 torch"):
        torch_runtime.check_parity(off_by_a_little, reference_network, "a test backend")
    served = torch_runtime.torch_forward(reference_network, torch.device("cpu"), "fp32")
    assert torch_runtime.check_parity(served, reference_network, "torch") < 1e-4


@pytest.mark.app
def test_onnxruntime_backend_matches_torchvision_reference(settings, reference):
    import model

    onnx = model.load(settings.model_copy(update={"backend": "onnxruntime"}))
    assert onnx.backend == "onnxruntime" and onnx.max_score_difference < 1e-4
    probabilities = onnx.predict(np.stack([onnx.prepare(photo_bytes(name), settings.max_image_pixels) for name in PHOTOS]))
    for name, scores in zip(PHOTOS, probabilities):
        assert (torch.from_numpy(scores) - reference(photo(name))).abs().max().item() < 1e-4


def job_batches_after_one_online_image(quiet_s: float, **limits: float) -> tuple[list[int], tuple[int, int]]:
    """A batcher whose forward pass takes 10 ms per image: one online image, `quiet_s` of silence, then 40 job
    images. The job batches' sizes, and the size the batcher would give them right after the online image and
    after the silence."""
    background_batches = []

    def predict(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.01 * len(batch))
        if batch[0, 0] >= 1000:
            background_batches.append(len(batch))
        return batch

    async def scenario() -> tuple[int, int]:
        batcher = make_batcher(predict, max_batch_size=8, **limits)
        await batcher.start()
        try:
            with batcher.admit(1):
                await batcher.submit(b"1")  # online traffic is about: the budget applies
            at_once = batcher.job_batch_size()
            await asyncio.sleep(quiet_s)  # a lower bound only
            chosen = at_once, batcher.job_batch_size()
            await asyncio.gather(*(batcher.submit(str(1000 + i).encode(), background=True) for i in range(40)))
            return chosen
        finally:
            await batcher.stop(timeout_s=1)

    chosen = asyncio.run(scenario())
    return background_batches, chosen


def test_job_batches_are_sized_to_the_time_budget_while_online_traffic_is_about():
    """Forward passes of 10 ms per image and a 45 ms budget: job batches of at most 4 (and more than 1)."""
    sizes, (chosen, _) = job_batches_after_one_online_image(0, job_batch_max_s=0.045, job_full_batch_after_s=600)
    assert chosen <= 4
    assert sum(sizes) == 40 and max(sizes) <= 4 and max(sizes) > 1


def test_job_batches_grow_back_to_full_size_once_online_traffic_is_gone():
    # A budget of one image while online traffic is about; quiet for job_full_batch_after_s, the full size.
    sizes, chosen = job_batches_after_one_online_image(0.25, job_batch_max_s=0.015, job_full_batch_after_s=0.2)
    assert chosen == (1, 8) and max(sizes) == 8
