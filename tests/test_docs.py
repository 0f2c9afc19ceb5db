"""The API docs work offline: Swagger UI at /docs and ReDoc at /redoc, driven in a real browser that can
reach no host but the service."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from support import API_KEY, browser_page, photo_path

pytestmark = pytest.mark.system


@contextmanager
def confined_page(origin: str) -> Iterator[tuple[object, list[str]]]:
    """A browser page whose requests to anywhere but origin fail (as on an offline box); those go to the list."""
    with browser_page(width=1280, height=1000) as page:
        elsewhere: list[str] = []

        def only_the_service(route) -> None:
            if route.request.url.startswith(origin + "/"):
                route.continue_()
            else:
                elsewhere.append(route.request.url)
                route.abort()

        page.route("**/*", only_the_service)
        yield page, elsewhere


def try_it_out(page, path: str, photo: str):
    """Swagger UI: expand POST path, "Try it out", choose the photo, "Execute": the response row."""
    operation = page.locator(".opblock-post", has=page.locator(f'[data-path="{path}"]'))
    operation.locator(".opblock-summary").click()
    operation.locator("button.try-out__btn").click()
    operation.locator("input[type=file]").set_input_files(str(photo_path(photo)))
    operation.locator("button.execute").click()
    response = operation.locator(".live-responses-table .response")
    response.wait_for(timeout=30_000)
    return response


def test_swagger_ui_classifies_a_photo_with_its_authorize_button(guarded):
    server, _ = guarded
    with confined_page(server.url) as (page, elsewhere):
        page.goto(server.url + "/docs")
        page.locator("button.authorize").first.click()
        dialog = page.locator(".modal-ux")
        dialog.locator("input").first.fill(API_KEY)  # HTTPBearer, the first scheme
        dialog.locator("button.modal-btn.auth", has_text="Authorize").first.click()
        dialog.locator("button.btn-done").first.click()

        response = try_it_out(page, "/predict/topk", "chelsea.png")
        assert response.locator(".response-col_status").inner_text().strip() == "200"
        body = response.locator(".response-col_description pre").first.inner_text()
        assert '"predictions"' in body and '"label"' in body
    assert elsewhere == []


def test_swagger_ui_shows_the_401_without_a_key(guarded):
    server, _ = guarded
    with confined_page(server.url) as (page, elsewhere):
        page.goto(server.url + "/docs")
        response = try_it_out(page, "/predict", "coffee.png")
        assert response.locator(".response-col_status").inner_text().strip().startswith("401")
    assert elsewhere == []


def test_redoc_lists_the_endpoints_offline(server):
    with confined_page(server.url) as (page, elsewhere):
        page.goto(server.url + "/redoc")
        page.get_by_text("The k most likely labels", exact=True).first.wait_for(timeout=30_000)
        for summary in ("The most likely label", "The k most likely labels of each of several files"):
            assert page.get_by_text(summary, exact=True).count() >= 1
    assert elsewhere == []


def test_the_page_and_docs_request_nothing_from_other_origins(server):
    with confined_page(server.url) as (page, elsewhere):
        attempted: dict[str, list[str]] = {}
        blocked: list[str] = []
        page.on("request", lambda request: attempted[current].append(request.url))
        page.on("requestfailed", lambda request: blocked.append(request.url)
                if request.failure == "csp" else None)
        for current in ("/", "/docs", "/redoc"):
            attempted[current] = []
            page.goto(server.url + current, wait_until="networkidle")
            if current == "/redoc":  # rendered (and its logo asked for) before the next page is counted
                page.get_by_text("The k most likely labels", exact=True).first.wait_for(timeout=30_000)
        current = "/"
        page.goto(server.url + "/")
        page.set_input_files("#file", str(photo_path("coffee.png")))
        page.wait_for_selector("#predictions li.prediction", timeout=30_000)

    def off_origin(urls: list[str]) -> list[str]:
        return [url for url in urls if url.startswith("http") and not url.startswith(server.url + "/")]

    assert attempted["/docs"] and off_origin(attempted["/"] + attempted["/docs"]) == []
    # ReDoc's bundle asks for its vendor's logo from a CDN; the Content-Security-Policy stops it in the browser.
    assert off_origin(attempted["/redoc"]) == blocked
    assert elsewhere == []  # nothing got past the browser


def test_docs_assets_are_served_by_the_service(server):
    html = httpx.get(f"{server.url}/docs").text
    assert "cdn." not in html and "/static-offline-docs/swagger-ui-bundle.js" in html
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        response = httpx.get(f"{server.url}/static-offline-docs/{asset}")
        assert response.status_code == 200 and len(response.content) > 10_000
