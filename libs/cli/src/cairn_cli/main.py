"""`cairn`: jobs, dead letters, schedules, workers and API keys from the command line.

A client of the gateway's HTTP API only (client.py); URL and key from the options, the
environment or a config file (config.py). Every command prints a Rich table or panel, or with
`--json` (before the command: `cairn --json jobs ls`) the API's JSON answer on one line.
Exit status: 0 done; 1 the gateway refused or the watched job did not succeed; 2 bad usage.
"""

import json
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.console import Console
from rich.table import Table

from cairn_cli.client import ApiError, CairnClient
from cairn_cli.config import ConfigError, load_config
from cairn_cli.watch import STATE_STYLES, TERMINAL_STATES, watch_job

app = typer.Typer(name="cairn", help="Cairn's command line: a client of the gateway's HTTP API.", no_args_is_help=True)
jobs_app = typer.Typer(help="Start, list, follow and stop jobs.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead letters: list, show, replay, discard.", no_args_is_help=True)
schedules_app = typer.Typer(help="Schedules (cron, interval, once).", no_args_is_help=True)
workers_app = typer.Typer(help="Worker control (needs an operator or admin key).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of your tenant (needs an admin key).", no_args_is_help=True)
results_app = typer.Typer(help="Results of finished jobs.", no_args_is_help=True)
chains_app = typer.Typer(help="Chains: jobs run one after another, each reading the previous one's result.", no_args_is_help=True)
for sub, name in (
    (jobs_app, "jobs"), (chains_app, "chains"), (dlq_app, "dlq"), (schedules_app, "schedules"), (workers_app, "workers"), (keys_app, "keys"), (results_app, "results"),
):
    app.add_typer(sub, name=name)

console = Console()
errors = Console(stderr=True)


class State:
    """What the global options set: the client and the output mode."""

    def __init__(self, client: CairnClient, as_json: bool) -> None:
        self.client = client
        self.as_json = as_json


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(help="Gateway URL (env CAIRN_URL)")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (env CAIRN_API_KEY)")] = None,
    config: Annotated[Path | None, typer.Option(help="Config file (env CAIRN_CONFIG; default ~/.config/cairn/config.toml)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON answer instead of tables")] = False,
) -> None:
    try:
        settings = load_config(url, api_key, config)
    except ConfigError as error:
        errors.print(f"[red]config:[/red] {error}")
        raise typer.Exit(2) from None
    client = CairnClient(settings)
    ctx.call_on_close(client.close)
    ctx.obj = State(client, as_json)


def _state(ctx: typer.Context) -> State:
    state = ctx.obj
    assert isinstance(state, State)
    return state


def _segment(value: str) -> str:
    """`value` as one URL path segment: an id holding `/` or `..` cannot reach another route."""
    return quote(str(value), safe="")


def _call(ctx: typer.Context, method: str, path: str, **options: Any) -> Any:
    """One API call; an error is printed (the gateway's detail) and exits 1."""
    try:
        return _state(ctx).client.call(method, path, **options)
    except ApiError as error:
        errors.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None


def _emit(ctx: typer.Context, data: Any, render: Any = None) -> None:
    """`--json`: the data on one line; else `render(data)` (a Rich renderable or text), or nothing."""
    if _state(ctx).as_json:
        console.out(json.dumps(data, default=str), highlight=False)
    elif render is not None:
        console.print(render(data) if callable(render) else render)


def _styled(state: Any) -> str:
    text = str(state)
    style = STATE_STYLES.get(text, "white")
    return f"[{style}]{text}[/{style}]"


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*["" if cell is None else str(cell) for cell in row])
    return table


