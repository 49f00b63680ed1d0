"""The console's routes under `/console`: pages, fragments and actions (none in the OpenAPI document).

- pages (`/console/`, `/console/jobs/{id}`, `/console/dlq`, `/console/schedules`,
  `/console/workers`) are shells without data: they need no key;
- fragments (`/console/f/...`) are the HTML that htmx swaps in and refreshes by polling, rendered
  from the public API's answers with the browser's `Authorization` header (api.py);
- actions (`/console/a/...`, POST) call the public API's commands (start, cancel, replay,
  discard, pause, resume) and answer a flash message.

An answer of the API that is an error (401 no key, 403 scope, 404, 422, 503) is rendered as a
problem fragment with the API's own status, so the page shows what the API said.
"""

import asyncio
import json
import logging
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from cairn_gateway.console import charts
from cairn_gateway.console.api import ApiAnswer, GatewayApi

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/console", include_in_schema=False)
templates = Jinja2Templates(directory=FilePath(__file__).parent / "templates")
templates.env.filters["percent"] = lambda value: f"{float(value or 0):.1f}"

# Ids as the API spells them: the console builds paths from them.
ID = Annotated[str, Path(pattern=r"^[A-Za-z0-9._:@+-]{1,300}$")]
FILTER = Annotated[str | None, Query(max_length=200)]
JOBS_PAGE = 25  # jobs per list; each unfinished one costs one more API call per refresh
SHARDS_SHOWN = 500
THROUGHPUT_WINDOW_S = 30 * 60
EXAMPLE_SPEC = {
    "pipeline": "synthetic",
    "name": "console demo",
    "params": {"count": 2000, "delay_ms_per_record": 1},
    "sharding": {"strategy": "range", "shards": 4},
    "batch_size": 100,
    "target_collection": "console_demo",
}


# Every console answer holds a tenant's data or serves the page that sends the key: never cached.
# The pages also refuse framing (buttons replay and discard) and run the console's own scripts
# only (no inline script; the bars' widths are inline styles).
NO_STORE = {"Cache-Control": "no-store"}
PAGE_HEADERS = {
    **NO_STORE,
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def gateway_api(request: Request) -> GatewayApi:
    return GatewayApi(request.app.state.console_client, request.headers.get("authorization"))


Api = Annotated[GatewayApi, Depends(gateway_api)]


def render(request: Request, name: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status, headers={**NO_STORE, **(headers or {})})


def shell(request: Request, name: str, **context: Any) -> HTMLResponse:
    """A page: a shell without data (the fragments fill it)."""
    return render(request, name, headers=PAGE_HEADERS, **context)


def problem(request: Request, answer: ApiAnswer, what: str) -> HTMLResponse:
    """The API's error as a fragment, with the API's status (a 5xx is logged: the API's own log
    has the cause; the key is never logged)."""
    if answer.status >= 500:
        logger.warning("console: the API answered %s for %s: %s", answer.status, what, answer.detail)
    return render(request, "_problem.html", status=answer.status, answer=answer, what=what)


# --- pages ---------------------------------------------------------------------------------------
@router.get("")
async def console_root() -> RedirectResponse:
    return RedirectResponse("/console/")


@router.get("/", response_class=HTMLResponse)
async def jobs_page(request: Request) -> HTMLResponse:
    return shell(request, "jobs.html", page="jobs", example=json.dumps(EXAMPLE_SPEC, indent=2))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: ID) -> HTMLResponse:
    return shell(request, "job.html", page="jobs", job_id=job_id)


@router.get("/dlq", response_class=HTMLResponse)
async def dlq_page(request: Request, job_id: FILTER = None) -> HTMLResponse:
    return shell(request, "dlq.html", page="dlq", job_id=job_id or "")


@router.get("/schedules", response_class=HTMLResponse)
async def schedules_page(request: Request) -> HTMLResponse:
    return shell(request, "schedules.html", page="schedules")


@router.get("/workers", response_class=HTMLResponse)
async def workers_page(request: Request) -> HTMLResponse:
    return shell(request, "workers.html", page="workers")


