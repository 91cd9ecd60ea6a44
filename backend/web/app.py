"""The backend's Starlette app: the JSON API, the public log, the dashboard (when installed), metrics,
liveness."""

from __future__ import annotations

import logging
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from backend import metrics
from backend.db import Database
from backend.records import devices
from backend.web import api
from backend.web import log as log_routes
from backend.web.auth import db_call
from backend.web.context import AppContext

log = logging.getLogger(__name__)

try:
    from backend.web import dashboard
except ImportError as exc:                       # the dashboard is optional; its own bugs are not
    if exc.name != "backend.web.dashboard":
        raise
    dashboard = None  # type: ignore[assignment]


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api") or request.url.path in ("/metrics", "/healthz")


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if _is_api(request):
        message = {404: f"no such path {request.url.path}", 405: f"{request.method} is not allowed here"}
        return JSONResponse({"error": message.get(exc.status_code, exc.detail)}, status_code=exc.status_code,
                            headers=exc.headers)
    return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)


def _server_error(request: Request, exc: Exception) -> Response:
    """Unexpected failures (logged with their traceback by Starlette); JSON on the API too."""
    if _is_api(request):
        return JSONResponse({"error": "internal error; the server's log has the details"}, status_code=500)
    return PlainTextResponse("Internal Server Error", status_code=500)


def create_app(ctx: AppContext) -> Starlette:
    def fleet() -> metrics.FleetFigures:
        """The fleet gauges, read at each scrape in the scrape's worker thread (see ``db_call``)."""
        try:
            return devices.fleet_gauges(ctx.db)
        finally:
            ctx.db.close()

    metrics.REGISTRY.watch_fleet(fleet)

    async def scrape(request: Request) -> Response:
        body = await run_in_threadpool(metrics.REGISTRY.exposition)    # the collector blocks on the database
        return Response(body, media_type=metrics.CONTENT_TYPE)

    async def healthz(request: Request) -> Response:
        def check(db: Database) -> Any:
            return db.one("SELECT 1 AS ok")

        try:
            await db_call(ctx.db, check)
        except Exception as exc:  # noqa: BLE001 - any database failure means not healthy
            log.warning("health check: the database does not answer: %s", exc)
            return JSONResponse({"error": "the database does not answer"}, status_code=503)
        return JSONResponse({"status": "ok"})

    routes: list[BaseRoute] = [*api.routes(ctx), *log_routes.routes(ctx), Route("/metrics", scrape),
                               Route("/healthz", healthz)]
    if dashboard is not None:
        routes += dashboard.routes(ctx)
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error})