def _parse_params(pairs: list[str] | None, params_json: str | None) -> dict[str, Any]:
    """`--param k=v` (v read as JSON when it parses: numbers, booleans, lists) over `--params` JSON."""
    params: dict[str, Any] = {}
    if params_json:
        try:
            loaded = json.loads(params_json)
        except ValueError as error:
            raise typer.BadParameter(f"not JSON: {error}", param_hint="--params") from None
        if not isinstance(loaded, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--params")
        params.update(loaded)
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not key=value", param_hint="--param")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params


def _parse_params_from(pairs: list[str] | None) -> dict[str, str]:
    """`--param-from count=result.records_written` (repeatable): param path -> path in the
    job's first dependency."""
    mapping: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, path = pair.partition("=")
        if not sep or not key or not path:
            raise typer.BadParameter(f"{pair!r} is not param=path", param_hint="--param-from")
        mapping[key] = path
    return mapping


def _spec(
    pipeline: str | None, spec_file: Path | None, params: dict[str, Any], shards: int | None, batch_size: int | None,
    collection: str | None, name: str | None, priority: int | None,
) -> dict[str, Any]:
    """A job spec from `--spec FILE` (JSON) and/or the options (the options win)."""
    spec: dict[str, Any] = {}
    if spec_file is not None:
        try:
            spec = json.loads(spec_file.read_text())
        except (OSError, ValueError) as error:
            raise typer.BadParameter(str(error), param_hint="--spec") from None
    if pipeline:
        spec["pipeline"] = pipeline
    if "pipeline" not in spec:
        raise typer.BadParameter("name a pipeline (argument) or give --spec", param_hint="PIPELINE")
    if params:
        spec["params"] = {**spec.get("params", {}), **params}
    spec.setdefault("params", {})
    if shards is not None:
        spec["sharding"] = {**spec.get("sharding", {}), "shards": shards}
    for field, value in (("batch_size", batch_size), ("target_collection", collection), ("name", name), ("priority", priority)):
        if value is not None:
            spec[field] = value
    return spec


# --- jobs ------------------------------------------------------------------------------------------
@jobs_app.command("start")
def jobs_start(
    ctx: typer.Context,
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name, e.g. synthetic")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="A parameter key=value (repeatable)")] = None,
    params: Annotated[str | None, typer.Option(help="Parameters as a JSON object")] = None,
    spec_file: Annotated[Path | None, typer.Option("--spec", help="A whole job spec (JSON file)")] = None,
    shards: Annotated[int | None, typer.Option(help="Number of shards")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Records per committed batch")] = None,
    collection: Annotated[str | None, typer.Option(help="Target collection")] = None,
    name: Annotated[str | None, typer.Option(help="A name to find the job by")] = None,
    priority: Annotated[int | None, typer.Option(min=1, max=4, help="1 LOW .. 4 CRITICAL")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Same key, same job")] = None,
    after: Annotated[list[str] | None, typer.Option("--after", help="A job id to wait for (repeatable): WAITING until all succeeded")] = None,
    on_dependency_failure: Annotated[str | None, typer.Option(help="fail (default), skip or run")] = None,
    param_from: Annotated[
        list[str] | None, typer.Option("--param-from", help="param=path: a param from the first --after job, e.g. count=result.records_written")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Then follow it with progress bars")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="--watch: seconds between polls")] = 1.0,
) -> None:
    """Submit a job (POST /v1/jobs); prints its id."""
    spec = _spec(pipeline, spec_file, _parse_params(param, params), shards, batch_size, collection, name, priority)
    if after:
        spec["after"] = [*spec.get("after", []), *after]
    if on_dependency_failure:
        spec["on_dependency_failure"] = on_dependency_failure
    if param_from:
        spec["params_from"] = {**spec.get("params_from", {}), **_parse_params_from(param_from)}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    accepted = _call(ctx, "POST", "/v1/jobs", json=spec, headers=headers)
    _emit(ctx, accepted, lambda a: f"job [bold]{a['id']}[/bold] {_styled(a['state'])}" + ("" if a.get("created", True) else " (existing)"))
    if watch:
        jobs_watch(ctx, accepted["id"], interval=interval, max_shards=20, timeout=None)


@jobs_app.command("ls")
def jobs_ls(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="WAITING, PENDING, STARTED, RETRY, SUCCESS, FAILURE, CANCELLED")] = None,
    pipeline: Annotated[str | None, typer.Option()] = None,
    query: Annotated[str | None, typer.Option("--query", "-q", help="Text in the name")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
) -> None:
    """The tenant's jobs, newest first."""
    page = _call(ctx, "GET", "/v1/jobs", params={"state": state, "pipeline": pipeline, "q": query, "limit": limit})
    _emit(ctx, page, lambda p: _table(
        "jobs", ["id", "name", "pipeline", "state", "shards", "created"],
        [[j["id"], j.get("name"), j["pipeline"], _styled(j["state"]), j.get("shard_count"), j.get("created_at")] for j in p["items"]],
    ))


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: str) -> None:
    """One job: state, progress, records and its shards."""
    job = _call(ctx, "GET", f"/v1/jobs/{_segment(job_id)}")

    def render(j: dict[str, Any]) -> Table:
        table = _table(
            f"job {j['id']} {j['state']} {float(j.get('progress') or 0):.1f}% {j.get('records_done', 0):,} records",
            ["shard", "state", "attempts", "cursor", "range", "records", "last error"],
            [
                [s.get("index", s["shard_key"]), _styled(s["state"]), s.get("attempts"), s.get("cursor"),
                 f"[{s.get('range_start')}, {s.get('range_end')})", s.get("records_done"), (s.get("last_error") or "")[:80]]
                for s in j.get("shards") or []
            ],
        )
        return table

    _emit(ctx, job, render)


@jobs_app.command("watch")
def jobs_watch(
    ctx: typer.Context,
    job_id: str,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls")] = 1.0,
    max_shards: Annotated[int, typer.Option(min=0, max=5000, help="Shard bars shown (the first by index)")] = 20,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds")] = None,
) -> None:
    """Live progress bars for the job and its shards (records/s, ETA) until it ends. Exit status
    0 if it succeeded, 1 otherwise."""
    state = _state(ctx)
    try:
        if state.as_json:
            job = _poll_json(state.client, job_id, interval, timeout)
        else:
            job = watch_job(state.client, job_id, console, interval_s=interval, max_shards=max_shards, timeout_s=timeout)
    except ApiError as error:
        errors.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
    final = str(job.get("state"))
    if not state.as_json:
        console.print(f"job [bold]{job_id}[/bold] {_styled(final)}: {int(job.get('records_done') or 0):,} records")
    if final != "SUCCESS":
        raise typer.Exit(1)


def _poll_json(client: CairnClient, job_id: str, interval_s: float, timeout_s: float | None) -> dict[str, Any]:
    """`--json` watch: one line per change of state or records, the last one the finished job."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last: tuple[Any, Any] | None = None
    while True:
        job = client.get(f"/v1/jobs/{_segment(job_id)}", shard_limit=0)
        seen = (job.get("state"), job.get("records_done"))
        if seen != last:
            console.out(json.dumps({k: job.get(k) for k in ("id", "state", "progress", "records_done")}, default=str), highlight=False)
            last = seen
        if job.get("state") in TERMINAL_STATES or (deadline is not None and time.monotonic() > deadline):
            return job
        time.sleep(interval_s)


@jobs_app.command("result")
def jobs_result(ctx: typer.Context, job_id: str) -> None:
    """The result summary of a finished job."""
    result = _call(ctx, "GET", f"/v1/jobs/{_segment(job_id)}/result")
    _emit(ctx, result, lambda r: _table(
        f"result of {r['id']} {r['state']}", ["field", "value"], [[k, v] for k, v in (r.get("result") or {}).items()]
    ))


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str) -> None:
    """Cancel a job (running shards stop at their next batch boundary)."""
    job = _call(ctx, "POST", f"/v1/jobs/{_segment(job_id)}/cancel")
    _emit(ctx, job, lambda j: f"job {j['id']} {_styled(j['state'])}")


@jobs_app.command("rm")
def jobs_rm(ctx: typer.Context, job_ids: Annotated[list[str], typer.Argument(help="Finished jobs to delete")]) -> None:
    """Delete finished jobs (their shards and checkpoints; stored records stay)."""
    for job_id in job_ids:
        _call(ctx, "DELETE", f"/v1/jobs/{_segment(job_id)}")
        _emit(ctx, {"id": job_id, "deleted": True}, f"job {job_id} deleted")


# --- chains --------------------------------------------------------------------------------------
def _chain_table(chain: dict[str, Any]) -> Table:
    current = chain.get("current_step")
    return _table(
        f"chain {chain['id']} {chain.get('name') or ''} {chain['state']}" + (f" (step {current})" if current is not None else ""),
        ["step", "job", "pipeline", "state", "progress", "waits for", "why it did not run"],
        [
            [s["index"], s["job"]["id"], s["job"]["pipeline"], _styled(s["job"]["state"]), f"{float(s.get('progress') or 0):.1f}%",
             ", ".join(s["job"].get("after") or []), ((s["job"].get("dependency_failure") or {}).get("reason") or "")[:80]]
            for s in chain.get("steps") or []
        ],
    )


@chains_app.command("start")
def chains_start(
    ctx: typer.Context,
    spec_file: Annotated[Path, typer.Argument(help='The chain as JSON: {"name": ..., "steps": [job spec, ...]}')],
    idempotency_key: Annotated[str | None, typer.Option(help="Same key, same chain")] = None,
) -> None:
    """Submit a chain (POST /v1/chains); prints its id and its steps' job ids."""
    try:
        body = json.loads(spec_file.read_text())
    except (OSError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="SPEC_FILE") from None
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    accepted = _call(ctx, "POST", "/v1/chains", json=body, headers=headers)
    _emit(ctx, accepted, lambda a: f"chain [bold]{a['id']}[/bold]: " + " -> ".join(a["job_ids"]))


@chains_app.command("ls")
def chains_ls(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=100)] = 20) -> None:
    """The tenant's chains, newest first."""
    page = _call(ctx, "GET", "/v1/chains", params={"limit": limit})
    _emit(ctx, page, lambda p: _table(
        "chains", ["id", "name", "state", "step", "steps", "created"],
        [[c["id"], c.get("name"), _styled(c["state"]), c.get("current_step"), len(c.get("steps") or []), c.get("created_at")] for c in p["items"]],
    ))


