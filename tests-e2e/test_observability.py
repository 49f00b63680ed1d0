"""Issue 6 acceptance: one trace per job across every hop, every metric on its service's /metrics
with the values of what the test did, JSON logs that name the work, and infra files that
Prometheus and Grafana accept.

The module runs its own system (own vhost, database, trace file and fresh metric counters), so
the figures it checks are exactly those of its jobs.
"""

import json
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cairn_contracts.topology import EXCHANGE_COMMANDS, EXCHANGE_DLX, EXCHANGE_EVENTS, QUEUE_DLQ, QUEUE_INGEST
from harness import System, dump

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO_ROOT / "infra" / "prometheus"
DASHBOARD = REPO_ROOT / "infra" / "grafana" / "dashboards" / "cairn.json"
SERVICES = ("gateway", "scheduler", "ingest_worker", "dlq_handler")
SERVICE_NAMES = {"gateway": "gateway", "scheduler": "scheduler", "ingest-worker": "ingest_worker", "dlq-handler": "dlq_handler"}

# Two shards of 1000 records, batches of 100; shard 1 fails at key 1500 with a retryable error on
# every attempt: attempt 1 stores 1000-1499 and fails, attempts 2 and 3 fail at once, then the
# shard is dead-lettered (retries exhausted; the harness allows 3 attempts).
FAILING_JOB = {
    "name": "observability",
    "pipeline": "synthetic",
    "params": {"count": 2000, "record_size": 32, "fail_at_key": 1500, "failure": "retryable"},
    "sharding": {"strategy": "range", "shards": 2},
    "batch_size": 100,
    "target_collection": "e2e_observed",
}


def eventually(check: Callable[[], Any], timeout_s: float = 30, what: str = "", poll_s: float = 0.25) -> Any:
    """The first truthy result of `check`, polled until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what or check}")
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------ metrics
class Scrape:
    """One /metrics page: sample values by name and labels, and every metric name it mentions."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        self.names: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.names.add(family.name)
            for sample in family.samples:
                self.names.add(sample.name)
                self.samples.append((sample.name, dict(sample.labels), sample.value))
        # A labelled metric nobody used yet has only its HELP/TYPE lines.
        self.names.update(re.findall(r"^# (?:HELP|TYPE) (\S+)", text, flags=re.MULTILINE))

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of `name`'s samples whose labels include `labels`; None if there is none."""
        found = [v for n, ls, v in self.samples if n == name and all(ls.get(k) == w for k, w in labels.items())]
        return sum(found) if found else None


def scrape(system: System, service: str) -> Scrape:
    return Scrape(system.metrics_text(service))


# ------------------------------------------------------------------------------------ spans
class Trace:
    def __init__(self, spans: list[dict[str, Any]]) -> None:
        self.spans = spans
        self.by_id = {s["context"]["span_id"]: s for s in spans}
        self.children: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for span in spans:
            if span["parent_id"]:
                self.children[span["parent_id"]].append(span)

    @staticmethod
    def service(span: dict[str, Any]) -> str:
        return span["resource"]["attributes"]["service.name"]

    def ancestors(self, span: dict[str, Any]) -> list[dict[str, Any]]:
        chain = []
        while span["parent_id"]:
            span = self.by_id[span["parent_id"]]
            chain.append(span)
        return chain

    def hops(self, span: dict[str, Any]) -> list[str]:
        """The services from the root down to `span`, one entry per change of service."""
        path = [self.service(s) for s in reversed([span, *self.ancestors(span)])]
        return [name for i, name in enumerate(path) if i == 0 or path[i - 1] != name]

    def named(self, name: str, **attributes: Any) -> list[dict[str, Any]]:
        return [
            s for s in self.spans
            if s["name"] == name and all(s["attributes"].get(f"cairn.{k}") == v for k, v in attributes.items())
        ]


def submission_span(system: System, job_id: str) -> dict[str, Any]:
    """The gateway's span of the request that submitted the job."""
    found = [
        s for s in system.spans()
        if s["kind"] == "SpanKind.SERVER" and s["attributes"].get("http.method") == "POST"
        and s["attributes"].get("cairn.job_id") == job_id
    ]
    assert len(found) == 1, f"{len(found)} gateway request spans name job {job_id}"
    return found[0]


