"""Issue 16, the web console: real headless Chromium (Debian's `chromium`, driven by Playwright;
no browser is downloaded) against the real system of the e2e suite. A user loads the console,
enters a key, starts a job and watches its progress reach 100 %, replays a dead letter, and sees
the schedules' next runs and the workers' load.

Screenshots (1280x800 viewport, PNG) are test artifacts in the pytest tmp dir
(`console-screenshots/`, path printed), or in `$CAIRN_CONSOLE_SCREENSHOTS` when set: the
README's pictures in docs/console/ are made with
`CAIRN_CONSOLE_SCREENSHOTS=$PWD/docs/console uv run --no-sync pytest tests-e2e/test_console.py`.
"""

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from harness import System, dump

CHROMIUM = os.environ.get("CAIRN_CHROMIUM", "/usr/bin/chromium")
WAIT_MS = 120_000  # generous upper bound on every wait for the system (no timed assertion)
VIEWPORT = {"width": 1280, "height": 800}  # the screenshots' size: what a laptop shows, small PNGs


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `infra/local/services.sh --test-tools` installs Debian's chromium")
    with sync_playwright() as playwright:
        # --no-sandbox: the tests run as root in CI, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("CAIRN_CONSOLE_SCREENSHOTS")
    directory = Path(chosen) if chosen else tmp_path_factory.mktemp("console-screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def page(browser: Browser, system: System) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT, base_url=system.base_url)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.on("dialog", lambda dialog: dialog.accept())  # hx-confirm
    # Script errors and Content-Security-Policy refusals (the pages' CSP allows their own files
    # only). 4xx answers of fragments are expected: Chromium logs those too, so not every error.
    broken: list[str] = []
    page.on("pageerror", lambda error: broken.append(str(error)))
    page.on("console", lambda message: broken.append(message.text) if "Content Security Policy" in message.text else None)
    yield page
    assert not broken, broken
    # The key travels in the Authorization header only: never in a URL.
    secret = (system.token or "").rsplit("_", 1)[-1]
    assert secret and not [url for url in urls if secret in url], urls
    context.close()


def shoot(page: Page, directory: Path, name: str) -> None:
    """The visible viewport as `<directory>/console-<name>.png` (not the full page: a fixed size)."""
    page.screenshot(path=str(directory / f"console-{name}.png"))


def enter_key(page: Page, key: str) -> None:
    page.fill("#key-input", key)
    page.click("#key-use")
    expect(page.locator("#key-state")).to_have_text("key " + "_".join(key.split("_")[:2]))


def test_console_starts_a_job_and_shows_its_progress_to_100_percent(system: System, page: Page, screenshots: Path) -> None:
    page.goto("/console/")
    # No key yet: the jobs fragment says what the API answered (401), nothing else is shown.
    expect(page.locator("#jobs .problem")).to_contain_text("Enter an API key")
    enter_key(page, system.token or "")
    expect(page.locator("#jobs table.jobs")).to_be_visible()

    name = f"console e2e {uuid.uuid4().hex[:6]}"
    spec = {
        "pipeline": "synthetic",
        "name": name,
        "params": {"count": 2400, "delay_ms_per_record": 3},
        "sharding": {"strategy": "range", "shards": 4},
        "batch_size": 50,
        "target_collection": f"console_{uuid.uuid4().hex[:8]}",
    }
    page.fill("#spec", json.dumps(spec))
    page.click("#start-job")
    flash = page.locator("#start-flash .flash.ok")
    expect(flash).to_contain_text("started")
    job_id = flash.inner_text().split("job ", 1)[1].split()[0]

    # The list shows it (live), filtered by its name.
    page.fill("#job-filters input[name=q]", name)
    expect(page.locator(f"#jobs tr[data-job-id='{job_id}']")).to_be_visible()

    flash.locator("a").click()
    page.wait_for_url(f"**/console/jobs/{job_id}")
    expect(page.locator("table.shards tr[data-shard-key]")).to_have_count(4)
    # A shard has begun: (most often) the bars mid-run, the state colours and the plot live.
    page.locator("table.shards tr[data-state=RUNNING], table.shards tr[data-state=SUCCEEDED]").first.wait_for()
    expect(page.locator("#job-progress")).not_to_have_text("0.0 %")  # a batch committed: the bars have moved
    shoot(page, screenshots, "job-live")
    expect(page.locator("#job-summary")).to_have_attribute("data-state", "SUCCESS", timeout=WAIT_MS)
    expect(page.locator("#job-progress")).to_have_text("100.0 %")
    shard_rows = page.locator("table.shards tr[data-shard-key]")
    expect(shard_rows).to_have_count(4)
    for index in range(4):
        row = shard_rows.nth(index)
        expect(row).to_have_attribute("data-state", "SUCCEEDED")
        expect(row.locator(".bar .fill.st-SUCCEEDED")).to_have_attribute("style", "width: 100.0%")
    # The records/s plot drew a line from the shards' intervals.
    expect(page.locator("figure.plot svg polyline.line")).to_have_count(1)
    assert system.records(spec["target_collection"]).count_documents({}) == 2400
    shoot(page, screenshots, "job")

    # Company for the list: a job running, and one waiting for it (a workflow's `after`).
    with system.client() as client:
        slow = {"pipeline": "synthetic", "name": "nightly refresh", "params": {"count": 4000, "delay_ms_per_record": 4}, "sharding": {"shards": 4}, "batch_size": 100}
        running = client.post("/v1/jobs", json={**slow, "target_collection": f"console_{uuid.uuid4().hex[:8]}"}).json()["id"]
        follow = {"pipeline": "synthetic", "name": "report after refresh", "params": {"count": 100}, "after": [running]}
        waiting = client.post("/v1/jobs", json={**follow, "target_collection": f"console_{uuid.uuid4().hex[:8]}"}).json()["id"]
    page.goto("/console/")
    expect(page.locator(f"#jobs tr[data-job-id='{job_id}'] .badge")).to_have_text("SUCCESS")
    expect(page.locator(f"#jobs tr[data-job-id='{running}']")).to_be_visible()
    expect(page.locator(f"#jobs tr[data-job-id='{waiting}']")).to_be_visible()
    shoot(page, screenshots, "jobs")
    system.wait_for_state(waiting, {"SUCCESS"})  # the waiting job ran once the other one succeeded
    print(f"console screenshots: {screenshots}")


def test_console_replays_a_dead_letter(system: System, page: Page, screenshots: Path) -> None:
    source = f"console-down-{uuid.uuid4().hex[:8]}"
    job_id = system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": 200, "fail_at_key": 150, "failure": "non_retryable", "key_prefix": source},
            "batch_size": 50,
            "target_collection": "console_replay",
        }
    )
    system.wait_for_state(job_id, {"FAILURE"})

    page.goto(f"/console/dlq?job_id={job_id}")
    enter_key(page, system.token or "")
    expect(page.locator("#retries")).not_to_contain_text("Loading")  # the retries panel answered too
    row = page.locator("#dlq tr[data-entry-id]").first
    expect(row).to_have_attribute("data-status", "open")
    expect(row).to_contain_text("NonRetryableError")
    entry_id = row.get_attribute("data-entry-id")

    system.records("fixed_sources").insert_one({"_id": source})  # "fix the source" (flaky_source.py)
    row.locator("button.replay").click()
    expect(page.locator("#dlq-flash .flash.ok")).to_contain_text(f"replay of {entry_id} requested")
    # The list refreshes by itself until the replay has settled.
    settled = page.locator(f"#dlq tr[data-entry-id='{entry_id}']")
    expect(settled).to_have_attribute("data-status", "replayed", timeout=WAIT_MS)
    expect(settled).to_contain_text("succeeded")
    assert system.wait_for_state(job_id, {"SUCCESS"})["state"] == "SUCCESS"
    shoot(page, screenshots, "dlq")

    # A key without the admin scope sees why the dead letters are not shown (the API's 403).
    reader = system.create_key(scopes="read", name="console reader")
    enter_key(page, reader)
    expect(page.locator("#dlq .problem")).to_contain_text("may not see dead letters")
    with system.client() as client:
        entry = client.get(f"/dlq/entries/{entry_id}").json()
    assert entry["status"] == "replayed" and entry["replay"]["outcome"] == "succeeded", dump(entry)


