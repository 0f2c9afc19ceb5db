"""Online predictions: /predict, /predict/topk and /predict/batch, classified while the client waits (and
refused at once when the queue is full: gate.Gate). The app includes them behind the API key."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Request, Response, UploadFile

from classifier.http.base import Served, answered_by, deadline, until_disconnected
from classifier.inference.images import READABLE
from classifier.inference.outcomes import Prediction, outcome, top_k
from classifier.schemas import BatchItem, BatchResults, TopK, TopKParameter, errors

router = APIRouter()

PREDICT_ERRORS = errors(400, 413, 415, 422, 503)
UploadedImage = Annotated[UploadFile, File(description=f"The photo: {READABLE}",
                                           json_schema_extra={"minLength": 1})]


async def classify_one(service: Served, request: Request, response: Response, upload: UploadFile) -> np.ndarray:
    [probabilities] = await service.classify([upload], lambda: until_disconnected(request), deadline(request))
    if isinstance(probabilities, Exception):
        raise probabilities
    response.headers.update(answered_by([probabilities]))
    return probabilities


@router.post("/predict", response_model=Prediction, responses=PREDICT_ERRORS, summary="The most likely label")
async def predict(service: Served, request: Request, response: Response, file: UploadedImage) -> Prediction:
    return top_k(await classify_one(service, request, response, file), 1, service.runtime.labels)[0]


@router.post("/predict/topk", response_model=TopK, responses=PREDICT_ERRORS, summary="The k most likely labels")
async def predict_topk(service: Served, request: Request, response: Response, file: UploadedImage,
                       k: TopKParameter = 5) -> TopK:
    return TopK(predictions=top_k(await classify_one(service, request, response, file), k, service.runtime.labels))


@router.post(
    "/predict/batch",
    response_model=BatchResults,
    response_model_exclude_none=True,
    responses=errors(400, 413, 422, 503),
    summary="The k most likely labels of each of several files",
)
async def predict_batch(
    service: Served,
    request: Request,
    response: Response,
    # openapi.py writes MAX_BATCH_FILES into this field's schema (maxItems) and description.
    files: Annotated[list[UploadFile], File(min_length=1, description="Photos (MAX_BATCH_FILES), field repeated; more: 413")],
    k: TopKParameter = 5,
) -> BatchResults:
    """A bad file gets an `error` entry of its own; the others are still classified."""
    results = await service.classify(files, lambda: until_disconnected(request), deadline(request))
    response.headers.update(answered_by(results))
    return BatchResults(results=[BatchItem(filename=upload.filename, **outcome(result, k, service.runtime.labels))
                                 for upload, result in zip(files, results)])