def trace_of_job(system: System, job_id: str) -> Trace:
    roots = [submission_span(system, job_id)]
    trace_id = roots[0]["context"]["trace_id"]
    return Trace([s for s in system.spans() if s["context"]["trace_id"] == trace_id])


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def observed(system_factory: Callable[..., System]) -> System:
    system = system_factory("obs", overrides={"CAIRN_LOG_FORMAT": "json"})
    for service in SERVICES:
        eventually(lambda s=service: _answers(system.metrics_url(s)), 30, f"{service} serves /metrics")
    return system


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2, follow_redirects=True).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def failed_job(observed: System) -> str:
    """The job with a retried and then dead-lettered shard, finished and recorded."""
    job_id = observed.start_job(FAILING_JOB)
    final = observed.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)
    assert final["state"] == "FAILURE", dump(final)
    eventually(lambda: observed.db.task_errors.find_one({"job_id": job_id}), 30, "the dead letter is recorded")
    # Spans are exported as they end: wait for the last hops (the DLQ handler, the scheduler's
    # consumption of both shards' events).
    eventually(
        lambda: _trace_complete(observed, job_id), 30, "the job's trace reaches the DLQ handler and both shard events"
    )
    return job_id


def _trace_complete(system: System, job_id: str) -> bool:
    spans = [s for s in system.spans() if s["attributes"].get("cairn.job_id") == job_id]
    names = [s["name"] for s in spans]
    return f"consume {QUEUE_DLQ}" in names and names.count("consume cairn.scheduler.events") >= 2


# ------------------------------------------------------------------------------------ traces
def test_a_job_with_a_retry_and_a_dead_letter_is_one_trace_across_the_four_services(observed: System, failed_job: str) -> None:
    job_id, failing_shard, healthy_shard = failed_job, f"{failed_job}:0001", f"{failed_job}:0000"
    trace = trace_of_job(observed, job_id)
    tenant = observed.db.jobs.find_one({"_id": job_id})["tenant"]

    # One tree: a single root (the gateway's request), every other span's parent in the trace.
    roots = [s for s in trace.spans if not s["parent_id"]]
    assert [r["context"]["span_id"] for r in roots] == [submission_span(observed, job_id)["context"]["span_id"]]
    assert trace.service(roots[0]) == "gateway"
    orphans = [s["name"] for s in trace.spans if s["parent_id"] and s["parent_id"] not in trace.by_id]
    assert not orphans, f"spans whose parent is not in the trace: {orphans}"
    assert {trace.service(s) for s in trace.spans} == {"gateway", "scheduler", "ingest-worker", "dlq-handler"}

    # Every hop in order: request → command publish → scheduler → Celery publish → task → batches
    # → events back to the scheduler, and the dead letter on to the DLQ handler.
    (publish_command,) = trace.named(f"publish {EXCHANGE_COMMANDS}")
    assert trace.service(publish_command) == "gateway" and publish_command["kind"] == "SpanKind.PRODUCER"
    (consume_command,) = trace.named("consume cairn.scheduler.commands")
    assert consume_command["parent_id"] == publish_command["context"]["span_id"]
    dispatches = trace.named("apply_async/cairn.ingest.run_shard")
    # The scheduler sends the first tasks and, when due, the retries (they wait in MongoDB).
    assert {trace.service(s) for s in dispatches} == {"scheduler"} and len(dispatches) == 4
    runs = {key: trace.named("run/cairn.ingest.run_shard", shard_key=key) for key in (healthy_shard, failing_shard)}
    assert len(runs[healthy_shard]) == 1 and len(runs[failing_shard]) == 3, "one run, and three attempts"
    for run in runs[healthy_shard] + runs[failing_shard]:
        # Attempt n: sent by the scheduler n times (the first dispatch, then each due retry).
        assert trace.hops(run) == ["gateway", *["scheduler", "ingest-worker"] * run["attributes"]["cairn.attempt"]]
        assert trace.by_id[run["parent_id"]]["name"] == "apply_async/cairn.ingest.run_shard"
    first, second, third = sorted(runs[failing_shard], key=lambda s: s["attributes"]["cairn.attempt"])
    assert [s["attributes"]["cairn.attempt"] for s in (first, second, third)] == [1, 2, 3]
    assert first in trace.ancestors(second) and second in trace.ancestors(third), "a retry is a child of its attempt"

    (dead_letter,) = trace.named(f"consume {QUEUE_DLQ}")
    assert trace.hops(dead_letter) == ["gateway", *["scheduler", "ingest-worker"] * 3, "dlq-handler"]
    assert trace.by_id[dead_letter["parent_id"]]["name"] == f"publish {EXCHANGE_DLX}"
    assert third in trace.ancestors(dead_letter), "the dead letter comes from the last attempt"
    events = trace.named("consume cairn.scheduler.events")
    assert {e["attributes"]["cairn.shard_key"] for e in events} >= {healthy_shard, failing_shard}
    for event in events:  # announced by the shard's last attempt (the failing shard: its third)
        attempts = 3 if event["attributes"]["cairn.shard_key"] == failing_shard else 1
        assert trace.hops(event) == ["gateway", *["scheduler", "ingest-worker"] * attempts, "scheduler"]
        assert trace.by_id[event["parent_id"]]["name"] == f"publish {EXCHANGE_EVENTS}"

    # The spans name the work: job, shard, tenant, pipeline, and each batch's cursor.
    for span in (roots[0], publish_command, consume_command, *runs[healthy_shard]):
        assert span["attributes"]["cairn.job_id"] == job_id
        assert span["attributes"]["cairn.tenant"] == tenant
        assert span["attributes"]["cairn.pipeline"] == "synthetic"
    batches = trace.named("cairn.batch", shard_key=healthy_shard)
    assert sorted(b["attributes"]["cairn.cursor"] for b in batches) == list(range(0, 1000, 100))
    assert all(trace.by_id[b["parent_id"]] is runs[healthy_shard][0] for b in batches)
    failed_batches = [b for b in trace.named("cairn.batch", shard_key=failing_shard) if b["status"]["status_code"] == "ERROR"]
    assert [b["attributes"]["cairn.cursor"] for b in failed_batches] == [1500, 1500, 1500]

    # MongoDB commands are child spans of the work in every service.
    mongo = [s for s in trace.spans if s["attributes"].get("db.system") == "mongodb"]
    assert {trace.service(s) for s in mongo} == {"gateway", "scheduler", "ingest-worker", "dlq-handler"}
    assert all(s["kind"] == "SpanKind.CLIENT" for s in mongo)
    inserts = [s for s in mongo if trace.by_id[s["parent_id"]]["name"] == "cairn.batch" and s["name"].endswith(".insert")]
    assert len(inserts) == 15, "one insert per stored batch"


