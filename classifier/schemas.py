"""The API's response models that more than one surface returns."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Annotated, Literal

import numpy as np
from fastapi import Query
from pydantic import BaseModel, Field
from sqlalchemy import Row

from classifier.inference.outcomes import ItemError, Prediction, outcome
from classifier.inference.runtime import NUM_CLASSES


class TopK(BaseModel):
    predictions: list[Prediction] = Field(description="The k most likely classes, best first")


class BatchItem(BaseModel):
    filename: str | None = Field(description="The uploaded file's name, echoed as data", examples=["cat.jpg"])
    predictions: list[Prediction] | None = Field(None, description="The k most likely classes; absent on error")
    error: ItemError | None = Field(None, description="Why this file was not classified; absent on success")


class BatchResults(BaseModel):
    results: list[BatchItem] = Field(description="One entry per uploaded file, in upload order")


class Error(BaseModel):
    detail: str = Field(examples=["the file is not an image this service can read"])


# A file part of a request with several (/predict/batch, /jobs): bytes, whatever they spell, so no JSON type:
# text that is no image is accepted as a file and answered in its own entry. contentMediaType alone still
# makes Swagger UI offer a file picker (OpenAPI 3.1).
FILE_PART = {"contentMediaType": "application/octet-stream"}

TopKParameter = Annotated[int, Query(ge=1, le=NUM_CLASSES, description="How many labels")]


def utc(seconds: float | None) -> datetime | None:
    """Unix time as the API gives it."""
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


def errors(*codes: int) -> dict[int | str, dict]:
    """The `responses` of a route that can answer these statuses with an Error."""
    return {code: {"model": Error} for code in codes}


class WebhookState(BaseModel):
    url: str = Field(examples=["https://hooks.example.com/classified"])
    delivered: bool = Field(description="The receiver answered 2xx")
    attempts: int = Field(description="Deliveries tried so far (at most 5, over about 10 minutes)")
    last_status: int | None = Field(description="The receiver's status on the last try; null: unreachable or not tried")


class Job(BaseModel):
    id: str = Field(description="128 random bits, hex", examples=["3f2a9c0e5b7d41e8a6c4f0b2d9e7a1c3"])
    status: Literal["queued", "running", "succeeded", "canceled"] = Field(
        description="succeeded: every image has an answer, a prediction or an error of its own")
    k: int = Field(description="Labels per image")
    total: int = Field(description="Images in the job")
    done: int = Field(description="Images answered so far (prediction or error)")
    failed: int = Field(description="Images answered with an error")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    results_url: str = Field(examples=["/jobs/3f2a9c0e5b7d41e8a6c4f0b2d9e7a1c3/results"])
    webhook: WebhookState | None
    results_to: str | None = Field(None, description="The object its results are written to (JSON lines) when it "
                                   "finishes, before its webhook is sent", examples=["s3://photos/results/run1.jsonl"])
    model_version: str | None = Field(description="The model version it was submitted to (GET /model's version): only a "
                                      "replica serving it works on its images, so all its predictions come from it; "
                                      "null for jobs from before versions were recorded", examples=["3f9a2c7e41b0"])

    @classmethod
    def from_row(cls, row: Row) -> Job:
        webhook = None
        if row.webhook_url:
            webhook = WebhookState(url=row.webhook_url, delivered=row.webhook_delivered, attempts=row.webhook_attempts,
                                   last_status=row.webhook_last_status)
        return cls(id=row.id, status=row.status, k=row.k, total=row.total, done=row.done, failed=row.failed,
                   created_at=utc(row.created_at), started_at=utc(row.started_at), finished_at=utc(row.finished_at),
                   results_url=f"/jobs/{row.id}/results", webhook=webhook, model_version=row.model_version,
                   results_to=row.results_to)


def result_line(index: int, filename: str | None, result: np.ndarray | Exception, k: int, labels: Sequence[str]) -> str:
    """One image's entry of a job's results: a /predict/batch entry and its index, as one line of JSON."""
    named = {"filename": filename} if filename is not None else {}
    return json.dumps({"index": index, **named, **outcome(result, k, labels)})
