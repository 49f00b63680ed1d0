"""The bench's outputs: tables on stdout, REPORT.md and PNG plots in the results directory."""

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.env import ROOT  # noqa: E402
from bench.scenarios import SCENARIOS  # noqa: E402

CAIRN_COLOR, BASE_COLOR = "#2b6cb0", "#c05621"
CPU_COLORS = {
    "stand_in": "#c53030", "mongodb": "#c53030", "workers": "#2b6cb0", "server": "#2b6cb0", "rabbitmq": "#dd6b20",
    "gateway": "#38a169", "scheduler": "#805ad5", "bench": "#718096", "other": "#d69e2e",
}
CONTENDED = 0.3  # cores used by other programs above which a run is flagged as contended
HOT_PATH_BEFORE = ROOT / "bench" / "profiles" / "hot-path-before.json"


# --- stdout --------------------------------------------------------------------------------------
def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def print_tables(result: dict[str, Any]) -> None:
    mongo = result.get("servers", {}).get("mongodb", {})
    sys.stdout.write(f"\nMongoDB server: {mongo.get('label', '?')}   broker: {result.get('servers', {}).get('rabbitmq', {}).get('label', '?')}\n")
    for name, data in result["scenarios"].items():
        headers, rows = SCENARIOS[name].table(data)
        sys.stdout.write(f"\n== {name}\n{format_table(headers, rows)}\n")
        if name == "scaling" and (idle := SCENARIOS[name].idle_line(data)) is not None:
            sys.stdout.write(f"{idle}\n")
    for name, error in result["errors"].items():
        sys.stdout.write(f"\n== {name}: FAILED: {error.splitlines()[0]}\n")


# --- REPORT.md -----------------------------------------------------------------------------------
def write(result: dict[str, Any], out_dir: Path) -> None:
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    sections = [_header(result)]
    renderers = {
        "ingest": _ingest, "scaling": _scaling, "checkpoints": _checkpoints, "submit": _submit,
        "recovery": _recovery, "broker": _broker, "profile": _profile, "http_json": _http_json,
    }
    for name, render in renderers.items():
        if name in result["scenarios"]:
            sections.append(render(result["scenarios"][name], plots, result))
        elif name in result["errors"]:
            sections.append(f"## {name}\n\nFAILED: `{result['errors'][name][:1000]}`\n")
    sections.append(_method(result))
    (out_dir / "REPORT.md").write_text("\n".join(sections))


def _header(result: dict[str, Any]) -> str:
    m, servers = result["machine"], result.get("servers", {})
    mongo, rabbit = servers.get("mongodb", {}), servers.get("rabbitmq", {})
    git = m.get("git", {})
    lines = [
        "# Cairn benchmark report",
        "",
        f"Run {result['started_at']} · commit `{git.get('commit')}`{' (uncommitted changes)' if git.get('dirty') else ''}"
        f" · {result.get('total_s', 0):.0f} s · `python -m bench {' '.join(result.get('argv') or [])}`".rstrip(),
        "",
    ]
    if mongo.get("stand_in"):
        lines += [
            f"> **MongoDB server: {mongo['label']}.** nx-27017 is a MongoDB wire-protocol server in Python over SQLite,",
            "> single-threaded, roughly an order of magnitude slower than MongoDB. Every figure bound by the store",
            "> measures the stand-in, not MongoDB; each scenario says how much of its time the stand-in took.",
            "",
        ]
    lines += [
        "| machine | |",
        "| --- | --- |",
        f"| host | {m['hostname']} · {m['os']} |",
        f"| CPU | {m['cpu_model']} · **{m['cpu_count']} cores** · {m['memory_gib']} GiB |",
        f"| Python | {m['python']} · pymongo {m['packages'].get('pymongo')} · Celery {m['packages'].get('celery')} · aio-pika {m['packages'].get('aio-pika')} |",
        f"| broker | {rabbit.get('label', '?')} (127.0.0.1, vhost of its own) |",
        f"| MongoDB server | {mongo.get('label', '?')} at {mongo.get('uri_host', '?')} (buildInfo: {mongo.get('reported_version', '?')}) |",
        f"| load average | {m['load_avg']} at start, {m.get('load_avg_end', '?')} at the end |",
        f"| other programs | {_contention(result)} |",
        "",
        "Every figure is the **median** of the repeated runs with its **range (min–max)** in parentheses.",
        "",
    ]
    headlines = _headlines(result)
    if headlines:
        lines += ["## Headline figures", "", *[f"- {h}" for h in headlines], ""]
    return "\n".join(lines)