def test_redis_calls_are_child_spans_of_the_work_they_serve(observed: System, failed_job: str) -> None:
    observed.status(failed_job)  # a finished job's status is cached in Redis
    observed.status(failed_job)  # ...and read from it

    def redis_spans() -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        spans = observed.spans()
        by_id = {s["context"]["span_id"]: s for s in spans}
        return [(s, by_id.get(s["parent_id"])) for s in spans if s["attributes"].get("db.system") == "redis"]

    def status_calls() -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        found = redis_spans()
        in_requests = {
            s["name"] for s, parent in found
            if parent and Trace.service(parent) == "gateway" and parent["kind"] == "SpanKind.SERVER"
            and parent["attributes"].get("http.method") == "GET"
        }
        # A request's server span is exported when the request ends, a little after its Redis
        # calls (the rate limit's, the cache's): wait until every parent has arrived too.
        return found if {"SET", "GET"} <= in_requests and all(parent for _, parent in found) else []

    found = eventually(status_calls, 10, "the status requests' cache calls")
    assert all(s["kind"] == "SpanKind.CLIENT" for s, _ in found)
    orphans = [s["name"] for s, parent in found if parent is None]
    assert not orphans, f"Redis calls outside any traced work were recorded: {orphans}"


def test_every_log_line_about_the_work_names_its_trace_job_and_shard(observed: System, failed_job: str) -> None:
    job_id, shard = failed_job, f"{failed_job}:0001"
    trace_id = trace_of_job(observed, job_id).spans[0]["context"]["trace_id"].removeprefix("0x")
    lines = {}
    for service in ("scheduler", "ingest_worker", "dlq_handler"):
        text = observed.services[service].log_path.read_text(errors="replace")
        lines[service] = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert lines[service], f"{service} wrote no JSON lines"
        for entry in lines[service]:
            assert {"ts", "level", "logger", "message", "service", "trace_id", "correlation_id", "job_id", "shard_key"} <= entry.keys()

    about_shard = [e for e in lines["ingest_worker"] if shard in e["message"]]
    assert len(about_shard) >= 3, "the retries and the dead letter are logged"
    for entry in about_shard:
        assert (entry["job_id"], entry["shard_key"], entry["correlation_id"], entry["trace_id"]) == (job_id, shard, job_id, trace_id), entry
    recorded = [e for e in lines["dlq_handler"] if e["message"].startswith("recorded dead letter") and e["job_id"] == job_id]
    assert [(e["shard_key"], e["trace_id"]) for e in recorded] == [(shard, trace_id)]


