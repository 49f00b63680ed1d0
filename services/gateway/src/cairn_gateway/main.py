"""`cairn-gateway`: serve the HTTP API with uvicorn."""

import uvicorn
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from cairn_gateway.app import create_app
from cairn_gateway.settings import GatewaySettings
from cairn_runtime.instrumentation import instrument_clients
from cairn_runtime.log import configure_logging
from cairn_runtime.tracing import setup_tracing


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    setup_tracing(settings.service_name, settings.trace_exporter, trace_file=settings.trace_file, otlp_endpoint=settings.otlp_endpoint)
    instrument_clients()
    app = create_app(settings)
    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics")
    uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
