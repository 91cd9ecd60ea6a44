"""``GET /api/vehicles/{vin}/mileage?from=ISO&to=ISO[&per=month|week][&unit=km|mi][&format=csv]``:
a vehicle's mileage per month or ISO week (:mod:`backend.records.mileage`), for the fleet manager.

JSON by default; CSV (``text/csv``, RFC 4180, the columns of
:func:`backend.records.mileage.mileage_columns`) with ``format=csv`` or ``Accept: text/csv``.
``from`` and ``to`` are ISO 8601 dates or times (UTC unless they name a zone; ``to`` not
included, at most ten years after ``from``). Distances are in metres and in ``unit``: the
vehicle's approved device's unit, else the fleet's ``display_unit``. A malformed VIN or parameter
is a 400, a VIN the backend has never heard of a 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from backend.db import Database
from backend.errors import BadRequest
from backend.records import display_units, mileage
from backend.web.auth import db_call
from backend.web.context import AppContext
from common import units

#: The query parameters this path takes; any other is refused, so that a typo is not ignored.
PARAMS = frozenset({"from", "to", "per", "unit", "format"})


def _param(request: Request, name: str, default: str | None = None) -> str:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"{name}: given {len(values)} times")
    if not values:
        if default is None:
            raise BadRequest(f"{name}: required (an ISO 8601 date or time, e.g. 2026-01-01)")
        return default
    return values[0]


def _wants_csv(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        if fmt not in ("json", "csv"):
            raise BadRequest(f"format: must be json or csv, got {fmt[:20]!r}")
        return fmt == "csv"
    accept = request.headers.get("accept", "")[:1000]
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return "text/csv" in kinds and "application/json" not in kinds


def _answer(db: Database, vin: str, r: mileage.Range, per: str, unit: str | None,
            fleet_unit: str) -> dict[str, Any] | None:
    with db.read() as tx:
        if not mileage.known_vin(tx, vin):
            return None
        chosen = unit or display_units.vehicle_unit(tx, vin, fleet_unit)
    return mileage.mileage_document(db, vin, r, per, chosen)


def mileage_handler(ctx: AppContext) -> Callable[[Request], Awaitable[Response]]:
    """The route's handler, bound to the app's database and fleet unit."""

    async def handler(request: Request) -> Response:
        vin = request.path_params["vin"]
        try:
            mileage.check_vin(vin)
        except ValueError as exc:
            raise BadRequest(f"vin: {exc}") from None
        unknown = sorted(set(request.query_params) - PARAMS)
        if unknown:
            raise BadRequest(f"unexpected parameters: {', '.join(p[:40] for p in unknown[:5])} "
                             f"(known: {', '.join(sorted(PARAMS))})")
        try:
            r = mileage.parse_range(_param(request, "from"), _param(request, "to"))
            per = mileage.check_per(_param(request, "per", "month"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        unit_text = _param(request, "unit", "")
        try:
            unit = units.check_unit(unit_text) if unit_text else None
        except ValueError as exc:
            raise BadRequest(f"unit: {exc}") from None
        as_csv = _wants_csv(request, _param(request, "format", "") or None)
        doc = await db_call(ctx.db, _answer, vin, r, per, unit, ctx.display_unit)
        if doc is None:
            return JSONResponse({"error": f"no vehicle {vin} is known"}, status_code=404)
        if not as_csv:
            return JSONResponse(doc)
        body = "".join(mileage.csv_lines(doc["columns"], doc["periods"]))
        name = f"mileage-{vin}-{doc['per']}-{doc['from'][:10]}-{doc['to'][:10]}.csv"
        return Response(body, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    return handler