@chains_app.command("show")
def chains_show(ctx: typer.Context, chain_id: str) -> None:
    """One chain: its state and a row per step (job, state, progress, why it did not run)."""
    chain = _call(ctx, "GET", f"/v1/chains/{_segment(chain_id)}")
    _emit(ctx, chain, _chain_table)


@chains_app.command("cancel")
def chains_cancel(ctx: typer.Context, chain_id: str) -> None:
    """Cancel every step of the chain that has not finished."""
    chain = _call(ctx, "POST", f"/v1/chains/{_segment(chain_id)}/cancel")
    _emit(ctx, chain, _chain_table)


# --- dead letters ----------------------------------------------------------------------------------
@dlq_app.command("ls")
def dlq_ls(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Option(help="Entries of this job")] = None,
    status: Annotated[str | None, typer.Option(help="open, replaying, replayed, discarded")] = None,
    reason: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
) -> None:
    """Dead letters, newest first."""
    page = _call(ctx, "GET", "/dlq/entries", params={"job_id": job, "status": status, "reason": reason, "limit": limit})
    _emit(ctx, page, lambda p: _table(
        f"dead letters ({p['total']})", ["id", "status", "reason", "error", "job", "shard", "attempts"],
        [[e["id"], e["status"], e["reason"], f"{e.get('error_type') or ''}: {(e.get('error_message') or '')[:60]}",
          e.get("job_id"), e.get("shard_key"), e.get("attempts")] for e in p["items"]],
    ))