def test_console_shows_schedules_with_their_next_runs_and_workers_with_their_load(system: System, page: Page, screenshots: Path) -> None:
    with system.client() as client:
        created = client.post(
            "/v1/schedules",
            json={
                "kind": "cron",
                "cron": "0 3 * * *",
                "name": f"console nightly {uuid.uuid4().hex[:6]}",
                "description": "shown by the console",
                "job": {"pipeline": "synthetic", "params": {"count": 10}, "target_collection": "console_schedule"},
            },
        )
        assert created.status_code == 201, created.text
        schedule = created.json()
        expected = client.get(f"/v1/schedules/{schedule['id']}/next", params={"n": 5}).json()["runs"]
    try:
        page.goto("/console/schedules")
        enter_key(page, system.token or "")
        row = page.locator(f"#schedules tr[data-schedule-id='{schedule['id']}']")
        runs = row.locator("td.runs div")
        expect(runs).to_have_count(5)
        assert runs.all_inner_texts() == [run[:19].replace("T", " ") for run in expected]
        expect(row.locator(".badge")).to_have_text("active")
        shoot(page, screenshots, "schedules")

        busy = system.start_job(
            {"pipeline": "synthetic", "name": "console load", "params": {"count": 4000, "delay_ms_per_record": 4}, "sharding": {"shards": 2},
             "batch_size": 100, "target_collection": f"console_{uuid.uuid4().hex[:8]}"}
        )
        page.goto("/console/workers")
        workers = page.locator("#workers tr[data-worker]")
        expect(workers.first).to_be_visible()
        expect(workers.first.locator(".bar")).to_be_visible()
        # The worker lists the leases it holds (refreshed every 5 s) while the job runs.
        expect(page.locator("#workers td.mono div", has_text=busy).first).to_be_visible()
        shoot(page, screenshots, "workers")
        system.wait_for_state(busy, {"SUCCESS"})
    finally:
        with system.client() as client:
            client.delete(f"/v1/schedules/{schedule['id']}")


def test_console_pages_work_without_a_browser_session_of_the_key(system: System) -> None:
    """The shells carry no data (no key needed); every fragment asks the API with the caller's key."""
    with system.client(auth=False) as anonymous, system.client() as admin:
        shell = anonymous.get("/console/")
        assert shell.status_code == 200 and "htmx" in shell.text and "console.js" in shell.text
        assert anonymous.get("/console/static/htmx-2.0.11.min.js").status_code == 200
        assert anonymous.get("/console/f/jobs").status_code == 401
        assert admin.get("/console/f/jobs").status_code == 200
        bad = admin.get("/console/f/jobs", params={"state": "NOPE"})
        assert bad.status_code == 422 and "state" in bad.text, bad.text
