"""The backend's Starlette app: the JSON API, the public log, the dashboard and the drivers' portal (when
installed), metrics, liveness; every request through :class:`backend.web.doors.Doors` first.

``/metrics`` is served as :class:`MetricsDoor` says: on this listener or not (404), with a bearer
token or without (``odo-backend run`` decides: docs/DESIGN.md §7); :func:`metrics_app` is the
listener of its own (``--metrics-listen``).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from backend import metrics
from backend.db import Database
from backend.records import devices
from backend.web import api, portal
from backend.web import log as log_routes
from backend.web.api import bearer
from backend.web.auth import db_call
from backend.web.context import AppContext
from backend.web.doors import Doors

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


@dataclass(frozen=True)
class MetricsDoor:
    """Whether a listener serves ``/metrics`` (else 404, saying where it is), and the bearer token
    it then needs (None: none)."""

    served: bool = True
    token: str | None = field(default=None, repr=False)
    elsewhere: str = ""            # why it is not served here, in the 404


def _scrape_endpoint(door: MetricsDoor) -> Callable[[Request], Awaitable[Response]]:
    async def scrape(request: Request) -> Response:
        if not door.served:
            return JSONResponse({"error": f"/metrics is not served here: {door.elsewhere}"}, status_code=404)
        if door.token is not None:
            given = bearer(request.headers.get("authorization", "").encode("latin-1"))
            if given is None or not hmac.compare_digest(given.encode(), door.token.encode()):
                return JSONResponse({"error": "/metrics needs Authorization: Bearer <metrics_token>"},
                                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
        body = await run_in_threadpool(metrics.REGISTRY.exposition)    # the collector blocks on the database
        return Response(body, media_type=metrics.CONTENT_TYPE)

    return scrape


def metrics_app(door: MetricsDoor) -> Starlette:
    """``/metrics`` alone, for a listener of its own."""
    return Starlette(routes=[Route("/metrics", _scrape_endpoint(door))],
                     exception_handlers={HTTPException: _http_error, Exception: _server_error})


def create_app(ctx: AppContext, *, allowed_origins: Sequence[str] = (),
               metrics_door: MetricsDoor = MetricsDoor()) -> Starlette:
    """The whole app; ``allowed_origins`` are origins besides the server's own that may send
    state-changing requests (:class:`Doors`)."""
    def fleet() -> metrics.FleetFigures:
        """The fleet gauges, read at each scrape in the scrape's worker thread (see ``db_call``)."""
        try:
            return devices.fleet_gauges(ctx.db)
        finally:
            ctx.db.close()

    metrics.REGISTRY.watch_fleet(fleet)

    async def healthz(request: Request) -> Response:
        def check(db: Database) -> Any:
            return db.one("SELECT 1 AS ok")

        try:
            await db_call(ctx.db, check)
        except Exception as exc:  # noqa: BLE001 - any database failure means not healthy
            log.warning("health check: the database does not answer: %s", exc)
            return JSONResponse({"error": "the database does not answer"}, status_code=503)
        problem = metrics.REGISTRY.storage_problem       # set by the ingest when a write is refused
        if problem is not None:
            return JSONResponse({"error": f"storage unavailable: {problem}; nothing is acknowledged until "
                                          "the database stores again"}, status_code=503)
        return JSONResponse({"status": "ok"})

    routes: list[BaseRoute] = [*api.routes(ctx), *log_routes.routes(ctx),
                               Route("/metrics", _scrape_endpoint(metrics_door)), Route("/healthz", healthz)]
    if dashboard is not None:
        routes += [*portal.routes(ctx), *dashboard.routes(ctx)]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error},
                     middleware=[Middleware(Doors, allowed_origins=tuple(allowed_origins))])
