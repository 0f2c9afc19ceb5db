"""The /jobs routes: submit many images at once, follow the job, read its results, cancel or delete it.

The job store (jobs/store.py) holds the images until the worker (jobs/worker.py) has classified them.
The app includes this router behind the API key.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import iterate_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from classifier import rules, storage, tracing
from classifier.errors import BadRequest, Conflict, NotFound, Unavailable, Unprocessable
from classifier.http.base import MODEL_VERSION_HEADER, Served
from classifier.inference.images import SUFFIXES, ImageTooLarge
from classifier.jobs import webhooks
from classifier.jobs.store import TERMINAL, NewImage, PendingFull
from classifier.observability import JOBS_FINISHED, JOBS_SUBMITTED
from classifier.schemas import BatchItem, Job, TopKParameter, errors, result_line
from classifier.settings import Settings

# Every route reads the job database: while it is unreachable, each answers 503 (database_error).
router = APIRouter(prefix="/jobs", tags=["asynchronous jobs"], responses=errors(503))

MAX_WAIT_S = 60  # Prefer: wait=N is honoured up to this


class JobList(BaseModel):
    jobs: list[Job] = Field(description="Newest first")
    next: str | None = Field(description="The next page, or null on the last", examples=["/jobs?limit=20&before=3f2a..."])


class JobResult(BatchItem):
    index: int = Field(ge=0, description="The image's place in the upload, from 0")
    model_version: str | None = Field(None, description="On a prediction: the model version that made it (the job's)")


class JobResults(BaseModel):
    id: str
    status: str
    results: list[JobResult] = Field(description="One entry per image answered so far, in upload order")


JOB_HEADERS = {"Location": {"description": "/jobs/{id}", "schema": {"type": "string"}}}


def not_found(job_id: str) -> NotFound:
    return NotFound(f"no job {job_id[:64]!r}: unknown, expired or deleted")


def wait_preference(prefer: str | None) -> float | None:
    """Seconds asked for by `Prefer: wait=N` (RFC 7240), at most MAX_WAIT_S; None when not asked."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.split(";")[0].partition("=")
        if name.strip().lower() == "wait":
            try:
                return min(max(float(value.strip().strip('"')), 0.0), MAX_WAIT_S)
            except ValueError:
                return None
    return None


def job_response(row, status: int, waited: float | None = None) -> JSONResponse:  # noqa: ANN001 (a store row)
    headers = {"Location": f"/jobs/{row.id}"}
    if waited is not None:
        headers["Preference-Applied"] = f"wait={waited:g}"
    return JSONResponse(Job.from_row(row).model_dump(mode="json"), status, headers=headers)


def multipart_only(request: Request) -> None:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Unprocessable("send the images as multipart/form-data, field 'files' repeated")


@dataclass
class Submission:
    files: list[UploadFile]
    webhook: str | None
    objects: list[str]  # field `objects`, repeated: s3://bucket/key, or s3://bucket/prefix/ for every image below
    results_to: str | None  # s3://bucket/key the results are written to when the job finishes


async def read_submission(request: Request, settings: Settings) -> Submission:
    """The multipart body: its files (field `files`), objects, results_to and webhook. Parsed here, not by FastAPI,
    so that the files are counted against MAX_JOB_FILES and their bytes never spill to a temporary file on disk."""
    multipart_only(request)
    parser = MultiPartParser(request.headers, request.stream(), max_files=settings.max_job_files,
                             max_fields=settings.max_job_files + 8)
    parser.spool_max_size = settings.max_job_bytes  # the body limit: every part stays in memory
    try:
        form = await parser.parse()
    except MultiPartException as error:
        if error.message.startswith("Too many files"):
            rules.within(None, settings.max_job_files, "MAX_JOB_FILES")
        raise BadRequest(f"the multipart body could not be read: {error.message}") from None
    except ClientDisconnect:
        raise BadRequest("the upload was cut off") from None
    if unknown := sorted(set(form.keys()) - {"files", "webhook", "objects", "results_to"}):
        raise Unprocessable(f"unknown field {unknown[0][:64]!r}: send the images as field 'files' (or 'objects'), "
                            "and a 'webhook' or 'results_to'")

    def text(name: str) -> str | None:
        value = form.get(name)
        return value.strip() if isinstance(value, str) and value.strip() else None

    return Submission([value for value in form.getlist("files") if isinstance(value, UploadFile)], text("webhook"),
                      [value for value in form.getlist("objects") if isinstance(value, str) and value.strip()],
                      text("results_to"))