def _all_runs(result: dict[str, Any]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "cpu" in node and isinstance(node["cpu"], dict) and "wall" in node["cpu"]:
                runs.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(result["scenarios"])
    return runs


def _contention(result: dict[str, Any]) -> str:
    runs = [r for r in _all_runs(result) if r["cpu"]["wall"] > 0]
    if not runs:
        return "n/a"
    shares = [r["cpu"]["other"] / r["cpu"]["wall"] for r in runs]
    contended = sum(1 for s in shares if s > CONTENDED)
    average = sum(shares) / len(shares)
    text = f"used {average:.2f} cores on average during the measurements"
    if contended:
        text += f"; **{contended} of {len(runs)} runs were contended** (> {CONTENDED} cores taken by other programs, e.g. test runs)"
    return text


def _headlines(result: dict[str, Any]) -> list[str]:
    s = result["scenarios"]
    server = result.get("servers", {}).get("mongodb", {}).get("name", "?")
    out = []
    if "ingest" in s:
        i = s["ingest"]
        two = i["cairn"].get("2")
        if two:
            base = i["baseline"].get("2")
            out.append(
                f"Ingest, 2 worker processes: **{two['records_per_s']['median']:,.0f} records/s** end to end "
                f"({i['params']['records']:,} × {i['params']['record_size']:,} B on {server})"
                + (f" vs **{base['records_per_s']['median']:,.0f}/s** for one Celery task per record: **{i['ratio'].get('2')}×**" if base else "")
            )
            peer = i.get("chunks", {}).get("2")
            if peer:
                out.append(
                    f"Against the Celery-chunk peer (one task per 1,000 records, insert_many), 2 workers: "
                    f"**{i['ratio_chunks'].get('2')}×** ({peer['records_per_s']['median']:,.0f} records/s); against the store's "
                    f"two-client insert_many limit ({i['store_limit']['records_per_s']['median']:,.0f}/s): **{i['ratio_store_limit'].get('2')}×**"
                )
    if "scaling" in s:
        plans = s["scaling"]["plans"]
        out.append(
            "Per-shard cost: " + ", ".join(
                f"{name} {e['seconds']['median']:.0f} s ({e['time_ratio']}×), status p99 {(e['status_p99_ms'] or {}).get('median') or 0:.0f} ms"
                for name, e in plans.items()
            )
        )
    if "checkpoints" in s:
        c = s["checkpoints"]
        c["recommended_batch_size"] = SCENARIOS["checkpoints"].recommend(c["sizes"], c["params"]["records"])
        out.append(
            f"Checkpoint every batch: **{c['default_overhead_pct']:+.1f}%** time at the default batch size {c['default_batch_size']:,}; "
            f"recommended batch size: **{c['recommended_batch_size']:,}**" if c.get("default_overhead_pct") is not None and c.get("recommended_batch_size")
            else "Checkpoint overhead: see below"
        )
    if "submit" in s:
        h = SCENARIOS["submit"].headline(s["submit"])
        out.append(
            f"Submit: **{h['cairn_rps']:,.0f} requests/s** at {h['clients']} clients, p99 {h['cairn_p99_ms']:.0f} ms "
            f"(publish-only, unconfirmed baseline: {h['baseline_rps']:,.0f}/s)"
        )
    if "recovery" in s:
        parts = [f"TTL {v['ttl_s']:g} s → {v['progress_s']['median']:.1f} s" for v in s["recovery"]["settings"].values()]
        out.append("Recovery after SIGKILL (progress again on another worker): " + ", ".join(parts))
    if "broker" in s:
        paths = s["broker"]["paths"]
        limit = paths["broker_limit"]["messages_per_s"]["median"]
        cairn = {k: v["messages_per_s"]["median"] for k, v in paths.items() if k != "broker_limit"}
        out.append(
            "Broker: " + ", ".join(f"{v:,.0f} commands/s confirmed with {k.split('_')[1]} in flight" for k, v in cairn.items())
            + f"; minimal unconfirmed pair {limit:,.0f} msg/s"
            + (f" (bound by its one Python process; RabbitMQ itself at {_cores(paths['broker_limit'], 'rabbitmq'):.2f} cores)"
               if _cores(paths["broker_limit"], "bench") > 0.9 else "")
        )
    if "profile" in s:
        p = s["profile"]
        out.append(f"Hot path: {p['mongo_share_pct']}% of a worker's task time is spent in MongoDB commands ({server})")
    return out


def _cores(node: dict[str, Any], key: str) -> float:
    runs = node.get("runs", [])
    wall = sum(r["cpu"]["wall"] for r in runs) or 1
    return sum(r["cpu"].get(key, 0) for r in runs) / wall


def _ingest(data: dict[str, Any], plots: Path, result: dict[str, Any]) -> str:
    p = data["params"]
    headers, rows = SCENARIOS["ingest"].table(data)
    workers = list(data["cairn"])
    _bars(
        plots / "ingest-throughput.png", workers,
        {"Cairn (shards, batches, insert_many)": [data["cairn"][w]["records_per_s"] for w in workers],
         "Celery-chunk peer (1,000 records a task, insert_many)": [data.get("chunks", {}).get(w, {}).get("records_per_s") for w in workers],
         "one Celery task per record": [data["baseline"].get(w, {}).get("records_per_s") for w in workers]},
        "worker processes", "records/s (end to end)", f"Ingest throughput ({p['record_size']:,} B records)",
    )
    configs = {f"Cairn {w}": data["cairn"][w]["cpu_cores"] for w in workers}
    configs.update({f"baseline {w}": data["baseline"][w]["cpu_cores"] for w in data["baseline"]})
    _cpu_plot(plots / "ingest-cpu.png", configs, "Where the 2 cores went during the ingest runs")
    two, base2 = data["cairn"].get("2"), data["baseline"].get("2")
    ratio = data["ratio"].get("2")
    lines = [
        "## 1. Ingest throughput",
        "",
        f"A synthetic job of **{p['records']:,} records × {p['record_size']:,} B** in {p['shards']} range shards, batch size "
        f"{p['batch_size']:,}, submitted through the gateway; the clock runs from `POST /task/start` until the job is "
        f"`SUCCESS`. Main baseline: the Celery-chunk peer (`bench/baseline/celery_chunks.py`: one task per 1,000 "
        f"records building and storing them with one unordered `insert_many`, acks_late, same worker processes), the "
        f"same {p['records']:,} records. Second line: one Celery task per record (`delay()` per record, `insert_one`), "
        f"{p['baseline_records']:,} records per run. The store's limit: two client processes doing nothing but "
        f"`insert_many` of 1,000 of the same records. Same store for all. {p['repeats']} runs each.",
        "",
        markdown_table(headers, rows),
        "",
        "![ingest throughput](plots/ingest-throughput.png)",
        "",
    ]
    if two and base2 and ratio is not None:
        verdict = "**met**" if ratio >= 10 else "**not met**"
        lines += [f"Acceptance (2 workers ≥ 10× one task per record): {verdict}, {ratio}×.", ""]
    peer_ratio, limit_ratio = data.get("ratio_chunks", {}).get("2"), data.get("ratio_store_limit", {}).get("2")
    if peer_ratio is not None and limit_ratio is not None:
        lines += [
            f"Issue 14's goals, 2 workers: ≥ 1.0× the Celery-chunk peer: {'**met**' if peer_ratio >= 1.0 else '**not met**'}, "
            f"{peer_ratio}×; ≥ 0.9× the store's two-client insert_many limit: {'**met**' if limit_ratio >= 0.9 else '**not met**'}, "
            f"{limit_ratio}×.",
            "",
        ]
    lines += _bound_text(data)
    lines += ["", "![cpu during ingest](plots/ingest-cpu.png)", ""]
    fixed = [
        (w, c.get("to_first_claim_s") or {}, c.get("last_shard_to_seen_s") or {}) for w, c in data["cairn"].items()
    ]
    fixed = [(w, a, b) for w, a, b in fixed if a.get("median") is not None and b.get("median") is not None]
    if fixed:
        lines += [
            "Fixed costs of a job around the work (server timestamps): "
            + "; ".join(f"{w} worker(s): POST → first shard claimed {a['median'] * 1000:.0f} ms, last shard done → SUCCESS "
                        f"seen {b['median'] * 1000:.0f} ms" for w, a, b in fixed)
            + " (the bench polls the job every 50 ms).",
            "",
        ]
    if p["records"] < 1_000_000:
        lines += [
            f"The issue's job is 1,000,000 × 1 KB; the default run uses {p['records']:,} records so that the whole suite "
            "fits in 10 minutes on the stand-in (1,000,000 records take over a minute per run at the rates above). "
            "Beyond the fixed costs above, the time grows linearly with the records. Full size: "
            "`python -m bench ingest --records 1000000 --record-size 1024`.",
            "",
        ]
    return "\n".join(lines)


def _scaling(data: dict[str, Any], plots: Path, result: dict[str, Any]) -> str:
    p = data["params"]
    headers, rows = SCENARIOS["scaling"].table(data)
    names = list(data["plans"])
    _bars(
        plots / "scaling-time.png", names, {"seconds (job)": [data["plans"][n]["seconds"] for n in names]},
        "plan", "seconds, POST → SUCCESS", f"The same {p['records']:,}-record job cut into more shards",
    )
    lines = [
        "## Per-shard cost (issue 14)",
        "",
        f"The same synthetic job of **{p['records']:,} × {p['record_size']:,} B records**, {p['workers']} worker processes, "
        f"batch size {p['batch_size']:,}, cut into each plan below; meanwhile one client calls `GET /task/status` back to "
        "back. `× the first`: time relative to the first plan (the issue's goals: 1,024 range shards within 1.3×, "
        "4,096 lease-frontier items within 1.5×; status p99 under 50 ms; all shards queued in under 2 s). "
        "`other programs`: cores used meanwhile by programs outside the bench (other engineers' tests on a shared machine).",
        "",
        markdown_table(headers, rows),
        "",
        "![scaling](plots/scaling-time.png)",
        "",
    ]
    if (counted := SCENARIOS["scaling"].counts_table(data)) is not None:
        lines += [
            "What each shard cost, counted (services run through `bench.counted`: pymongo command monitoring, "
            "kombu and aio-pika publishes, Celery task deliveries), per shard or work item, from the POST until "
            "SUCCESS was seen; the gateway's share is the status client's calls:",
            "",
            markdown_table(*counted),
            "",
        ]
    if (idle := SCENARIOS["scaling"].idle_line(data)) is not None:
        lines += [idle + ".", ""]
    return "\n".join(lines)


def _bound_text(data: dict[str, Any]) -> list[str]:
    out = []
    for w, cairn in data["cairn"].items():
        cores = cairn["cpu_cores"]
        runs = cairn["runs"]
        key = "stand_in" if "stand_in" in cores else "mongodb" if "mongodb" in cores else None
        if key is None:
            continue
        cpu_s = sum(r["cpu"][key] for r in runs)
        records = sum(r["records"] for r in runs)
        per_record_us = cpu_s / records * 1e6 if records else 0
        ceiling = 1e6 / per_record_us if per_record_us else 0
        out.append(
            f"- {w} worker(s): the MongoDB server was busy {cores[key]:.2f} cores on average ({per_record_us:.0f} µs of its CPU per record: "
            f"at most ~{ceiling:,.0f} records/s from one saturated core); workers {cores.get('workers', 0):.2f}, RabbitMQ "
            f"{cores.get('rabbitmq', 0):.2f}, other programs {cores.get('other', 0):.2f} cores."
        )
    for w, base in data["baseline"].items():
        key = "stand_in" if "stand_in" in base["cpu_cores"] else "mongodb" if "mongodb" in base["cpu_cores"] else None
        if key is None:
            continue
        records = sum(r["records"] for r in base["runs"])
        per_record_us = sum(r["cpu"][key] for r in base["runs"]) / records * 1e6 if records else 0
        out.append(
            f"- baseline, {w} worker(s): MongoDB server {base['cpu_cores'][key]:.2f} cores ({per_record_us:.0f} µs per record, one "
            f"`insert_one` each), workers {base['cpu_cores'].get('workers', 0):.2f}, RabbitMQ {base['cpu_cores'].get('rabbitmq', 0):.2f}, "
            f"producer (bench) {base['cpu_cores'].get('bench', 0):.2f}, other programs {base['cpu_cores'].get('other', 0):.2f} cores."
        )
    if out:
        out.insert(0, "What bounds it (CPU from /proc during the runs; the stand-in is single-threaded, so 1.0 core is its limit):")
        out.insert(1, "")
    return out


def _checkpoints(data: dict[str, Any], plots: Path, result: dict[str, Any]) -> str:
    p = data["params"]
    headers, rows = SCENARIOS["checkpoints"].table(data)
    sizes = list(data["sizes"])
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [int(s) for s in sizes]
    for mode, color, label in (("on", CAIRN_COLOR, "checkpoint every batch (production)"), ("off", BASE_COLOR, "checkpoint only at the end (bench switch)")):
        med = [data["sizes"][s][mode]["records_per_s"]["median"] for s in sizes]
        lo = [m - data["sizes"][s][mode]["records_per_s"]["min"] for s, m in zip(sizes, med, strict=False)]
        hi = [data["sizes"][s][mode]["records_per_s"]["max"] - m for s, m in zip(sizes, med, strict=False)]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, color=color, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("batch size (records per insert_many and per checkpoint)")
    ax.set_ylabel("records/s")
    ax2 = ax.twinx()
    store = [SCENARIOS["checkpoints"].store_overhead_pct(data["sizes"][s]) for s in sizes]
    ax2.bar([x * 0.87 for x in xs], [data["sizes"][s]["overhead_pct"] for s in sizes], width=[x * 0.2 for x in xs],
            alpha=0.25, color="#444", label="overhead, time")
    if all(v is not None for v in store):
        ax2.bar([x * 1.13 for x in xs], store, width=[x * 0.2 for x in xs], alpha=0.45, color="#c53030", label="overhead, store CPU")
    ax2.axhline(10, color="#c53030", lw=0.8, ls="--")
    ax2.axhline(0, color="#444", lw=0.5)
    ax2.set_ylabel("overhead % (bars; dashed: 10%)")
    ax2.legend(loc="upper left", fontsize=7)
    ax.set_title("Checkpoint overhead by batch size")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    fig.tight_layout()
    fig.savefig(plots / "checkpoint-overhead.png", dpi=110)
    plt.close(fig)
    default = data["default_batch_size"]
    rec = data["recommended_batch_size"] = SCENARIOS["checkpoints"].recommend(data["sizes"], p["records"])
    overhead = data.get("default_overhead_pct")
    store = SCENARIOS["checkpoints"].store_overhead_pct(data["sizes"][str(default)]) if str(default) in data["sizes"] else None
    lines = [
        "## 2. Checkpoint and dedup overhead",
        "",
        f"The same job ({p['records']:,} × {p['record_size']:,} B, {p['workers']} worker processes, {p['shards']} shards) with a "
        "checkpoint after every batch (production) and without (the benchmark-only worker `python -m bench.uncheckpointed_worker`: "
        "only a shard's last batch writes its checkpoint). Dedup is the records' unique `_id`, paid by the same `insert_many` in "
        "both modes. Overhead = median with / median without − 1, in wall time and in the MongoDB server's CPU time (what the "
        "checkpoint writes cost the store; robust to other programs on the machine). At a few percent the time overhead is "
        "within the runs' spread: read small values as \"not measurable\".",
        "",
        markdown_table(headers, rows),
        "",
        "![checkpoint overhead](plots/checkpoint-overhead.png)",
        "",
    ]
    if overhead is not None:
        verdict = "**met**" if overhead < 10 and (store is None or store < 10) else "**not met**"
        lines.append(
            f"Acceptance (overhead < 10% at the default batch size {default:,}): {verdict}: {overhead:+.1f}% in time"
            + (f", {store:+.1f}% in the store's CPU." if store is not None else ".")
        )
    if rec:
        lines.append(
            f"Recommended default batch size: **{rec:,}** — the smallest batch whose store cost per record is within 5% of the "
            "best measured, with overhead under 10% (smaller batches redo less after a crash and hold less in memory)."
            + (" It is the current default." if rec == default else f" The current default is {default:,}.")
        )
    return "\n".join(lines) + "\n"


def _submit(data: dict[str, Any], plots: Path, result: dict[str, Any]) -> str:
    p = data["params"]
    headers, rows = SCENARIOS["submit"].table(data)
    clients = list(data["cairn"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    _bar_axes(ax1, clients, {"Cairn (MongoDB insert + confirmed publish)": [data["cairn"][c]["rps"] for c in clients],
                             "baseline (publish only, no confirm)": [data["baseline"][c]["rps"] for c in clients]})
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("requests/s")
    ax1.set_title("POST /task/start throughput")
    width = 0.13
    for i, (variant, color) in enumerate((("cairn", CAIRN_COLOR), ("baseline", BASE_COLOR))):
        for j, (pct, alpha) in enumerate((("p50_ms", 1.0), ("p95_ms", 0.65), ("p99_ms", 0.35))):
            xs = [k + (i * 3 + j - 2.5) * width for k in range(len(clients))]
            ax2.bar(xs, [data[variant][c][pct]["median"] for c in clients], width, color=color, alpha=alpha,
                    label=f"{variant} {pct.split('_')[0]}")
    ax2.set_xticks(range(len(clients)), clients)
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("latency ms (log)")
    ax2.set_title("latency p50 / p95 / p99")
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(plots / "submit.png", dpi=110)
    plt.close(fig)
    cpu_lines = []
    for variant in ("cairn", "baseline"):
        top = clients[-1]
        runs = data[variant][top]["runs"]
        wall = sum(r["cpu"]["wall"] for r in runs) or 1
        share = {k: sum(r["cpu"].get(k, 0) for r in runs) / wall for k in ("server", "stand_in", "mongodb", "rabbitmq", "bench", "other")}
        store = share["stand_in"] or share["mongodb"]
        cpu_lines.append(
            f"- {variant} at {top} clients: server process {share['server']:.2f} cores, MongoDB server {store:.2f}, "
            f"RabbitMQ {share['rabbitmq']:.2f}, load generator (bench) {share['bench']:.2f}, other programs {share['other']:.2f}."
        )
    return "\n".join([
        "## 3. Submit path",
        "",
        f"`POST /task/start` of a tiny job, closed loop, {p['requests']:,} requests per measurement after a warm-up, from an httpx "
        "async client in the bench process. Cairn: the production gateway (MongoDB insert, publish with confirm, "
        "`command_published_at` update); no scheduler runs, so commands queue in the bench vhost and are purged afterwards. "
        "Baseline: the same app with a submit that only publishes, unconfirmed, and writes nothing (bench/baseline/submit_app.py).",
        "",
        markdown_table(headers, rows),
        "",
        "![submit](plots/submit.png)",
        "",
        "CPU during the highest concurrency (one uvicorn process serves each variant; the load generator shares the 2 cores):",
        "",
        *cpu_lines,
        "",
    ])


def _recovery(data: dict[str, Any], plots: Path, result: dict[str, Any]) -> str:
    p = data["params"]
    headers, rows = SCENARIOS["recovery"].table(data)
    settings = list(data["settings"].values())
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"TTL {s['ttl_s']:g}s\nHB {s['heartbeat_s']:g}s" for s in settings]
    _bar_axes(ax, labels, {"taken over": [s["takeover_s"] for s in settings], "progress again": [s["progress_s"] for s in settings]})
    ax.plot(range(len(settings)), [s["ttl_s"] for s in settings], "k--", lw=0.8, label="lease TTL")
    ax.set_ylabel("seconds after SIGKILL")
    ax.set_title("Recovery of a shard after SIGKILL of its worker")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / "recovery.png", dpi=110)
    plt.close(fig)
    return "\n".join([
        "## 4. Recovery",
        "",
        f"Ingest workers (one process each, one per repeat plus one) with the lease settings below; a one-shard job (batch {p['batch_size']}, "
        f"{p['delay_ms_per_record']} ms of simulated work per record); once 3 batches are checkpointed the worker holding the "
        "lease is SIGKILLed with its process group. Measured from the kill: *taken over* (the shard's fencing token moved), "
        "*progress again* (its checkpoint moved under the new token), and the records of the batch in flight that were "
        "stored already and so redone (at most one batch; duplicates are counted, not written twice). "
        "The scheduler runs with its default settings, as `make up` runs it.",
        "",
        markdown_table(headers, rows),
        "",
        "![recovery](plots/recovery.png)",
        "",
        "The time is the lease TTL (a dead worker's lease must expire before anyone may take the shard) plus the delay "
        "until something retries the claim (the redelivered task's retry countdown of TTL + 1 s, or the scheduler's lease "
        "reaper at its interval). The heartbeat interval does not shorten it; it only bounds how stale a live lease may get. "
        "Not bound by MongoDB.",
        "",
    ])


def _broker(data: dict[str, Any], plots: Path, result: dict[str, Any]) -> str:
    p = data["params"]
    headers, rows = SCENARIOS["broker"].table(data)
    paths = data["paths"]
    names = list(paths)
    labels = ["broker limit" if n == "broker_limit" else f"Cairn, {n.split('_')[1]} in flight" for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    _bar_axes(ax, labels, {"end to end (publish → consume → ack)": [paths[n]["messages_per_s"] for n in names],
                           "publish only": [paths[n]["publish_per_s"] for n in names]})
    ax.set_ylabel("messages/s")
    ax.set_title(f"Command messages through RabbitMQ ({p['body_bytes']} B bodies)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / "broker.png", dpi=110)
    plt.close(fig)
    cpu_lines = []
    for name, label in zip(names, labels, strict=False):
        runs = paths[name]["runs"]
        wall = sum(r["cpu"]["wall"] for r in runs) or 1
        share = {k: sum(r["cpu"].get(k, 0) for r in runs) / wall for k in ("rabbitmq", "bench", "other")}
        cpu_lines.append(f"- {label}: RabbitMQ {share['rabbitmq']:.2f} cores, the client (bench process: publisher and consumer) "
                         f"{share['bench']:.2f}, other programs {share['other']:.2f}.")
    return "\n".join([
        "## 5. Broker path",
        "",
        f"StartJob commands ({p['body_bytes']} B) through Cairn's publisher (persistent, mandatory, publisher confirm awaited) "
        f"to `cairn.commands` → `cairn.scheduler.commands` (durable, priorities, dead-letter exchange), consumed with aio-pika, "
        f"decoded and acked one by one (prefetch {p['prefetch']}), {p['messages']:,} messages per run. Broker limit: a minimal "
        f"pair on the same broker, no confirms, transient messages, auto-ack, {p['limit_messages']:,} messages. No MongoDB.",
        "",
        markdown_table(headers, rows),
        "",
        "![broker](plots/broker.png)",
        "",
        "CPU during the runs. A client process near 1.0 core is bound by Python (one core per process), not by the broker:",
        "",
        *cpu_lines,
        "",
    ])


def _http_json(data: dict[str, Any], plots: Path, result: dict[str, Any]) -> str:
    p = data["params"]
    headers, rows = SCENARIOS["http_json"].table(data)
    return "\n".join([
        "## 6. http_json: a paged JSON API into the store",
        "",
        f"{p['records']:,} records in {p['pages']:,} pages of {p['page_size']} from the local paged test API "
        f"(`cairn_testkit.paged_server`, its own process, page-number paging, no faults). Cairn: an `http_json` job in "
        f"{p['shards']} page-range shards, {p['batch_pages']} pages a batch (one checkpoint each), write mode insert, "
        "POST to SUCCESS. Baseline: one plain loop in the bench process, `httpx` GET page after page and `insert_many` "
        "of its records into the same store (no checkpoint, retry, rate limit or resume).",
        "",
        markdown_table(headers, rows),
        "",
    ])


def _profile(data: dict[str, Any], plots: Path, result: dict[str, Any]) -> str:
    p = data["params"]
    headers, rows = SCENARIOS["profile"].table(data)
    areas = data["areas"]
    total = sum(areas.values()) or 1
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(areas)[:8][::-1]
    ax.barh(names, [areas[n] / total * 100 for n in names], color=CAIRN_COLOR)
    ax.set_xlabel("% of the profiled task time")
    ax.set_title("Ingest worker hot path by code area (pyinstrument)")
    fig.tight_layout()
    fig.savefig(plots / "hot-path.png", dpi=110)
    plt.close(fig)
    lines = [
        "## Hot path of scenario 1 (profile)",
        "",
        f"One ingest worker process (production Celery app, solo pool) under pyinstrument, with a pymongo CommandListener, runs "
        f"a {p['records']:,} × {p['record_size']:,} B job (batch {p['batch_size']:,}). Full profile: `profile/profile.html` in the "
        "results directory.",
        "",
        markdown_table(headers, rows),
        "",
        "![hot path](plots/hot-path.png)",
        "",
    ]
    if HOT_PATH_BEFORE.exists():
        before = json.loads(HOT_PATH_BEFORE.read_text())
        lines += _before_after(before, data)
    lines += ["<details><summary>profile excerpt</summary>", "", "```", data["profile_excerpt"], "```", "", "</details>", ""]
    return "\n".join(lines)


def _before_after(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    lines = ["### Before and after the hot-path change", "", before.get("note", ""), ""]
    ab = after.get("checkpoint_filter_ab")
    if ab:
        p = ab["params"]
        rows = []
        med = {}
        for mode, label in (("shard_key+sub_key", "before: by (shard_key, sub_key)"), ("_id", "after: by `_id`")):
            runs = ab["results"][mode]
            med[mode] = {k: statistics.median([r[k] for r in runs if r[k] is not None] or [0]) for k in ("checkpoint_ms", "server_cpu_s", "wall_s")}
            rows.append([label, f"{med[mode]['checkpoint_ms']:.2f} ms", f"{med[mode]['server_cpu_s']:.3f} s", f"{med[mode]['wall_s']:.3f} s"])
        def change(key: str) -> str:
            a, b = med["shard_key+sub_key"][key], med["_id"][key]
            return f"{(b / a - 1) * 100:+.0f}%" if a else "-"
        rows.append(["change", change("checkpoint_ms"), change("server_cpu_s"), change("wall_s")])
        lines += [
            f"Measured in this run, A/B in the same conditions (alternating, median of {p['repeats']}): {p['batches']} cycles of "
            f"`insert_many` of {p['batch']} × 1 KB records + the fenced checkpoint write, with {p['history']:,} other checkpoints "
            "in the collection (`bench/profiles/checkpoint_filter_ab.py`):",
            "",
            markdown_table(["checkpoint write matched", "per write", "MongoDB server CPU", "wall"], rows),
            "",
        ]
    lines += [
        markdown_table(
            ["profile (batch 1,000)", f"before ({before.get('measured', '?')})", "after (this run)"],
            [
                ["worker records/s (1 process)", f"{before['records_per_s']:,.0f}", f"{after['records_per_s']:,.0f}"],
                ["MongoDB server CPU per record", _per_record_us(before), _per_record_us(after)],
                ["share of task time in MongoDB", f"{before['mongo_share_pct']}%", f"{after['mongo_share_pct']}%"],
            ],
        ),
        "",
        "(The two profiles ran at different times with different loads from other programs; at batch 1,000 the checkpoint "
        "write is a few percent of the store's work either way, so the A/B above is the comparison to read.)",
        "",
    ]
    return lines


def _per_record_us(profile: dict[str, Any]) -> str:
    cpu = profile.get("cpu", {})
    key = "stand_in" if "stand_in" in cpu else "mongodb" if "mongodb" in cpu else None
    if key is None:
        return "-"
    return f"{cpu[key] / profile['params']['records'] * 1e6:.0f} µs"


def _method(result: dict[str, Any]) -> str:
    iso = result.get("servers", {}).get("isolation", {})
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in result.get("timings_s", {}).items())
    return "\n".join([
        "## How this was measured, and how to reproduce it",
        "",
        "```sh",
        "make up       # RabbitMQ, Redis, MongoDB (nx-27017 unless MONGODB_URI is set) and the four services",
        "make bench    # every scenario with the defaults (< 10 min on 2 cores); or, e.g.:",
        "uv run --no-sync python -m bench ingest --records 1000000 --workers 2 --repeats 3",
        "uv run --no-sync python -m bench --help",
        "```",
        "",
        "- The bench checks that the `make up` gateway answers, then starts its **own** Cairn processes from the same "
        "virtualenv and entry points, on the same RabbitMQ, Redis and MongoDB server, isolated in "
        f"database `{iso.get('database', 'cairn_bench_<run>')}`, vhost `{iso.get('vhost', 'cairn-bench-<run>')}` and "
        "Redis prefix of their own, all removed afterwards (it needs its own processes to vary worker counts and settings).",
        "- CPU per process group comes from /proc; \"other programs\" is what the rest of the machine used meanwhile. "
        "Runs with more than 0.3 cores taken by other programs are contended and their figures low.",
        "- Each configuration is measured `--repeats` times (default 3); on/off and Cairn/baseline alternate between repeats.",
        f"- Duration per scenario: {timings}.",
        "- Raw figures: `result.json` next to this report. Design and caveats: [bench/README.md](README.md).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.report RESULT_DIR`: render REPORT.md and the plots again from result.json."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m bench.report bench/results/<time>\n")
        return 2
    out_dir = Path(args[0])
    result = json.loads((out_dir / "result.json").read_text())
    write(result, out_dir)
    print_tables(result)
    return 0


# --- plot helpers --------------------------------------------------------------------------------
def _bar_axes(ax: Any, labels: list[str], series: dict[str, list[dict[str, Any] | None]]) -> None:
    width = 0.8 / max(1, len(series))
    colors = [CAIRN_COLOR, BASE_COLOR, "#38a169", "#805ad5"]
    for i, (name, values) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(labels))]
        med = [v["median"] if v else 0 for v in values]
        lo = [(v["median"] - v["min"]) if v else 0 for v in values]
        hi = [(v["max"] - v["median"]) if v else 0 for v in values]
        bars = ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, color=colors[i % len(colors)], label=name)
        for bar, m in zip(bars, med, strict=False):
            if m:
                ax.annotate(f"{m:,.0f}" if m >= 10 else f"{m:.2f}", (bar.get_x() + bar.get_width() / 2, m),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(labels)), labels)


def _bars(path: Path, labels: list[str], series: dict[str, list[dict[str, Any] | None]], xlabel: str, ylabel: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    _bar_axes(ax, labels, series)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_plot(path: Path, configs: dict[str, dict[str, float]], title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    keys = [k for k in CPU_COLORS if any(k in c for c in configs.values())]
    bottoms = [0.0] * len(configs)
    for key in keys:
        values = [c.get(key, 0.0) for c in configs.values()]
        ax.bar(list(configs), values, bottom=bottoms, color=CPU_COLORS[key], label=key.replace("_", "-"))
        bottoms = [b + v for b, v in zip(bottoms, values, strict=False)]
    ax.axhline(2.0, color="black", lw=0.8, ls=":")
    ax.set_ylabel("cores busy (of 2)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
