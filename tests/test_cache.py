"""The response cache: a repeat is answered from it with the same answer, anything that can change the answer
changes the key, it holds at most CACHE_ENTRIES, and every door shares it (online, jobs, python -m classify)."""

from __future__ import annotations

import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from support import Server, encode, large_jpeg, photo, photo_bytes, start_server, upload

pytestmark = pytest.mark.app


def values(server_or_client, *names: str) -> dict[str, float]:
    text = (server_or_client.get("/metrics") if not isinstance(server_or_client, Server)
            else httpx.get(f"{server_or_client.url}/metrics")).text
    return {name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1)) for name in names}


def distinct_jpeg(seed: int) -> bytes:
    """A photo no other test sends: its answer cannot be in the cache yet."""
    return encode(photo("astronaut.png").convert("RGB").rotate(seed % 360).resize((320 + seed % 50, 240)), "JPEG",
                  quality=85 + seed % 10)


COUNTS = ("cache_hits_total", "cache_misses_total", "inference_batch_size_sum", "cache_entries")


def test_a_repeat_is_a_hit_with_the_same_answer_and_no_forward_pass(client):
    data = distinct_jpeg(1)
    before = values(client, *COUNTS)
    first = client.post("/predict/topk?k=1000", files=upload(data))
    again = client.post("/predict/topk?k=1000", files=upload(data))
    after = values(client, *COUNTS)
    assert first.status_code == again.status_code == 200 and first.content == again.content
    grew = {name: after[name] - before[name] for name in COUNTS}
    assert grew == {"cache_hits_total": 1, "cache_misses_total": 1, "inference_batch_size_sum": 1, "cache_entries": 1}
    changed = bytearray(data)
    changed[-3] ^= 1  # one byte of the JPEG's last scan: another image for the cache
    assert client.post("/predict", files=upload(bytes(changed))).status_code == 200
    assert values(client, "cache_misses_total")["cache_misses_total"] == after["cache_misses_total"] + 1


def test_a_refused_image_is_refused_again_the_same_way(client):
    before = values(client, "cache_hits_total")
    answers = [client.post("/predict", files=upload(b"not a photo, kept as such")) for _ in range(2)]
    assert [a.status_code for a in answers] == [400, 400] and answers[0].json() == answers[1].json()
    after = values(client, "cache_hits_total")
    assert after["cache_hits_total"] == before["cache_hits_total"] + 1


def test_another_setting_that_changes_the_answer_never_gets_this_answer(client, service, app_with):
    """JPEG_DRAFT decodes big JPEGs smaller: the same bytes under it are another key, and get the draft answer."""
    data = large_jpeg("coffee.png", 1600, seed=3)
    exact = client.post("/predict/topk?k=1000", files=upload(data)).json()["predictions"]
    with app_with(JPEG_DRAFT="true") as drafting:  # the setting whose answers differ
        drafted_service = drafting.app.state.service
        assert drafted_service.cache.key(data) != service.cache.key(data)
        drafted = drafting.post("/predict/topk?k=1000", files=upload(data)).json()["predictions"]
        assert drafted_service.cache.misses == 1
    assert drafted != exact  # computed anew, from the smaller decode


def test_identical_images_at_once_are_computed_once(client):
    data = distinct_jpeg(2)
    before = values(client, *COUNTS)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.post("/predict/topk?k=5", files=upload(data)), range(8)))
    after = values(client, *COUNTS)
    assert {a.status_code for a in answers} == {200} and len({a.content for a in answers}) == 1
    assert after["inference_batch_size_sum"] - before["inference_batch_size_sum"] == 1
    assert after["cache_hits_total"] - before["cache_hits_total"] == 7


def test_a_batch_with_duplicates_computes_each_photo_once(client):
    photos = [distinct_jpeg(10), distinct_jpeg(11), distinct_jpeg(10), distinct_jpeg(12), distinct_jpeg(11)]
    before = values(client, *COUNTS)
    results = client.post("/predict/batch?k=3", files=[("files", (f"{i}.jpg", data)) for i, data in enumerate(photos)]
                          ).json()["results"]
    after = values(client, *COUNTS)
    assert after["inference_batch_size_sum"] - before["inference_batch_size_sum"] == 3
    assert results[0]["predictions"] == results[2]["predictions"] and results[1]["predictions"] == results[4]["predictions"]