@dlq_app.command("show")
def dlq_show(ctx: typer.Context, entry_id: str) -> None:
    """One dead letter in full (error, stack, replays)."""
    entry = _call(ctx, "GET", f"/dlq/entries/{_segment(entry_id)}")
    _emit(ctx, entry, lambda e: _table(
        f"dead letter {e['id']}", ["field", "value"],
        [[k, e.get(k)] for k in ("status", "reason", "error_type", "error_message", "job_id", "shard_key", "attempts", "replay", "stack")],
    ))


def _dlq_command(ctx: typer.Context, entry_id: str, action: str, note: str | None, wait: bool) -> None:
    accepted = _call(ctx, "POST", f"/dlq/entries/{_segment(entry_id)}/{action}", json={"note": note} if note else None)
    outcome = accepted
    if wait:
        deadline = time.monotonic() + 60
        while True:
            outcome = _call(ctx, "GET", f"/dlq/commands/{_segment(accepted['command_id'])}")
            if outcome.get("status") != "pending" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    _emit(ctx, outcome, lambda o: f"{action} of {entry_id}: command {o['command_id']} " + (
        f"{o.get('status')} {o.get('outcome') or ''} {o.get('detail') or ''}".strip() if wait else "accepted"
    ))


@dlq_app.command("replay")
def dlq_replay(
    ctx: typer.Context,
    entry_id: str,
    note: Annotated[str | None, typer.Option(help="Why (kept with the entry)")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the DLQ handler handled the command")] = True,
) -> None:
    """Replay a dead letter: its shard is re-dispatched from its checkpoint."""
    _dlq_command(ctx, entry_id, "replay", note, wait)


@dlq_app.command("discard")
def dlq_discard(
    ctx: typer.Context,
    entry_id: str,
    note: Annotated[str | None, typer.Option(help="Why (kept with the entry)")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait")] = True,
) -> None:
    """Close a dead letter without replay (kept for audit)."""
    _dlq_command(ctx, entry_id, "discard", note, wait)


# --- schedules -------------------------------------------------------------------------------------
def _schedule_row(s: dict[str, Any]) -> list[Any]:
    when = s.get("cron") or (f"every {s['interval_s']} s" if s.get("interval_s") else s.get("at"))
    return [s["id"], s.get("name"), s["kind"], when, s["state"], s.get("next_run_at"), s.get("last_job_id")]


SCHEDULE_COLUMNS = ["id", "name", "kind", "when", "state", "next run", "last job"]


@schedules_app.command("ls")
def schedules_ls(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=200)] = 50) -> None:
    """The tenant's schedules."""
    page = _call(ctx, "GET", "/v1/schedules", params={"limit": limit})
    _emit(ctx, page, lambda p: _table("schedules", SCHEDULE_COLUMNS, [_schedule_row(s) for s in p["items"]]))


