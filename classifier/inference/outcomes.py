"""One image's outcome, the same at every door (/predict*, /jobs, /v2, python -m classify): its k most
likely classes, or why it has none, as {"status", "detail"}.

    probabilities [1000] --top_k--> predictions          exception --failure--> {status, detail}

A refused image (errors.ServiceError) is counted in rejected_requests_total under its reason; an unexpected
exception is logged with its traceback and shown to the client only as a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from classifier.errors import ServiceError
from classifier.inference.runtime import NUM_CLASSES
from classifier.observability import refused

log = logging.getLogger("app")


class Prediction(BaseModel):
    label: str = Field(description="ImageNet class name", examples=["tabby"])
    index: int = Field(ge=0, lt=NUM_CLASSES, description="Class index in the model's output", examples=[281])
    score: float = Field(ge=0, le=1, description="Softmax probability", examples=[0.4213])


class ItemError(BaseModel):
    status: int = Field(description="The status this image alone would have got", examples=[400])
    detail: str = Field(examples=["the file is not an image this service can read"])


def top_k(probabilities: np.ndarray, k: int, labels: Sequence[str]) -> list[Prediction]:
    """One image's probabilities [1000] -> its k most likely classes, named by labels, best first (of equal
    scores, the lower index first)."""
    indices = np.argsort(-probabilities, kind="stable")[:k]
    return [Prediction(label=labels[i], index=i, score=s) for s, i in zip(probabilities[indices].tolist(), indices.tolist())]


def failure(error: Exception) -> ItemError:
    """Why an image got no answer: the status and a message safe to show."""
    if isinstance(error, ServiceError):
        refused(error)
        return ItemError(status=error.status, detail=error.detail)
    log.error("unexpected error on one image", exc_info=error)
    return ItemError(status=500, detail="internal error; it has been logged")


def outcome(result: np.ndarray | Exception, k: int, labels: Sequence[str]) -> dict[str, Any]:
    """{"predictions": [...], "model_version"} or {"error": {"status", "detail"}}: an entry of /predict/batch, of a
    job's results and of python -m classify's output. The model version is that of the scores (Scores), when they
    say it; an error has none: no model made it."""
    if isinstance(result, Exception):
        return {"error": failure(result).model_dump()}
    made_by = {"model_version": result.model_version} if getattr(result, "model_version", None) else {}
    return {"predictions": [prediction.model_dump() for prediction in top_k(result, k, labels)], **made_by}
