"""The web console (issue 16): server-rendered Jinja2 fragments refreshed by htmx, served by the
gateway under `/console`, built only from the gateway's public API (api.py). `install_console`
is all app.py calls."""

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from cairn_gateway.console.api import internal_client
from cairn_gateway.console.routes import router

STATIC = Path(__file__).parent / "static"


def install_console(app: FastAPI) -> None:
    """Mount the console on `app`: its routes, its static files (`/console/static`: htmx, the
    console's script and style) and the in-process client of the app's own API."""
    app.state.console_client = internal_client(app)
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