@schedules_app.command("show")
def schedules_show(ctx: typer.Context, schedule_id: str) -> None:
    schedule = _call(ctx, "GET", f"/v1/schedules/{_segment(schedule_id)}")
    _emit(ctx, schedule, lambda s: _table(f"schedule {s['id']}", SCHEDULE_COLUMNS, [_schedule_row(s)]))


@schedules_app.command("create")
def schedules_create(
    ctx: typer.Context,
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline of the job each run starts")] = None,
    cron: Annotated[str | None, typer.Option(help="5-field cron expression")] = None,
    timezone: Annotated[str, typer.Option(help="Time zone of --cron")] = "UTC",
    every: Annotated[int | None, typer.Option(help="Interval in seconds")] = None,
    at: Annotated[str | None, typer.Option(help="Once, at this ISO 8601 time")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="A job parameter key=value (repeatable)")] = None,
    params: Annotated[str | None, typer.Option(help="Job parameters as a JSON object")] = None,
    spec_file: Annotated[Path | None, typer.Option("--spec", help="The job spec (JSON file)")] = None,
    name: Annotated[str | None, typer.Option()] = None,
    overlap: Annotated[str | None, typer.Option(help="skip, buffer_one, allow_all, cancel_other")] = None,
    paused: Annotated[bool, typer.Option("--paused", help="Create it paused")] = False,
) -> None:
    """Create a schedule: exactly one of --cron, --every, --at."""
    given = [kind for kind, value in (("cron", cron), ("interval", every), ("once", at)) if value is not None]
    if len(given) != 1:
        raise typer.BadParameter("give exactly one of --cron, --every, --at")
    body: dict[str, Any] = {
        "kind": given[0],
        "job": _spec(pipeline, spec_file, _parse_params(param, params), None, None, None, None, None),
        "paused": paused,
    }
    if cron is not None:
        body.update(cron=cron, timezone=timezone)
    if every is not None:
        body["interval_s"] = every
    if at is not None:
        body["at"] = at
    if name is not None:
        body["name"] = name
    if overlap is not None:
        body["overlap"] = overlap
    schedule = _call(ctx, "POST", "/v1/schedules", json=body)
    _emit(ctx, schedule, lambda s: f"schedule [bold]{s['id']}[/bold] {s['state']}, next run {s.get('next_run_at')}")