def test_the_cache_unit_keeps_the_most_recently_used_and_only_clean_answers():
    from classifier.inference.cache import ResultCache
    from classifier.inference.images import NotAnImage

    cache = ResultCache(2, "settings A")
    a, b, c = (cache.key(data) for data in (b"a", b"b", b"c"))
    cache.put(a, np.ones(1000, np.float32))
    cache.put(b, NotAnImage("not an image"))
    assert isinstance(cache.get(a), np.ndarray)  # a is now the most recently used
    cache.put(c, np.zeros(1000, np.float32))
    assert cache.get(b) is None and cache.evictions == 1 and len(cache) == 2
    cache.put(b, RuntimeError("a bug is never kept"))
    assert cache.get(b) is None
    assert ResultCache(2, "settings B").key(b"a") != a  # other settings: another key


@pytest.fixture(scope="module")
def small_cache(weights_file, tmp_path_factory) -> Server:
    server = start_server(tmp_path_factory.mktemp("small-cache"), CACHE_ENTRIES="2")
    yield server
    server.stop()


@pytest.mark.server
def test_eviction_at_the_bound(small_cache):
    datas = [distinct_jpeg(20 + i) for i in range(3)]
    for data in datas:
        assert httpx.post(f"{small_cache.url}/predict", files=upload(data)).status_code == 200
    counts = values(small_cache, "cache_entries", "cache_evictions_total", "cache_misses_total")
    assert (counts["cache_entries"], counts["cache_evictions_total"], counts["cache_misses_total"]) == (2, 1, 3)
    assert httpx.post(f"{small_cache.url}/predict", files=upload(datas[0])).status_code == 200  # evicted: computed
    assert values(small_cache, "cache_misses_total")["cache_misses_total"] == 4
    assert httpx.get(f"{small_cache.url}/model").json()["cache"]["capacity"] == 2


@pytest.mark.server
def test_cache_entries_zero_computes_every_time(weights_file, tmp_path):
    server = start_server(tmp_path, CACHE_ENTRIES="0")
    try:
        data = photo_bytes("coffee.png")
        for _ in range(3):
            assert httpx.post(f"{server.url}/predict", files=upload(data)).status_code == 200
        counts = values(server, "inference_batch_size_sum", "cache_hits_total", "cache_entries")
        assert counts == {"inference_batch_size_sum": 3, "cache_hits_total": 0, "cache_entries": 0}
        assert httpx.get(f"{server.url}/model").json()["cache"] == {"entries": 0, "capacity": 0, "bytes_at_most": 0}
    finally:
        server.stop()


@pytest.mark.server
def test_a_job_with_duplicates_computes_each_distinct_photo_once(small_cache):
    photos = [distinct_jpeg(30 + i % 3) for i in range(12)]  # 3 distinct, 4 times each
    before = values(small_cache, "inference_batch_size_sum")
    job = httpx.post(f"{small_cache.url}/jobs", files=[("files", (f"{i}.jpg", data)) for i, data in enumerate(photos)],
                     headers={"Prefer": "wait=60"}, timeout=90).json()
    assert (job["status"], job["done"], job["failed"]) == ("succeeded", 12, 0)
    assert values(small_cache, "inference_batch_size_sum")["inference_batch_size_sum"] - before["inference_batch_size_sum"] == 3
    entries = httpx.get(f"{small_cache.url}/jobs/{job['id']}/results").json()["results"]
    assert entries[0]["predictions"] == entries[3]["predictions"] == entries[9]["predictions"]


def test_the_offline_job_classifies_identical_files_once(runtime, tmp_path: Path, reference):
    from classifier.cli import classify

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(9):  # 3 distinct photos, 3 copies each, spread over batches of 4
        (folder / f"{i}.png").write_bytes(photo_bytes(("chelsea.png", "coffee.png", "astronaut.png")[i % 3]))
    forwarded = []

    def counting_predict(batch):
        if abs(batch).sum() > 0:  # not the warm-up pass on zeros
            forwarded.append(len(batch))
        return runtime.predict(batch)

    out = tmp_path / "results.jsonl"
    counting = dataclasses.replace(runtime, predict=counting_predict)
    assert classify.main([str(folder), "--out", str(out), "--batch-size", "4"], runtime=counting) == 0
    assert sum(forwarded) == 3
    import json

    lines = {json.loads(line)["path"]: json.loads(line) for line in out.read_text().splitlines()}
    assert lines[str(folder / "0.png")]["predictions"] == lines[str(folder / "6.png")]["predictions"]