# ------------------------------------------------------------------------------------ metrics
def test_every_metric_is_on_its_service_with_the_values_of_the_job(observed: System, failed_job: str) -> None:
    worker = scrape(observed, "ingest_worker")
    synthetic = {"pipeline": "synthetic"}
    assert worker.value("cairn_records_processed_total", **synthetic) == 1500
    assert worker.value("cairn_records_redone_total", **synthetic) == 0
    assert worker.value("cairn_batches_total", **synthetic) == 15
    assert worker.value("cairn_batch_duration_seconds_count", **synthetic) == 15
    assert worker.value("cairn_failures_total", pipeline="synthetic", error_type="RetryableError", retryable="true") == 3
    assert worker.value("cairn_shard_retries_total", **synthetic) == 2
    assert worker.value("cairn_shard_runs_total", pipeline="synthetic", outcome="succeeded") == 1
    assert worker.value("cairn_shard_runs_total", pipeline="synthetic", outcome="dead_lettered") == 1
    assert worker.value("cairn_shard_run_duration_seconds_count") == 4  # 1 + 3 attempts
    assert worker.value("cairn_shard_run_duration_seconds_count", outcome="retry_scheduled") == 2
    assert worker.value("cairn_task_queue_wait_seconds_count") == 4
    assert worker.value("cairn_publish_confirm_seconds_count", exchange=EXCHANGE_EVENTS) == 2
    assert worker.value("cairn_publish_confirm_seconds_count", exchange=EXCHANGE_DLX) == 1
    assert worker.value("cairn_publish_confirm_seconds_count", exchange=QUEUE_INGEST) is None  # retries: the scheduler sends them
    assert worker.value("cairn_lease_takeovers_total") == 0
    assert worker.value("cairn_worker_tasks_running") == 0  # prefork children: multiprocess, livesum

    gateway = scrape(observed, "gateway")
    request = submission_span(observed, failed_job)["attributes"]
    route, status = request["http.route"], str(request["http.status_code"])
    assert gateway.value("cairn_http_requests_total", method="POST", route=route, status=status) == 1
    assert gateway.value("cairn_http_request_duration_seconds_count", method="POST", route=route) == 1
    assert gateway.value("cairn_publish_confirm_seconds_count", exchange=EXCHANGE_COMMANDS) == 1

    dlq = scrape(observed, "dlq_handler")
    assert dlq.value("cairn_dead_letters_total", reason="retries_exhausted", source_queue=QUEUE_INGEST, kind="service") == 1
    assert dlq.value("cairn_dead_letters_total") == 1

    def scheduler_settled() -> Scrape | None:
        page = scrape(observed, "scheduler")
        settled = page.value("cairn_jobs", state="FAILURE") == 1 and page.value("cairn_shards", state="FAILED") == 1
        return page if settled and page.value("cairn_queue_messages", queue=QUEUE_INGEST) == 0 else None

    scheduler = eventually(scheduler_settled, 15, "the scheduler's gauges show the finished job")
    assert scheduler.value("cairn_shards", state="SUCCEEDED") == 1
    assert scheduler.value("cairn_jobs", state="STARTED") == 0
    assert scheduler.value("cairn_queue_messages", queue=QUEUE_DLQ) == 0
    assert scheduler.value("cairn_queue_consumers", queue=QUEUE_DLQ) >= 1
    assert scheduler.value("cairn_oldest_queued_shard_age_seconds") == 0
    assert scheduler.value("cairn_job_duration_seconds_count", pipeline="synthetic", state="FAILURE") == 1
    assert scheduler.value("cairn_publish_confirm_seconds_count", exchange=QUEUE_INGEST) == 4  # 2 dispatches, 2 retries
    assert scheduler.value("cairn_lease_reclaims_total") == 0
    assert scheduler.value("cairn_gauge_collections_total", outcome="ok") > 0


