"""Fuzzing with schemathesis against the app's own OpenAPI document: no 5xx, every response as declared.

Runs with an API key set, so schemathesis also checks that the predict endpoints refuse requests
without it (its `ignored_auth` check) while health, readiness and metrics stay open.
(Schemathesis's strategies are driven with Hypothesis directly: its pytest plugin predates pytest 9.)
"""

from __future__ import annotations

import dataclasses

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

KEY = "fuzz-key-0123456789"


@pytest.fixture
def api_schema(app, client, monkeypatch):
    monkeypatch.setattr(app, "settings", dataclasses.replace(app.settings, api_key=KEY))
    return schemathesis.openapi.from_asgi("/openapi.json", app.app)


def operations() -> list[tuple[str, str]]:
    return [("POST", "/predict"), ("POST", "/predict/topk"), ("POST", "/predict/batch"),
            ("GET", "/health"), ("GET", "/ready"), ("GET", "/model"), ("GET", "/metrics")]


def test_every_operation_is_fuzzed(api_schema):
    documented = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert documented == set(operations())


@pytest.mark.parametrize(("method", "path"), operations())
def test_operation_conforms_to_its_openapi_document(api_schema, method, path):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        # positive_data_acceptance expects any schema-valid body to succeed; an OpenAPI schema cannot say
        # "bytes that decode as an image", so random bytes rightly get 400. Every other check runs.
        case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, excluded_checks=[positive_data_acceptance])

    check()
