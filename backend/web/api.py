"""The JSON API under ``/api`` (docs/DESIGN.md §7); the OpenAPI document is :mod:`backend.web.openapi`.

When an API token is configured, every ``/api`` path needs ``Authorization: Bearer <token>``
(compared in constant time) and answers 401 without it. Errors are ``{"error": "..."}`` naming
what was wrong: 400 bad input, 401, 404 unknown device, account or item, 409 a redemption that
cannot be made, 503 when the server lacks what the request needs.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.errors import (
    BadRequest,
    DeviceInputError,
    InsufficientFunds,
    InvalidKey,
    KeyConflict,
    UnknownAccount,
    UnknownDevice,
    UnknownItem,
)
from backend.ledger import accounts
from backend.records import devices
from backend.transparency import translog
from backend.web.auth import db_call
from backend.web.context import AppContext
from backend.web.openapi import document

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BearerAuth:
    """Refuse every request without ``Authorization: Bearer <token>`` (when a token is set)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.expected = token.encode("utf-8") if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.expected is not None:
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.expected):
                what = "wrong bearer token" if header else "missing Authorization: Bearer <api token>"
                response = error(401, f"{what} (every /api path needs the API token)",
                                 {"WWW-Authenticate": 'Bearer realm="odo-backend"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _json_body(request: Request, *, optional: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip() and optional:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise BadRequest(f"{name}: must be an integer from {low} to {high}, got {text!r}")
    return int(text)


Handler = Callable[[Request], Any]


def _guarded(ctx: AppContext, handler: Handler) -> Callable[[Request], Any]:
    """Map the domain's refusals to HTTP answers."""

    async def endpoint(request: Request) -> Response:
        try:
            result = await handler(request)
        except BadRequest as exc:
            return error(400, str(exc))
        except UnknownDevice as exc:
            return error(404, str(exc))
        except DeviceInputError as exc:
            return error(400, str(exc))
        except (UnknownAccount, UnknownItem) as exc:
            return error(404, str(exc))
        except InvalidKey as exc:
            return error(400, str(exc))
        except (InsufficientFunds, KeyConflict) as exc:
            return error(409, str(exc))
        return result if isinstance(result, Response) else JSONResponse(result)

    return endpoint


def routes(ctx: AppContext) -> list[BaseRoute]:
    """The ``/api`` mount, behind the bearer token when one is configured."""
    db = ctx.db

    async def list_devices(request: Request) -> Any:
        return await db_call(db, devices.list_devices)

    async def get_device(request: Request) -> Any:
        return await db_call(db, devices.get_device, request.path_params["dev"])

    async def device_records(request: Request) -> Any:
        after = _int_param(request, "after_seq", 0, 0, 2**53)
        limit = _int_param(request, "limit", 500, 1, devices.MAX_RECORDS_PAGE)
        return await db_call(db, devices.records, request.path_params["dev"], after, limit)

    async def approve(request: Request) -> Any:
        body = await _json_body(request, optional=True)
        vin = body.get("vin")
        if vin is not None and not isinstance(vin, str):
            raise BadRequest("vin: must be a string")
        replace = body.get("replace", False)
        if not isinstance(replace, bool):
            raise BadRequest("replace: must be true or false")
        dev = request.path_params["dev"]
        return await db_call(db, devices.approve, dev, ctx.clock(), "api", vin, replace=replace)

    async def clear(request: Request) -> Any:
        if ctx.rules is None:
            raise BadRequest("no rules file is configured: held rewards cannot be credited")
        return await db_call(db, devices.clear, ctx.rules, request.path_params["dev"], ctx.clock(), "api")

    async def revoke(request: Request) -> Any:
        return await db_call(db, devices.revoke, request.path_params["dev"], ctx.clock(), "api")

    async def wallet(request: Request) -> Any:
        return await db_call(db, accounts.wallet, request.path_params["account"])

    async def redeem(request: Request) -> Any:
        body = await _json_body(request)
        item, key = body.get("item"), body.get("idempotency_key")
        for name, value in (("item", item), ("idempotency_key", key)):
            if not isinstance(value, str) or not value:
                raise BadRequest(f"{name}: required, a non-empty string")
        assert isinstance(item, str) and isinstance(key, str)
        unknown = sorted(set(body) - {"item", "idempotency_key"})
        if unknown:
            raise BadRequest(f"unexpected fields: {', '.join(unknown)}")
        if ctx.rules is None:
            return error(503, "no rules file is configured, so there is no catalogue")
        account = request.path_params["account"]
        made = await db_call(db, accounts.redeem, ctx.rules, account, item, key, ctx.clock())
        return made.to_dict()

    async def checkpoint(request: Request) -> Any:
        return await db_call(db, translog.checkpoint_now, ctx.clock())

    async def openapi(request: Request) -> Any:
        return document()

    table: list[tuple[str, Handler, list[str]]] = [
        ("/devices", list_devices, ["GET"]),
        ("/devices/{dev}", get_device, ["GET"]),
        ("/devices/{dev}/records", device_records, ["GET"]),
        ("/devices/{dev}/approve", approve, ["POST"]),
        ("/devices/{dev}/revoke", revoke, ["POST"]),
        ("/devices/{dev}/clear", clear, ["POST"]),
        ("/wallets/{account}", wallet, ["GET"]),
        ("/wallets/{account}/redeem", redeem, ["POST"]),
        ("/checkpoint", checkpoint, ["GET"]),
        ("/openapi.json", openapi, ["GET"]),
    ]
    inner = [Route(path, _guarded(ctx, handler), methods=methods) for path, handler, methods in table]
    return [Mount("/api", routes=inner, middleware=[Middleware(BearerAuth, token=ctx.api_token)],
                  max_body_size=MAX_BODY)]