def test_queue_depth_rises_while_no_worker_consumes_and_falls_to_zero(observed: System, failed_job: str) -> None:
    waits_before = scrape(observed, "ingest_worker").value("cairn_task_queue_wait_seconds_sum") or 0
    observed.services["ingest_worker"].stop()
    try:
        job_id = observed.start_job(  # shards of 100 records, batches of 50: a task each (no bundle)
            {"pipeline": "synthetic", "params": {"count": 400}, "sharding": {"shards": 4}, "batch_size": 50, "target_collection": "e2e_backlog"}
        )
        stopped_at = time.monotonic()

        def backlog() -> Scrape | None:
            page = scrape(observed, "scheduler")
            return page if page.value("cairn_queue_messages", queue=QUEUE_INGEST) == 4 else None

        page = eventually(backlog, 30, "four shard tasks wait in cairn.ingest")
        assert page.value("cairn_queue_consumers", queue=QUEUE_INGEST) == 0
        assert page.value("cairn_shards", state="QUEUED") == 4
        eventually(lambda: scrape(observed, "scheduler").value("cairn_oldest_queued_shard_age_seconds") >= 1, 10, "backlog ages")
    finally:
        observed.services["ingest_worker"].start()
    waited_s = time.monotonic() - stopped_at

    assert observed.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)["state"] == "SUCCESS"

    def drained() -> Scrape | None:
        # The gauges are refreshed periodically: wait for a scrape taken after the job finished.
        page = scrape(observed, "scheduler")
        empty = page.value("cairn_queue_messages", queue=QUEUE_INGEST) == 0
        consumed = page.value("cairn_queue_consumers", queue=QUEUE_INGEST) >= 1
        return page if empty and consumed and page.value("cairn_shards", state="SUCCEEDED") == 5 else None

    page = eventually(drained, 60, "cairn.ingest drained, consumed again, and the shard gauges refreshed")
    assert page.value("cairn_oldest_queued_shard_age_seconds") == 0
    worker = eventually(lambda: _serving(observed, "ingest_worker"), 30, "the restarted worker serves /metrics")
    # The four tasks waited about as long as no worker ran (each at least the restart's part of it).
    assert worker.value("cairn_task_queue_wait_seconds_count") == 8
    assert worker.value("cairn_task_queue_wait_seconds_sum") - waits_before >= 4 * (waited_s - 1) * 0.5


def _serving(system: System, service: str) -> Scrape | None:
    try:
        return scrape(system, service)
    except (httpx.HTTPError, AssertionError):
        return None


def test_a_worker_killed_mid_shard_shows_as_one_lease_reclaim(observed: System, failed_job: str) -> None:
    def reclaims() -> float:
        return (scrape(observed, "scheduler").value("cairn_lease_reclaims_total") or 0) + (
            scrape(observed, "ingest_worker").value("cairn_lease_takeovers_total") or 0
        )

    before = reclaims()
    job_id = observed.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": 300, "fail_at_key": 150, "failure": "crash", "fail_times": 1},
            "batch_size": 50,
            "target_collection": "e2e_reclaimed",
        }
    )
    assert observed.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)["state"] == "SUCCESS"
    assert reclaims() == before + 1


# ------------------------------------------------------------------------------------ infra
def test_promtool_accepts_the_prometheus_config_and_alert_rules() -> None:
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ):
        result = subprocess.run(["promtool", *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} >= {"gateway", "scheduler", "ingest-worker", "dlq-handler"}
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./infra/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    expressions += [v["definition"] for v in dashboard["templating"]["list"]]
    return {name for expr in expressions for name in re.findall(r"\bcairn_[a-z0-9_]+", expr)}


def test_the_dashboard_is_valid_and_uses_only_metrics_the_services_serve(observed: System, failed_job: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    served = set().union(*(scrape(observed, service).names for service in SERVICES))

    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    datasource = yaml.safe_load((REPO_ROOT / "infra/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    graphs = [p for p in panels if p["type"] != "row"]
    for panel in graphs:
        assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
    used = dashboard_metric_names(dashboard)
    assert not used - served, f"the dashboard uses metrics no service serves: {sorted(used - served)}"
    # The panels cover every metric the issue names.
    for metric in (
        "cairn_queue_messages", "cairn_jobs", "cairn_shards", "cairn_records_processed_total", "cairn_batches_total",
        "cairn_shard_retries_total", "cairn_failures_total", "cairn_dead_letters_total", "cairn_lease_reclaims_total",
        "cairn_lease_takeovers_total", "cairn_publish_confirm_seconds_bucket", "cairn_task_queue_wait_seconds_bucket",
        "cairn_batch_duration_seconds_bucket", "cairn_shard_run_duration_seconds_bucket", "cairn_job_duration_seconds_bucket",
        "cairn_http_requests_total", "cairn_http_request_duration_seconds_bucket", "cairn_oldest_queued_shard_age_seconds",
    ):
        assert metric in used, f"no panel shows {metric}"
    quantile_panels = [p for p in graphs if any("histogram_quantile(0.95" in t["expr"] for t in p["targets"])]
    assert len(quantile_panels) >= 6

    alerts = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    alert_metrics = {
        name for group in alerts["groups"] for rule in group["rules"] for name in re.findall(r"\bcairn_[a-z0-9_]+", rule["expr"])
    }
    assert not alert_metrics - served, f"alerts use metrics no service serves: {sorted(alert_metrics - served)}"

    provider = yaml.safe_load((REPO_ROOT / "infra/grafana/provisioning/dashboards/cairn.yml").read_text())
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert f"./infra/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in compose["services"]["grafana"]["volumes"]
