"""What a result was measured on: the machine, the broker, the MongoDB server (stand-in or not)."""

import asyncio
import importlib.metadata
import logging
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aio_pika
import httpx
from pymongo import MongoClient
from pymongo.uri_parser import parse_uri

from bench.procs import cmdline, listening_pid

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


class PreflightFailed(Exception):
    """The system `make up` runs does not answer; the message says what to do."""


def check_gateway(url: str) -> dict[str, Any]:
    """The `make up` gateway must answer /healthz: the bench runs on the servers it set up."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/healthz", timeout=5)
    except httpx.HTTPError as error:
        raise PreflightFailed(
            f"the Cairn gateway does not answer at {url} ({error.__class__.__name__}).\n"
            "Start the system first:  make up   (then: make bench; stop with: make down)\n"
            "or, to run on the servers without it, pass --skip-preflight."
        ) from None
    if response.status_code != 200:
        raise PreflightFailed(f"{url}/healthz answered {response.status_code}: {response.text[:300]}\nIs the system healthy? (make up)")
    return {"url": url, "healthz": response.json()}


def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "git": _git_revision(),
        "packages": {name: _version(name) for name in ("pymongo", "celery", "kombu", "aio-pika", "fastapi", "uvicorn", "httpx")},
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_revision() -> dict[str, Any]:
    """Read-only look at the checkout the figures came from."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": rev or None, "dirty": dirty}


def mongo_server_info(uri: str) -> dict[str, Any]:
    """buildInfo, and whether the server is the nx-27017 stand-in.

    nx-27017 answers buildInfo as MongoDB 7.0.0, so the stand-in is recognised by the process
    that listens on the URI's port (its command line), with buildInfo's `process` field as a
    second sign.
    """
    client: MongoClient = MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        build = client.admin.command("buildInfo")
    finally:
        client.close()
    nodes = parse_uri(uri)["nodelist"]
    host, port = nodes[0] if nodes else ("127.0.0.1", 27017)
    pid = listening_pid(port) if host in LOOPBACK else None
    argv = cmdline(pid) if pid else []
    stand_in = any("nx-27017" in a or "nx_27017" in a for a in argv) or build.get("process") == "nx_27017"
    reported = build.get("version", "?")
    if stand_in:
        version = _version("nx-27017") or "?"
        label = f"nx-27017 {version} (stand-in; reports itself as MongoDB {reported})"
    else:
        version = reported
        label = f"MongoDB {reported}"
    return {
        "uri_host": f"{host}:{port}",
        "reported_version": reported,
        "stand_in": stand_in,
        "name": "nx-27017" if stand_in else "MongoDB",
        "version": version,
        "label": label,
        "pid": pid,
        "cmdline": argv,
    }


def rabbitmq_info(amqp_url: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any]:
        connection = await aio_pika.connect(amqp_url)
        try:
            props = connection.transport.connection.server_properties  # type: ignore[union-attr]
        finally:
            await connection.close()
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in props.items() if k in ("product", "version", "platform")}

    info = asyncio.run(probe())
    parsed = urlparse(amqp_url)
    port = parsed.port or 5672
    pid = listening_pid(port) if (parsed.hostname or "") in LOOPBACK else None
    return {**info, "label": f"{info.get('product', 'RabbitMQ')} {info.get('version', '?')}", "pid": pid, "port": port}


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
