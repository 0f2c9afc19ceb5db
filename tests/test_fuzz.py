"""Fuzzing with schemathesis against the service's own OpenAPI document: no 5xx, every response as declared.

It runs against a real server with an API key, so schemathesis also checks that the predict endpoints
refuse requests without it (its `ignored_auth` check) while health, readiness and metrics stay open.
(Its strategies are driven with Hypothesis directly: schemathesis's pytest plugin predates pytest 9.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from conftest import API_KEY

OPERATIONS = [("POST", "/predict"), ("POST", "/predict/topk"), ("POST", "/predict/batch"),
              ("GET", "/health"), ("GET", "/ready"), ("GET", "/model"), ("GET", "/metrics"),
              ("POST", "/jobs"), ("GET", "/jobs"), ("GET", "/jobs/{job_id}"), ("GET", "/jobs/{job_id}/results"),
              ("POST", "/jobs/{job_id}/cancel"), ("DELETE", "/jobs/{job_id}"),
              ("GET", "/v2"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2/models/{name}"),
              ("GET", "/v2/models/{name}/ready"), ("POST", "/v2/models/{name}/infer")]


@pytest.fixture(scope="module")
def api_schema(guarded):
    server, _ = guarded
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_every_operation_is_fuzzed(api_schema):
    documented = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert documented == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_operation_conforms_to_its_openapi_document(guarded, api_schema, method, path):
    server, _ = guarded
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        # positive_data_acceptance expects any schema-valid body to succeed; an OpenAPI schema cannot say
        # "bytes that decode as an image", so random bytes rightly get 400. Every other check runs.
        case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                               excluded_checks=[positive_data_acceptance])

    check()
