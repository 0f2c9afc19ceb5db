"""The web page at GET /, driven in a real browser: Debian's chromium through Playwright.

Also a screenshot tool for reviewers, against a running service:
    .venv/bin/python tests/test_page.py http://127.0.0.1:8000 page.png
"""

from __future__ import annotations

import csv
import http.server
import io
import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from support import browser_page, photo_path

pytestmark = pytest.mark.system


def test_the_page_loads_without_a_console_error_or_a_failed_request(server):
    with browser_page() as page:
        problems: list[str] = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("response", lambda response: problems.append(f"{response.status} {response.url}")
                if response.status >= 400 else None)
        page.on("requestfailed", lambda request: problems.append(f"failed {request.url}"))
        page.goto(server.url + "/", wait_until="networkidle")
        assert page.title() == "What does the model see?"
    assert problems == []


def test_page_shows_the_five_labels_the_api_gives(server, tmp_path):
    chelsea = photo_path("chelsea.png")
    with chelsea.open("rb") as file:
        expected = httpx.post(f"{server.url}/predict/topk?k=5", files={"file": file}).json()["predictions"]
    with browser_page() as page:
        page.goto(server.url + "/")
        assert page.title() == "What does the model see?"
        page.set_input_files("#file", str(chelsea))
        page.wait_for_selector("#predictions li.prediction", timeout=30_000)
        rows = page.locator("#predictions li.prediction")
        assert rows.count() == 5
        shown = [(rows.nth(i).locator(".label").inner_text(), rows.nth(i).locator(".percent").inner_text()) for i in range(5)]
        assert shown == [(p["label"], f"{p['score'] * 100:.1f}%") for p in expected]
        assert "top" in rows.nth(0).get_attribute("class") and "top" not in rows.nth(1).get_attribute("class")
        assert page.locator("#preview").is_visible()
        assert page.inner_text("#status").startswith("Answered in ")
        page.screenshot(path=str(tmp_path / "page.png"))

        text = tmp_path / "notes.txt"
        text.write_text("this is not a photo")
        page.set_input_files("#file", str(text))
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        assert page.inner_text("#error") == ("That file could not be read as a photo: the file is not an image this "
                                             "service can read (JPEG, PNG, GIF, WebP, AVIF, BMP or TIFF).")
        assert page.locator("#predictions li").count() == 0


def test_page_is_reachable_by_keyboard_and_labelled(server):
    with browser_page() as page:
        page.goto(server.url + "/")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "file"
        assert page.locator("label[for=file]").count() == 1
        assert page.get_attribute("#status", "aria-live") == "polite"
        assert page.get_attribute("#error", "role") == "alert"
        assert page.evaluate("document.documentElement.scrollWidth") <= 420  # no sideways scrolling on a phone


def test_page_makes_no_request_to_other_hosts(server):
    with browser_page() as page:
        hosts = []
        page.on("request", lambda request: hosts.append(request.url.split("/")[2]))
        page.goto(server.url + "/")
        page.set_input_files("#file", str(photo_path("coffee.png")))
        page.wait_for_selector("#predictions li.prediction", timeout=30_000)
    assert set(hosts) == {server.url.split("/")[2]}


class _Page(http.server.BaseHTTPRequestHandler):
    """Serves one HTML page that calls the API cross-origin and shows what happened."""

    api = ""

    def do_GET(self) -> None:
        page = f"""<!doctype html><title>other origin</title><pre id="out">waiting</pre><script>
          fetch("{self.api}/predict/topk?k=2", {{method: "POST", body: (() => {{
            const form = new FormData(); form.append("file", new Blob([new Uint8Array([1, 2, 3])]), "x.png"); return form;
          }})()}}).then(r => r.json()).then(b => out.textContent = "answered: " + b.detail, e => out.textContent = "blocked: " + e);
        </script>"""
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.end_headers()
        self.wfile.write(page.encode())

    def log_message(self, *args) -> None:
        pass


@contextmanager
def other_origin(api: str, port: int = 0) -> Iterator[str]:
    handler = type("Handler", (_Page,), {"api": api})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_cross_origin_fetch_follows_cors_origins(weights_file, tmp_path_factory):
    from support import free_port, start_server

    allowed_port = free_port()
    allowed = f"http://127.0.0.1:{allowed_port}"
    api = start_server(tmp_path_factory.mktemp("cors"), CORS_ORIGINS=f"{allowed},https://example.com")
    try:
        with other_origin(api.url) as not_allowed, other_origin(api.url, allowed_port), browser_page() as page:
            page.goto(not_allowed)
            page.wait_for_function("out.textContent !== 'waiting'")
            assert page.inner_text("#out").startswith("blocked: TypeError")

            page.goto(allowed)
            page.wait_for_function("out.textContent !== 'waiting'")
            assert page.inner_text("#out") == ("answered: the file is not an image this service can read "
                                               "(JPEG, PNG, GIF, WebP, AVIF, BMP or TIFF)")
    finally:
        api.stop()


