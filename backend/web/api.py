"""The JSON API under ``/api`` (docs/DESIGN.md §7); the OpenAPI document is :mod:`backend.web.openapi`.

Once a credential exists (the ``api_token`` setting, or any API token in the database:
:mod:`backend.web.api_tokens`), every ``/api`` path needs ``Authorization: Bearer <token>`` and
answers 401 without one that works; a token whose role may not use the path
(:data:`backend.web.roles.ACCESS`) gets 403, as does everyone on a route the table does not
declare. Errors are ``{"error": "..."}`` naming what was wrong: 400 bad input, 401, 403, 404
unknown device, driver, account or item, 409 a redemption that cannot be made, 503 when the
server lacks what the request needs. Before any of this (:mod:`backend.web.doors`), a POST from
another origin is refused with 403, and one whose body is not sent as ``Content-Type:
application/json`` with 415.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.db import Database
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
from backend.ledger import accounts, contracts
from backend.records import devices
from backend.transparency import translog
from backend.web import api_tokens, exports, roles
from backend.web.api_tokens import Principal, Refusal
from backend.web.auth import db_call
from backend.web.context import AppContext
from backend.web.openapi import document

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
#: The longest Authorization header read.
MAX_AUTHORIZATION = 1024
#: Where :class:`BearerAuth` leaves the request's :class:`Principal` in the ASGI scope.
PRINCIPAL = "odoledger.api.principal"


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def bearer(header: bytes) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None for anything else."""
    scheme, _, given = header.partition(b" ")
    if scheme.lower() != b"bearer" or len(header) > MAX_AUTHORIZATION:
        return None
    try:
        token = given.strip().decode("ascii")
    except UnicodeDecodeError:
        return None
    return token or None


class BearerAuth:
    """Find who each request acts as (:func:`api_tokens.authenticate`, at every request) and leave
    it in the scope for the routes; answer 401 when credentials are needed and none works."""

    def __init__(self, app: ASGIApp, ctx: AppContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        who = await db_call(self.ctx.db, api_tokens.authenticate, bearer(header), self.ctx.api_token,
                            self.ctx.clock())
        if isinstance(who, Refusal):
            response = error(401, f"{who.reason} (every /api path needs an API token)",
                             {"WWW-Authenticate": 'Bearer realm="odo-backend"'})
            await response(scope, receive, send)
            return
        await self.app({**scope, PRINCIPAL: who}, receive, send)


def _principal(request: Request) -> Principal | None:
    who = request.scope.get(PRINCIPAL)
    return who if isinstance(who, Principal) else None


def _authorized(path: str, endpoint: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """Let a request through to ``endpoint`` only when :data:`roles.ACCESS` allows its principal
    ``request.method`` on ``path`` (the route's template under ``/api``); 403 otherwise."""

    async def check(request: Request) -> Any:
        who = _principal(request)
        declared = roles.access(request.method, path)
        if declared is None:
            log.error("%s %s is not declared in backend.web.roles.ACCESS: refused", request.method, path)
            return error(403, f"{request.method} {path} is open to no role")
        if who is None or not declared.allows(who.role, who.driver, request.path_params):
            label = "nobody" if who is None else who.label
            log.warning("%s %s refused to %s (token %s)", request.method, request.url.path, label,
                        who.token if who is not None else None)
            return error(403, f"{label} may not use {request.method} {path} "
                              f"(it is for {', '.join(declared.describe())})")
        return await endpoint(request)

    return check


def _decided_by(request: Request) -> str:
    who = _principal(request)
    return "api" if who is None else who.by


def driver_wallet(db: Database, driver_id: str) -> dict[str, Any]:
    """A driver's id and name, and the wallet ``driver:<id>`` (:func:`accounts.wallet`)."""
    if not accounts.DRIVER_ID.fullmatch(driver_id):
        raise UnknownAccount(f"{driver_id!r} is not a driver id")
    row = db.one("SELECT id, name FROM drivers WHERE id = ?", (driver_id,))
    if row is None:
        raise UnknownAccount(f"no driver {driver_id!r}")
    return {"id": row["id"], "name": row["name"], **accounts.wallet(db, accounts.driver_account(driver_id))}


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
    """The ``/api`` mount: each route behind :class:`BearerAuth` and its declaration in
    :data:`roles.ACCESS`."""
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
        dev, by = request.path_params["dev"], _decided_by(request)
        return await db_call(db, devices.approve, dev, ctx.clock(), by, vin, replace=replace)

    async def clear(request: Request) -> Any:
        source = ctx.rule_source()
        if source is None:
            raise BadRequest("no rules file is configured: held rewards cannot be credited")
        return await db_call(db, devices.clear, source, request.path_params["dev"], ctx.clock(),
                             _decided_by(request))

    async def revoke(request: Request) -> Any:
        dev, by = request.path_params["dev"], _decided_by(request)
        return await db_call(db, devices.revoke, dev, ctx.clock(), by)

    async def catalogue(request: Request) -> Any:
        rules = ctx.rules_at(ctx.clock())
        if rules is None:
            return error(503, "no rules file is configured, so there is no catalogue")
        return {"rules_version": rules.version,
                "items": [{"item": item, "milli_tokens": price}
                          for item, price in sorted(rules.catalogue.items())]}

    async def driver(request: Request) -> Any:
        return await db_call(db, driver_wallet, request.path_params["id"])

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
        source = ctx.rule_source()
        if source is None:
            return error(503, "no rules file is configured, so there is no catalogue")
        account = request.path_params["account"]
        made = await db_call(db, contracts.redeem, source, account, item, key, ctx.clock())
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
        ("/catalogue", catalogue, ["GET"]),
        ("/drivers/{id}", driver, ["GET"]),
        ("/wallets/{account}", wallet, ["GET"]),
        ("/wallets/{account}/redeem", redeem, ["POST"]),
        ("/checkpoint", checkpoint, ["GET"]),
        ("/vehicles/{vin}/mileage", exports.mileage_handler(ctx), ["GET"]),
        ("/openapi.json", openapi, ["GET"]),
    ]
    inner = [Route(path, _authorized("/api" + path, _guarded(ctx, handler)), methods=methods)
             for path, handler, methods in table]
    return [Mount("/api", routes=inner, middleware=[Middleware(BearerAuth, ctx=ctx)], max_body_size=MAX_BODY)]
