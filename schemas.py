"""The API's response models that more than one surface returns, and how an image's outcome becomes one."""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime, timezone
from typing import Annotated, Literal

import torch
from fastapi import Query
from pydantic import BaseModel, Field
from sqlalchemy import Row

import model
from labels import LABELS
from observability import REJECTED

log = logging.getLogger("app")


class Prediction(BaseModel):
    label: str = Field(description="ImageNet class name", examples=["tabby"])
    index: int = Field(ge=0, lt=len(LABELS), description="Class index in the model's output", examples=[281])
    score: float = Field(ge=0, le=1, description="Softmax probability", examples=[0.4213])


class TopK(BaseModel):
    predictions: list[Prediction] = Field(description="The k most likely classes, best first")


class ItemError(BaseModel):
    status: int = Field(description="The status this file alone would have got", examples=[400])
    detail: str = Field(examples=["the file is not an image this service can read"])


class BatchItem(BaseModel):
    filename: str | None = Field(description="The uploaded file's name, echoed as data", examples=["cat.jpg"])
    predictions: list[Prediction] | None = Field(None, description="The k most likely classes; absent on error")
    error: ItemError | None = Field(None, description="Why this file was not classified; absent on success")


class BatchResults(BaseModel):
    results: list[BatchItem] = Field(description="One entry per uploaded file, in upload order")


class Error(BaseModel):
    detail: str = Field(examples=["the file is not an image this service can read"])


IMAGE_ERROR_STATUS: dict[type[model.ImageError], int] = {
    model.NotAnImage: 400,
    model.ImageTooLarge: 413,
    model.UnsupportedImage: 415,
}


TopKParameter = Annotated[int, Query(ge=1, le=len(LABELS), description="How many labels")]


def errors(*codes: int) -> dict[int | str, dict]:
    """The `responses` of a route that can answer these statuses with an Error."""
    return {code: {"model": Error} for code in codes}


def image_error_status(error: model.ImageError) -> int:
    status = IMAGE_ERROR_STATUS[type(error)]
    REJECTED.labels("too_large" if status == 413 else "bad_image").inc()
    return status


def top_k(probabilities: torch.Tensor, k: int) -> list[Prediction]:
    return [Prediction(**dataclasses.asdict(p)) for p in model.top_k(probabilities, k)]


def item_error(error: Exception) -> ItemError:
    if isinstance(error, model.ImageError):
        return ItemError(status=image_error_status(error), detail=str(error))
    if isinstance(getattr(error, "status", None), int):  # a failure that names its own status (jobworker.GaveUp)
        return ItemError(status=error.status, detail=str(error))
    log.error("unexpected error on one file of a batch", exc_info=error)
    return ItemError(status=500, detail="internal error; it has been logged")




class WebhookState(BaseModel):
    url: str = Field(examples=["https://hooks.example.com/classified"])
    delivered: bool = Field(description="The receiver answered 2xx")
    attempts: int = Field(description="Deliveries tried so far (at most 5, over about 10 minutes)")
    last_status: int | None = Field(description="The receiver's status on the last try; null: unreachable or not tried")


class Job(BaseModel):
    id: str = Field(description="128 random bits, hex", examples=["3f2a9c0e5b7d41e8a6c4f0b2d9e7a1c3"])
    status: Literal["queued", "running", "succeeded", "failed", "canceled"] = Field(
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

    @classmethod
    def from_row(cls, row: Row) -> Job:
        def utc(seconds: float | None) -> datetime | None:
            return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)

        webhook = None
        if row.webhook_url:
            webhook = WebhookState(url=row.webhook_url, delivered=row.webhook_delivered, attempts=row.webhook_attempts,
                                   last_status=row.webhook_last_status)
        return cls(id=row.id, status=row.status, k=row.k, total=row.total, done=row.done, failed=row.failed,
                   created_at=utc(row.created_at), started_at=utc(row.started_at), finished_at=utc(row.finished_at),
                   results_url=f"/jobs/{row.id}/results", webhook=webhook)


def result_line(index: int, filename: str | None, outcome: torch.Tensor | Exception, k: int) -> str:
    """One image's entry of a job's results: a /predict/batch entry and its index, as one line of JSON."""
    if isinstance(outcome, Exception):
        item = BatchItem(filename=filename, error=item_error(outcome))
    else:
        item = BatchItem(filename=filename, predictions=top_k(outcome, k))
    return json.dumps({"index": index, **item.model_dump(exclude_none=True)})
