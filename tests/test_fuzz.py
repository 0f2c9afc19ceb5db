"""Schemathesis against the running service's own OpenAPI document, the way a user would run it, with and
without an API key: every check (schemathesis runs them all by default), no failure.

The statuses an OpenAPI schema cannot rule out for schema-valid data (a file that is no image, a job id that
does not exist) are in schemathesis.toml, with their reasons; no operation or check is exempted. Each run's
seed is fixed, so a failure is reproducible, and there are several: one seed explores only a corner.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import schemathesis

from support import API_KEY, REPO, Server

pytestmark = pytest.mark.system

OPERATIONS = {("POST", "/predict"), ("POST", "/predict/topk"), ("POST", "/predict/batch"),
              ("GET", "/health"), ("GET", "/ready"), ("GET", "/model"), ("GET", "/metrics"),
              ("POST", "/jobs"), ("GET", "/jobs"), ("GET", "/jobs/{job_id}"), ("GET", "/jobs/{job_id}/results"),
              ("POST", "/jobs/{job_id}/cancel"), ("POST", "/jobs/{job_id}/adopt"), ("DELETE", "/jobs/{job_id}"),
              ("GET", "/v2"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2/models/{name}"),
              ("GET", "/v2/models/{name}/ready"), ("POST", "/v2/models/{name}/infer")}


SEEDS = (1, 2, 20261202)


def schemathesis_run(server: Server, tmp_path: Path, seed: int, *options: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(REPO / "schemathesis.toml"),
               "run", f"{server.url}/openapi.json", "--checks", "all", "--seed", str(seed), "--max-examples", "40",
               *options]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1200)  # its .hypothesis there


def test_every_operation_is_in_the_document(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    assert {(r.ok().method.upper(), r.ok().path) for r in schema.get_all_operations()} == OPERATIONS


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("keyed", [False, True], ids=["no API_KEY", "with API_KEY"])
def test_schemathesis_finds_nothing(request, tmp_path, keyed, seed):
    server = request.getfixturevalue("guarded")[0] if keyed else request.getfixturevalue("server")
    result = schemathesis_run(server, tmp_path, seed, *(["-H", f"Authorization: Bearer {API_KEY}"] if keyed else []))
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout.split("SUMMARY")[-1]