def test_many_photos_run_as_a_job_with_progress_results_and_downloads(server, tmp_path):
    """Several files chosen at once: the page submits one job, fills a progress bar, lists each photo's best
    label as it arrives (a bad file in words) and offers CSV and JSONL downloads of the same answers."""
    from support import PHOTOS, encode, photo

    paths = []
    for i in range(12):
        path = tmp_path / f"photo-{i:02d}.jpg"
        path.write_bytes(encode(photo(PHOTOS[i % len(PHOTOS)]).convert("RGB").rotate(i * 7), "JPEG"))
        paths.append(path)
    broken = tmp_path / "notes.jpg"
    broken.write_bytes(b"this is not a photo")
    paths.append(broken)
    files = [("files", (path.name, path.read_bytes(), "image/jpeg")) for path in paths]
    expected = httpx.post(f"{server.url}/predict/batch?k=5", files=files, timeout=60).json()["results"]

    with browser_page() as page:
        page.goto(server.url + "/")
        page.set_input_files("#file", [str(path) for path in paths])
        page.wait_for_selector("#downloads:not([hidden])", timeout=60_000)
        assert page.locator("#job-progress").get_attribute("max") == "13"
        assert page.eval_on_selector("#job-progress", "bar => bar.value") == 13
        assert "13 of 13 photos (1 could not be classified)" in page.inner_text("#job-status")
        rows = page.locator("#job-results li")
        assert rows.count() == 13
        for i, item in enumerate(expected[:12]):
            best = item["predictions"][0]
            assert rows.nth(i).inner_text().split("\n") == [item["filename"], f"{best['label']} ({best['score'] * 100:.1f}%)"]
        assert rows.nth(12).inner_text().split("\n") == ["notes.jpg", "Could not be read as a photo"]

        with page.expect_download() as download:
            page.click("#download-jsonl")
        lines = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
        assert [line["filename"] for line in lines] == [path.name for path in paths]
        assert [line["predictions"][0]["index"] for line in lines[:12]] == [e["predictions"][0]["index"] for e in expected[:12]]
        with page.expect_download() as download:
            page.click("#download-csv")
        table = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
        assert [row["label"] for row in table[:12]] == [e["predictions"][0]["label"] for e in expected[:12]]
        assert table[12]["error"] and table[12]["label"] == ""


if __name__ == "__main__":
    url, out = sys.argv[1], sys.argv[2]
    with browser_page() as page:
        page.goto(url + "/")
        page.set_input_files("#file", str(photo_path("chelsea.png")))
        page.wait_for_selector("#predictions li.prediction, #error:not([hidden])", timeout=60_000)
        page.screenshot(path=out, full_page=True)
    print(f"saved {out}")


def test_demo_mode_says_everywhere_that_its_answers_mean_nothing(weights_file, tmp_path):
    from support import start_server

    log = tmp_path / "server.log"
    server = start_server(tmp_path, log=log, DEMO="true", MODEL_WEIGHTS="", LOG_LEVEL="info")
    try:
        assert httpx.get(f"{server.url}/model").json()["weights"].startswith("demo: seeded stand-in weights, not trained")
        with photo_path("chelsea.png").open("rb") as file:
            answer = httpx.post(f"{server.url}/predict", files={"file": file})
        assert answer.status_code == 200 and "mean nothing" in answer.headers["x-demo"]
        assert "mean nothing" in httpx.get(f"{server.url}/health").headers["x-demo"]
        with browser_page() as page:
            page.goto(server.url + "/")
            page.locator("#demo").wait_for(state="visible", timeout=10_000)
            assert "stand-in weights" in page.locator("#demo").inner_text()
    finally:
        server.stop()
    assert "DEMO=true: serving seeded stand-in weights" in log.read_text()


def test_the_demo_banner_stays_hidden_with_real_weights(server):
    with browser_page() as page:
        page.goto(server.url + "/", wait_until="networkidle")
        assert page.locator("#demo").is_hidden()