def _schedule_action(ctx: typer.Context, schedule_id: str, action: str) -> None:
    schedule = _call(ctx, "POST", f"/v1/schedules/{_segment(schedule_id)}/{action}")
    _emit(ctx, schedule, lambda s: f"schedule {s['id']} {s['state']}, next run {s.get('next_run_at')}")


@schedules_app.command("pause")
def schedules_pause(ctx: typer.Context, schedule_id: str) -> None:
    _schedule_action(ctx, schedule_id, "pause")


@schedules_app.command("resume")
def schedules_resume(ctx: typer.Context, schedule_id: str) -> None:
    _schedule_action(ctx, schedule_id, "resume")


@schedules_app.command("next")
def schedules_next(ctx: typer.Context, schedule_id: str, n: Annotated[int, typer.Option("-n", min=1, max=100)] = 5) -> None:
    """The schedule's next N run times."""
    answer = _call(ctx, "GET", f"/v1/schedules/{_segment(schedule_id)}/next", params={"n": n})
    _emit(ctx, answer, lambda a: _table(f"next runs of {schedule_id} ({a.get('state')})", ["run at"], [[run] for run in a.get("runs") or []]))


@schedules_app.command("rm")
def schedules_rm(ctx: typer.Context, schedule_ids: list[str]) -> None:
    """Delete schedules (jobs they started stay)."""
    for schedule_id in schedule_ids:
        _call(ctx, "DELETE", f"/v1/schedules/{_segment(schedule_id)}")
        _emit(ctx, {"id": schedule_id, "deleted": True}, f"schedule {schedule_id} deleted")


# --- workers ---------------------------------------------------------------------------------------
@workers_app.command("ls")
def workers_ls(ctx: typer.Context) -> None:
    """Live workers: pool, running shards, processed counts, heartbeat age."""
    listed = _call(ctx, "GET", "/v1/workers")

    def render(ws: list[dict[str, Any]]) -> Table:
        rows = []
        for w in ws:
            age = w.get("heartbeat_age_s")
            rows.append([
                w["hostname"], f"{len(w['pool'].get('processes') or [])}/{w['pool'].get('max_concurrency')}",
                ", ".join(w.get("running_shards") or []) or "-", sum((w.get("processed") or {}).values()),
                "-" if age is None else f"{age:.1f} s", f"{w.get('uptime_s') or 0} s",
            ])
        return _table(f"workers ({len(ws)})", ["worker", "pool", "running shards", "processed", "heartbeat", "uptime"], rows)

    _emit(ctx, listed, render)


@workers_app.command("inspect")
def workers_inspect(
    ctx: typer.Context,
    hostname: str,
    kind: Annotated[str, typer.Argument(help="active, reserved, scheduled, stats, registered, revoked, active_queues")] = "active",
) -> None:
    """`celery inspect <kind>` of one worker."""
    answer = _call(ctx, "GET", f"/v1/workers/{_segment(hostname)}/inspect/{_segment(kind)}")

    def render(a: Any) -> Any:
        if isinstance(a, list):
            return _table(f"{kind} on {hostname} ({len(a)})", ["task id", "task", "pid", "shard", "job", "started"],
                          [[t.get("task_id"), t.get("task"), t.get("pid"), t.get("shard_key"), t.get("job_id"), t.get("started_at")] for t in a])
        return json.dumps(a, indent=2, default=str)

    _emit(ctx, answer, render)


def _worker_command(ctx: typer.Context, hostname: str, path: str, body: dict[str, Any] | None = None) -> None:
    reply = _call(ctx, "POST", f"/v1/workers/{_segment(hostname)}/{path}", json=body)
    _emit(ctx, reply, lambda r: f"{hostname}: {r.get('ok', r)}")


@workers_app.command("grow")
def workers_grow(ctx: typer.Context, hostname: str, n: Annotated[int, typer.Option("-n", min=1, max=64)] = 1) -> None:
    """Add pool processes."""
    _worker_command(ctx, hostname, "pool/grow", {"n": n})