# --- fragments -----------------------------------------------------------------------------------
@router.get("/f/jobs", response_class=HTMLResponse)
async def jobs_fragment(request: Request, api: Api, state: FILTER = None, pipeline: FILTER = None, q: FILTER = None) -> HTMLResponse:
    """The tenant's newest jobs (filtered), each unfinished one with its live progress, the counts
    by state, and records/s over the last 30 minutes."""
    listed, counted = await asyncio.gather(
        api.get("/v1/jobs", {"state": state, "pipeline": pipeline, "q": q, "limit": JOBS_PAGE}), api.get("/v1/jobs/counts")
    )
    if not listed.ok:
        return problem(request, listed, "jobs")
    jobs: list[dict[str, Any]] = listed.body["items"]
    unfinished = [job for job in jobs if job["state"] not in charts.TERMINAL_JOB_STATES]
    details = await asyncio.gather(*(api.get(f"/v1/jobs/{job['id']}", {"shard_limit": 0}) for job in unfinished))
    # id -> (percent, records done); unknown for FAILURE/CANCELLED (their detail is not fetched).
    progress: dict[str, tuple[float, int | None]] = {}
    for job in jobs:
        if job["state"] == "SUCCESS":
            progress[job["id"]] = (100.0, job.get("records_total"))
    for job, detail in zip(unfinished, details, strict=True):
        if detail.ok:
            progress[job["id"]] = (float(detail.body.get("progress") or 0), int(detail.body.get("records_done") or 0))
    now = charts.now_s()
    spans = [span for job in jobs if (span := charts.job_span(job, progress.get(job["id"], (0, None))[1], now))]
    series = charts.throughput(spans, now - THROUGHPUT_WINDOW_S, now, buckets=60)
    return render(
        request,
        "_jobs.html",
        jobs=jobs,
        progress=progress,
        counts=counted.body if counted.ok else None,
        chart=charts.plot(series),
        terminal=charts.TERMINAL_JOB_STATES,
    )


@router.get("/f/jobs/{job_id}", response_class=HTMLResponse)
async def job_fragment(request: Request, api: Api, job_id: ID) -> HTMLResponse:
    """One job: overall progress, a bar per shard in its state's colour, its retries, and its
    records/s over its run."""
    answer = await api.get(f"/v1/jobs/{job_id}", {"shard_limit": SHARDS_SHOWN})
    if not answer.ok:
        return problem(request, answer, f"job {job_id}")
    job = answer.body
    now = charts.now_s()
    start = charts.parse_time(job.get("started_at"))
    end = charts.parse_time(job.get("finished_at")) or now
    shards = [{**shard, "percent": charts.shard_percent(shard)} for shard in job.get("shards") or []]
    chart = None
    if start is not None:
        chart = charts.plot(charts.throughput(charts.shard_spans(shards, now), start, max(end, start + 1), buckets=60))
    runtime_s = (end - start) if start is not None else None
    # When each retry is due and of how many attempts: the job's status has it (shards do not).
    retrying: list[dict[str, Any]] = []
    if any(shard["state"] == "RETRY" for shard in shards):
        status = await api.get(f"/task/status/{job_id}")
        retrying = status.body.get("retrying") or [] if status.ok else []
    return render(
        request,
        "_job.html",
        job=job,
        shards=shards,
        retrying=retrying,
        failed=[shard for shard in shards if shard["state"] == "FAILED"],
        chart=chart,
        runtime_s=runtime_s,
        average=(job.get("records_done") or 0) / runtime_s if runtime_s else None,
        terminal=charts.TERMINAL_JOB_STATES,
    )


@router.get("/f/dlq", response_class=HTMLResponse)
async def dlq_fragment(request: Request, api: Api, status: FILTER = None, job_id: FILTER = None) -> HTMLResponse:
    """Dead letters (newest first), with replay and discard buttons on the open ones."""
    answer = await api.get("/dlq/entries", {"status": status, "job_id": job_id, "limit": 50})
    if not answer.ok:
        return problem(request, answer, "dead letters")
    return render(request, "_dlq.html", page=answer.body)


@router.get("/f/retries", response_class=HTMLResponse)
async def retries_fragment(request: Request, api: Api) -> HTMLResponse:
    """Shards waiting for a retry, across the tenant's jobs in RETRY: attempt, of how many, when
    the next one starts and the last error (from each job's status)."""
    listed = await api.get("/v1/jobs", {"state": "RETRY", "limit": JOBS_PAGE})
    if not listed.ok:
        return problem(request, listed, "retries")
    jobs: list[dict[str, Any]] = listed.body["items"]
    statuses = await asyncio.gather(*(api.get(f"/task/status/{job['id']}") for job in jobs))
    waiting = [
        {**shard, "job": job}
        for job, status in zip(jobs, statuses, strict=True)
        if status.ok
        for shard in status.body.get("retrying") or []
    ]
    return render(request, "_retries.html", waiting=waiting)


