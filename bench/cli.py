"""`python -m bench [scenario ...] [options]`: run benchmark scenarios and write the report.

Scenarios: ingest, checkpoints, submit, recovery, broker, profile, http_json; `all` (the default) runs
every one of them in that order and also refreshes the committed copy of the report
(bench/REPORT.md and bench/plots/). See bench/README.md.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.env import ROOT, PreflightFailed, check_gateway, machine_info, utc_stamp
from bench.scenarios import SCENARIOS
from bench.system import bench_context
from cairn_runtime.settings import ServiceSettings

logger = logging.getLogger("bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Cairn benchmarks: run against the servers `make up` starts; see bench/README.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("scenarios", nargs="*", default=["all"], metavar="SCENARIO",
                        help=f"all, or any of: {', '.join(SCENARIOS)}")
    parser.add_argument("--repeats", type=int, default=3, help="repeated runs of every measurement (median and range are reported)")
    parser.add_argument("--gateway-url", default="http://127.0.0.1:8000", help="the `make up` gateway, checked before anything runs")
    parser.add_argument("--skip-preflight", action="store_true", help="do not require the `make up` gateway to answer")
    parser.add_argument("--mongodb-uri", default=None, help="MongoDB server (default: MONGODB_URI, as the services read it)")
    parser.add_argument("--amqp-host", default="127.0.0.1:5672", help="RabbitMQ host:port (the bench makes its own vhost)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results directory")
    parser.add_argument("--publish", dest="publish", action="store_true", default=None,
                        help="copy the report to bench/REPORT.md and bench/plots/ (default: only when all scenarios ran)")
    parser.add_argument("--no-publish", dest="publish", action="store_false")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="before each measurement, wait up to this many seconds for other programs to leave the CPU idle")
    parser.add_argument("--settle-budget", type=float, default=60.0, help="total seconds the bench may spend waiting so")
    parser.add_argument("-v", "--verbose", action="store_true")
    for scenario in SCENARIOS.values():
        scenario.add_arguments(parser)
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if "all" in args.scenarios else args.scenarios
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from all, {', '.join(SCENARIOS)}")
    args.selected = names
    args.all = "all" in args.scenarios or set(names) == set(SCENARIOS)
    if args.publish is None:
        args.publish = args.all
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("pymongo", "amqp", "kombu", "httpx", "httpcore", "aiormq", "aio_pika", "celery", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    preflight: dict[str, Any] = {"skipped": True}
    if not args.skip_preflight:
        try:
            preflight = check_gateway(args.gateway_url)
        except PreflightFailed as error:
            sys.stderr.write(f"make bench: {error}\n")
            return 2
    mongodb_uri = args.mongodb_uri or ServiceSettings().mongodb_uri

    out_dir = args.out / utc_stamp()
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "started_at": utc_stamp(),
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine_info(),
        "preflight": preflight,
        "scenarios": {},
        "timings_s": {},
        "errors": {},
    }
    started = time.monotonic()
    with bench_context(out_dir, mongodb_uri, args.amqp_host, args.redis_url) as ctx:
        ctx.settle_s, ctx.settle_budget_s = args.settle, args.settle_budget
        result["servers"] = {
            "mongodb": ctx.mongo,
            "rabbitmq": ctx.rabbit,
            "isolation": {"database": ctx.database, "vhost": ctx.vhost, "redis_prefix": ctx.redis_prefix},
        }
        logger.info("MongoDB server: %s; broker: %s", ctx.mongo["label"], ctx.rabbit["label"])
        for name in args.selected:
            scenario = SCENARIOS[name]
            logger.info("=== scenario %s", name)
            t0 = time.monotonic()
            try:
                result["scenarios"][name] = scenario.run(ctx, args)
            except Exception as error:  # keep the other scenarios' figures
                logger.exception("scenario %s failed", name)
                result["errors"][name] = f"{type(error).__name__}: {error}"[:4000]
            finally:
                for proc in list(ctx.procs):
                    ctx.stop(proc)
            result["timings_s"][name] = round(time.monotonic() - t0, 1)
            logger.info("=== scenario %s took %.0f s", name, result["timings_s"][name])
            _write_json(out_dir / "result.json", result)
        result["settled_s"] = round(ctx.settled_s, 1)
    result["total_s"] = round(time.monotonic() - started, 1)
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    _write_json(out_dir / "result.json", result)

    report.write(result, out_dir)
    latest = args.out / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(out_dir.name)
    report.print_tables(result)
    sys.stdout.write(f"\nresults: {out_dir}/result.json\nreport:  {out_dir}/REPORT.md\n")
    if args.publish and not result["errors"]:
        _publish(out_dir)
        sys.stdout.write(f"published: {ROOT / 'bench' / 'REPORT.md'} and bench/plots/\n")
    return 1 if result["errors"] else 0


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=1, default=str) + "\n")


def _publish(out_dir: Path) -> None:
    """Keep a copy of the latest full report in the tree (bench/results/ is not committed)."""
    bench_dir = ROOT / "bench"
    shutil.copyfile(out_dir / "REPORT.md", bench_dir / "REPORT.md")
    plots = bench_dir / "plots"
    if plots.exists():
        shutil.rmtree(plots)
    shutil.copytree(out_dir / "plots", plots)
    shutil.copyfile(out_dir / "result.json", plots / "result.json")
