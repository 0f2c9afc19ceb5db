"""The documentation tells the truth: the site builds strictly, the generated pages are what their sources
make, and every setting and route the README and the docs name exists."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO
from tools import generate_docs as generate

pytestmark = pytest.mark.unit

DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [REPO / "README.md"]

# Upper-case names in the docs that are not this service's settings, and what they are.
NOT_SETTINGS = {
    "TORCH_HOME": "torch's own cache folder variable",
    "JOB_COMPLETION_INDEX": "set by Kubernetes in an Indexed Job's pods",
    "SCHED_IDLE": "a Linux scheduling class",
    "SQLITE_FULL": "SQLite's error code for a full disk",
    "AVX512_BF16": "a CPU instruction set",
    "TORCH_INDEX_URL": "a build argument of the Dockerfile",
    "WEIGHTS": "a build argument of the Dockerfile",
    "INVALID_ARGUMENT": "a gRPC status code", "NOT_FOUND": "a gRPC status code",
    "RESOURCE_EXHAUSTED": "a gRPC status code", "UNAVAILABLE": "a gRPC status code",
    "UNAUTHENTICATED": "a gRPC status code", "DEADLINE_EXCEEDED": "a gRPC status code",
    **dict.fromkeys(["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_REGION"],
                    "read by boto3 itself (the standard AWS variables)"),
    "RAY_ADDRESS": "read by Ray itself",
    **dict.fromkeys(["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG",
                     "OTEL_RESOURCE_ATTRIBUTES", "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_SCHEDULE_DELAY",
                     "OTEL_PYTHON_FASTAPI_EXCLUDED_URLS"],
                    "read by the OpenTelemetry SDK itself"),
    "COLLECTOR_OTLP_ENABLED": "Jaeger's", "POD_NAME": "a variable of the example",
}


@pytest.mark.system
def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir",
                             str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "performance" / "index.html").exists()
    assert (tmp_path / "site" / "img" / "performance-throughput.png").exists()


@pytest.mark.app
def test_the_settings_page_is_generated_from_the_declarations():
    assert (DOCS / "settings.md").read_text() == generate.settings_page(), "run: .venv/bin/python -m tools.generate_docs"


@pytest.mark.app
def test_the_settings_page_names_every_setting_once():
    from classifier.settings import Settings

    page = (DOCS / "settings.md").read_text()
    for name in Settings.model_fields:
        assert page.count(f"| `{name.upper()}` |") == 1


def test_the_performance_page_and_its_plots_are_rendered_from_the_newest_results_file():
    source, results, page = generate.performance_from_files()
    assert (DOCS / "performance.md").read_text() == page, "run: .venv/bin/python -m tools.generate_docs"
    for name, data in generate.plots(results).items():
        assert (DOCS / "img" / name).read_bytes() == data, f"{name} is not what {source.name} draws"
    assert results["machine"]["cpu"] in (DOCS / "performance.md").read_text()  # every figure names its machine


def test_the_readme_set_up_figures_are_rendered_from_the_newest_results_file():
    source, results, _ = generate.performance_from_files()
    text = (REPO / "README.md").read_text()
    assert generate.readme(text, results, source.name) == text, "run: .venv/bin/python -m tools.generate_docs"
    assert f"{results['setup']['runtime_install_s']:g} s" in text


def test_a_figure_changed_by_hand_is_caught():
    source = generate.newest_results()
    results = json.loads(source.read_text())
    results["rows"][0]["ok_per_s"] = results["rows"][0]["ok_per_s"] + 1
    assert generate.performance_page(results, source.name, None) != (DOCS / "performance.md").read_text()


@pytest.mark.app
@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_every_setting_the_docs_name_exists(page):
    from classifier.settings import Settings

    settings = {name.upper() for name in Settings.model_fields}
    named = set(re.findall(r"`([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)(?:=[^`]*)?`", page.read_text()))
    unknown = named - settings - set(NOT_SETTINGS)
    assert not unknown, f"{page.name} names settings that do not exist: {sorted(unknown)}"


@pytest.mark.app
def test_every_route_in_the_api_table_exists(client):
    from support import every_route

    routes = set(every_route(client.app))
    table = (DOCS / "api.md").read_text().split("## Routes", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(GET|POST|DELETE) (/[^`?\s]*)", table)
    assert len(named) >= 15
    for method, path in named:
        template = re.sub(r"\{id\}", "{job_id}", path).replace("/resnet18", "/{name}")
        assert (method, template) in routes, (method, path)
    for path in re.findall(r"`(/v2[^`\s.]*)`", table):  # the listed /v2 paths, not "/v2/..."
        assert any(re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path.replace("/resnet18", "/resnet18"))
                   for _, template in routes), path


def test_the_offline_page_figures_and_cost_table_are_rendered_from_its_results_file():
    text = (DOCS / "offline.md").read_text()
    offline = generate.optional_results("offline.json")
    assert generate.offline_page(text, offline) == text, "run: .venv/bin/python -m tools.generate_docs"
    assert offline is None or offline["cpu"] in text  # the figures name their machine