@workers_app.command("shrink")
def workers_shrink(ctx: typer.Context, hostname: str, n: Annotated[int, typer.Option("-n", min=1, max=64)] = 1) -> None:
    """Remove pool processes (each finishes its task first)."""
    _worker_command(ctx, hostname, "pool/shrink", {"n": n})


@workers_app.command("autoscale")
def workers_autoscale(
    ctx: typer.Context, hostname: str, max_: Annotated[int, typer.Option("--max", min=1)], min_: Annotated[int, typer.Option("--min", min=0)] = 0
) -> None:
    """Set the autoscale bounds (a worker started with autoscale only)."""
    _worker_command(ctx, hostname, "pool/autoscale", {"max": max_, "min": min_})


@workers_app.command("restart")
def workers_restart(ctx: typer.Context, hostname: str) -> None:
    """Replace the worker's pool processes."""
    _worker_command(ctx, hostname, "pool/restart")


@workers_app.command("shutdown")
def workers_shutdown(ctx: typer.Context, hostname: str) -> None:
    """Graceful (warm) shutdown of a worker."""
    _worker_command(ctx, hostname, "shutdown")


@workers_app.command("terminate")
def workers_terminate(
    ctx: typer.Context,
    shard_key: str,
    then: Annotated[str, typer.Option(help="ready (rerun from its checkpoint) or cancelled")] = "ready",
) -> None:
    """Stop a running shard now: lease released, batch in flight not committed."""
    answer = _call(ctx, "POST", f"/v1/shards/{_segment(shard_key)}/terminate", json={"then": then})
    _emit(ctx, answer, lambda a: f"shard {a['shard_key']} -> {_styled(a['state'])} (token {a['fencing_token']}; "
          + ("run interrupted" if a.get("interrupted") else f"run stops at its next write: {a.get('reply')}") + ")")


@workers_app.command("revoke")
def workers_revoke(ctx: typer.Context, shard_key: str) -> None:
    """Cancel a shard that has not started yet."""
    answer = _call(ctx, "POST", f"/v1/shards/{_segment(shard_key)}/revoke")
    _emit(ctx, answer, lambda a: f"shard {a['shard_key']} -> {_styled(a['state'])}")


# --- results -------------------------------------------------------------------------------------
@results_app.command("ls")
def results_ls(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="SUCCESS, FAILURE or CANCELLED")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
) -> None:
    """Finished jobs, newest first: result, runtime, failed shards."""
    page = _call(ctx, "GET", "/v1/results", params={"state": state, "limit": limit})
    _emit(ctx, page, lambda p: _table(
        "results", ["job", "state", "records", "runtime", "failed shards"],
        [[r.get("id"), _styled(r.get("state")), (r.get("result") or {}).get("records_done"), r.get("runtime_s"),
          ", ".join(f.get("shard_key", "") for f in r.get("failed_shards") or []) or "-"] for r in p.get("items") or []],
    ))


# --- keys ------------------------------------------------------------------------------------------
@keys_app.command("ls")
def keys_ls(ctx: typer.Context) -> None:
    keys = _call(ctx, "GET", "/v1/keys")
    _emit(ctx, keys, lambda ks: _table("API keys", ["id", "name", "scopes", "created", "revoked"],
                                       [[k["id"], k.get("name"), ",".join(k["scopes"]), k.get("created_at"), k["revoked"]] for k in ks]))


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    scopes: Annotated[str, typer.Option(help="Comma-separated: submit, read, operator, admin")] = "submit,read",
    name: Annotated[str | None, typer.Option()] = None,
    rate_limit: Annotated[int | None, typer.Option(help="Requests per minute")] = None,
) -> None:
    """A new key of your tenant; its token is shown once."""
    body = {"scopes": [s.strip() for s in scopes.split(",") if s.strip()], "name": name, "rate_limit_per_minute": rate_limit}
    key = _call(ctx, "POST", "/v1/keys", json=body)
    _emit(ctx, key, lambda k: f"key {k['id']} ({','.join(k['scopes'])}): {k['token']}\n(shown once)")


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: str) -> None:
    _call(ctx, "DELETE", f"/v1/keys/{_segment(key_id)}")
    _emit(ctx, {"id": key_id, "revoked": True}, f"key {key_id} revoked")


if __name__ == "__main__":
    app()