def named_objects(names: list[str], limit: int) -> list[storage.ObjectURL]:
    """The objects a submission names (rules.allowed_object has checked their buckets): a key as it is (read when
    claimed: a missing one is that image's 404), a prefix ending in / as the images below it, listed now, up to
    limit + 1 (one more than MAX_JOB_FILES allows is enough to refuse the job)."""
    found: list[storage.ObjectURL] = []
    for name in names:
        url = storage.ObjectURL.parse(name)
        if url.key and not url.key.endswith("/"):
            found.append(url)
            continue
        below = (item for item in storage.objects_below(url) if os.path.splitext(item.key)[1].lower() in SUFFIXES)
        found += itertools.islice(below, limit + 1 - len(found))
        if len(found) > limit:
            break
    return found


# openapi.py writes this route's request body (job_submission): what it is depends on the settings.
@router.post("", status_code=202, response_model=Job,
             responses={202: {"headers": JOB_HEADERS},
                        200: {"model": Job, "description": "The job already existed (Idempotency-Key), or ended within Prefer: wait"},
                        **errors(400, 413, 422, 503, 507)},
             summary="Submit many images; classified in the background")
async def submit(
    service: Served,
    request: Request,
    k: TopKParameter = 5,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255,
                                                  description="The same key returns the same job")] = None,
    prefer: Annotated[str | None, Header(description="wait=N: answer when the job ends, or after N ≤ 60 s")] = None,
) -> JSONResponse:
    """Answers 202 with the job at once. Each image gets a result like a `/predict/batch` entry: its top k,
    or an error of its own (a bad image does not fail the job)."""
    settings, jobs = service.settings, service.jobs.store
    multipart_only(request)
    existing = await asyncio.to_thread(jobs.by_idempotency_key, idempotency_key) if idempotency_key else None
    declared = request.headers.get("content-length", "")
    if existing is None and declared.isdigit():  # refuse before reading a body that would not fit
        backlog = await asyncio.to_thread(jobs.backlog)
        if backlog.bytes + int(declared) > settings.jobs_max_pending_bytes:
            raise jobs_full(backlog.bytes, settings)
    # A repeated key's body is read and checked too: a request that is no valid submission gets no job.
    submission = await read_submission(request, settings)
    files, webhook = submission.files, submission.webhook
    # Every bucket is checked before anything is listed, read or written: 403 for one no operator allowed.
    for name in [*submission.objects, *filter(None, [submission.results_to])]:
        rules.allowed_object(name, settings.jobs_allowed_buckets)
    if not files and not submission.objects:
        raise Unprocessable("no images: send them as multipart/form-data field 'files' (or 'objects'), repeated")
    if webhook and (reason := webhooks.refusal(webhook, settings.webhook_allowed_hosts)):
        raise Unprocessable(reason)
    if existing is not None:
        return job_response(existing, 200)
    objects = await asyncio.to_thread(named_objects, submission.objects, settings.max_job_files - len(files))
    rules.within(len(files) + len(objects), settings.max_job_files, "MAX_JOB_FILES")
    images = []
    for index, upload in enumerate(files):
        data = await upload.read()
        await upload.close()
        if len(data) > settings.max_upload_bytes:  # answered now, like /predict would, and never stored
            too_large = ImageTooLarge(f"the file is larger than {settings.max_upload_bytes:,} bytes (MAX_UPLOAD_BYTES)")
            images.append(NewImage(upload.filename, None,
                                   result_line(index, upload.filename, too_large, k, service.runtime.labels)))
        else:
            images.append(NewImage(upload.filename, data))
    images += [NewImage(str(url), b"", source=str(url)) for url in objects]
    if not images:
        raise Unprocessable(f"no images below {', '.join(submission.objects)[:200]}")
    del files
    try:
        row, created = await asyncio.to_thread(jobs.create, k, images, webhook_url=webhook, idempotency_key=idempotency_key,
                                               max_pending_bytes=settings.jobs_max_pending_bytes,
                                               traceparent=tracing.traceparent(),
                                               model_version=service.runtime.version,
                                               results_to=submission.results_to)
    except PendingFull as full:
        raise jobs_full(full.args[0], settings) from None
    if not created:
        return job_response(row, 200)
    JOBS_SUBMITTED.inc()
    if row.status in TERMINAL:
        JOBS_FINISHED.labels(row.status).inc()
    service.jobs.submitted()
    waited = wait_preference(prefer)
    if waited and row.status not in TERMINAL:
        row = await service.jobs.wait_until_ended(row.id, waited) or row
    return job_response(row, 200 if waited is not None and row.status in TERMINAL else 202, waited)


def jobs_full(pending: int, settings: Settings) -> Unavailable:
    return Unavailable(f"the job store holds {pending:,} bytes of images waiting to be classified, too near its "
                       f"limit of {settings.jobs_max_pending_bytes:,} (JOBS_MAX_PENDING_BYTES); retry later", "jobs_full")