@router.get("/f/schedules", response_class=HTMLResponse)
async def schedules_fragment(request: Request, api: Api) -> HTMLResponse:
    """The tenant's schedules, each with its next 5 runs."""
    answer = await api.get("/v1/schedules", {"limit": 50})
    if not answer.ok:
        return problem(request, answer, "schedules")
    schedules: list[dict[str, Any]] = answer.body["items"]
    upcoming = await asyncio.gather(*(api.get(f"/v1/schedules/{schedule['id']}/next", {"n": 5}) for schedule in schedules))
    runs = {schedule["id"]: (nxt.body.get("runs") if nxt.ok else None) for schedule, nxt in zip(schedules, upcoming, strict=True)}
    return render(request, "_schedules.html", schedules=schedules, runs=runs)


@router.get("/f/workers", response_class=HTMLResponse)
async def workers_fragment(request: Request, api: Api) -> HTMLResponse:
    """The live workers and their load (running tasks over pool size); needs an operator key.
    Without worker control on this gateway (404) or without the scope (403), says so."""
    answer = await api.get("/v1/workers")
    if not answer.ok:
        return problem(request, answer, "workers")
    workers = []
    for worker in answer.body or []:
        size = (worker.get("pool") or {}).get("max_concurrency") or len((worker.get("pool") or {}).get("processes") or []) or 0
        running = len(worker.get("running") or [])
        processed = sum(int(count) for count in (worker.get("processed") or {}).values() if isinstance(count, int))
        workers.append({**worker, "size": size, "busy": running, "load": charts.percent(running, size), "processed_total": processed})
    return render(request, "_workers.html", workers=workers)


# --- actions -------------------------------------------------------------------------------------
def flash(request: Request, answer: ApiAnswer, message: str, link: str | None = None) -> HTMLResponse:
    """The outcome of a command: `message` when the API accepted it, else its problem. A success
    triggers `cairn:changed` so the lists refresh at once."""
    if not answer.ok:
        return render(request, "_flash.html", status=answer.status, ok=False, message=answer.detail)
    return render(request, "_flash.html", headers={"HX-Trigger": "cairn:changed"}, ok=True, message=message, link=link)


@router.post("/a/jobs", response_class=HTMLResponse)
async def start_job(request: Request, api: Api, spec: Annotated[str, Form(max_length=100_000)]) -> HTMLResponse:
    """Start a job from its spec (the JSON body of `POST /v1/jobs`)."""
    try:
        json.loads(spec)
    except ValueError as error:
        return render(request, "_flash.html", status=422, ok=False, message=f"spec: not JSON ({error})")
    answer = await api.post_json_text("/v1/jobs", spec)
    job_id = answer.body.get("id") if answer.ok and isinstance(answer.body, dict) else None
    return flash(request, answer, f"job {job_id} started", f"/console/jobs/{job_id}")


@router.post("/a/jobs/{job_id}/cancel", response_class=HTMLResponse)
async def cancel_job(request: Request, api: Api, job_id: ID) -> HTMLResponse:
    return flash(request, await api.post(f"/v1/jobs/{job_id}/cancel"), f"cancel of job {job_id} requested")


@router.post("/a/dlq/{entry_id}/{action}", response_class=HTMLResponse)
async def dead_letter_command(
    request: Request, api: Api, entry_id: ID, action: Annotated[str, Path(pattern="^(replay|discard)$")]
) -> HTMLResponse:
    """Replay or discard a dead letter; the note records that it came from the console."""
    answer = await api.post(f"/dlq/entries/{entry_id}/{action}", {"note": "from the web console"})
    command = answer.body.get("command_id") if answer.ok and isinstance(answer.body, dict) else None
    return flash(request, answer, f"{action} of {entry_id} requested (command {command})")


@router.post("/a/schedules/{schedule_id}/{action}", response_class=HTMLResponse)
async def schedule_command(
    request: Request, api: Api, schedule_id: ID, action: Annotated[str, Path(pattern="^(pause|resume)$")]
) -> HTMLResponse:
    return flash(request, await api.post(f"/v1/schedules/{schedule_id}/{action}"), f"schedule {schedule_id}: {action}d")