@router.get("", response_model=JobList, responses=errors(404), summary="Jobs, newest first")
async def list_jobs(
    service: Served,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    before: Annotated[str | None, Query(description="A job id: the page after it")] = None,
) -> JobList:
    rows = await asyncio.to_thread(service.jobs.store.newest, limit, before)
    if rows is None:
        raise not_found(before or "")
    page = [Job.from_row(row) for row in rows]
    return JobList(jobs=page, next=f"/jobs?limit={limit}&before={page[-1].id}" if len(page) == limit else None)


@router.get("/{job_id}", response_model=Job, responses={200: {"headers": JOB_HEADERS}, **errors(404)},
            summary="A job's status and progress")
async def get_job(
    service: Served,
    job_id: str,
    prefer: Annotated[str | None, Header(description="wait=N: answer when the job ends, or after N ≤ 60 s")] = None,
) -> JSONResponse:
    """With `Prefer: wait=N`, a long poll: the answer comes when the job ends, or after N seconds as it is then."""
    row = await asyncio.to_thread(service.jobs.store.get, job_id)
    if row is None:
        raise not_found(job_id)
    waited = wait_preference(prefer)
    if waited and row.status not in TERMINAL:
        row = await service.jobs.wait_until_ended(row.id, waited)
        if row is None:
            raise not_found(job_id)
    return job_response(row, 200, waited)


@router.get(
    "/{job_id}/results",
    response_model=JobResults,
    responses={200: {"content": {"application/x-ndjson": {}}}, **errors(404)},
    summary="The results so far, in upload order",
)
async def get_results(
    service: Served,
    request: Request,
    job_id: str,
    format: Annotated[Literal["json", "jsonl"] | None, Query(description="jsonl: one entry per line, streamed")] = None,
) -> StreamingResponse:
    """Streamed from the store a page at a time, so a large job's results never sit in memory whole.
    `?format=jsonl` or `Accept: application/x-ndjson` gives one JSON entry per line."""
    jobs = service.jobs.store
    row = await asyncio.to_thread(jobs.get, job_id)
    if row is None:
        raise not_found(job_id)
    lines = iterate_in_threadpool(jobs.results(row.id))
    version = {MODEL_VERSION_HEADER: row.model_version} if row.model_version else {}  # all its predictions' version
    if format == "jsonl" or (format is None and "application/x-ndjson" in request.headers.get("accept", "")):
        return StreamingResponse(jsonl(lines), media_type="application/x-ndjson", headers=version)
    head = json.dumps({"id": row.id, "status": row.status})[:-1] + ', "results": ['
    return StreamingResponse(json_document(head, lines), media_type="application/json", headers=version)


async def jsonl(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    async for line in lines:
        yield line + "\n"


async def json_document(head: str, lines: AsyncIterator[str]) -> AsyncIterator[str]:
    yield head
    separator = ""
    async for line in lines:
        yield separator + line
        separator = ", "
    yield "]}"


@router.post("/{job_id}/cancel", response_model=Job, responses=errors(404),
             summary="Drop the images not yet classified")
async def cancel_job(service: Served, job_id: str) -> Job:
    """A finished job is returned unchanged."""
    row, canceled = await asyncio.to_thread(service.jobs.store.cancel, job_id)
    if row is None:
        raise not_found(job_id)
    if canceled:
        JOBS_FINISHED.labels("canceled").inc()
        service.jobs.ended()
    return Job.from_row(row)


@router.post("/{job_id}/adopt", response_model=Job, responses=errors(404, 409),
             summary="Move a job waiting for another model version to this replica's")
async def adopt_job(service: Served, job_id: str) -> Job:
    """A job is worked on only by replicas serving the model version it was submitted to. When no replica serves
    that version any more (the weights were rolled out), its images wait (job_images_waiting_for_other_version):
    this moves it to the version of the replica that answers, if none of its images was classified yet (409
    otherwise: its results would come from two models; cancel it and submit it again). A job already on this
    version is returned unchanged."""
    row, refusal = await asyncio.to_thread(service.jobs.store.adopt, job_id, service.runtime.version)
    if row is None:
        raise not_found(job_id)
    if refusal:
        raise Conflict(refusal)
    service.jobs.submitted()  # this replica may take its images now
    return Job.from_row(row)


@router.delete("/{job_id}", status_code=204, response_class=Response, responses=errors(404),
               summary="Cancel if needed, then delete the job, its images and results")
async def delete_job(service: Served, job_id: str) -> Response:
    await cancel_job(service, job_id)  # 404 for an unknown job
    await asyncio.to_thread(service.jobs.store.delete, job_id)
    return Response(status_code=204)

