"""The operator dashboard: server-rendered pages under ``/`` (the JSON API is under ``/api``).

Every page needs an operator login (:mod:`backend.web.auth`); every POST carries the
session's CSRF token. Pages only read, except approve and revoke.

    /                     fleet overview, problems first
    /devices/{dev}        one device: chart, records, rejections, forks, events, enrolment
    /enrolments           pending enrolments and changed VINs
    /drivers              drivers, their assignments and balances
    /wallets/{account}    one account's balance and transfers
    /ledger               the latest transfers
    /rules                the published rules versions: effective dates, hashes, publish times
    /webhooks             the latest webhook deliveries (backend.notify)
    /static/…             the stylesheet (served locally, no CDN)
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from backend.db import Database
from backend.errors import DeviceInputError, UnknownDevice
from backend.ledger import accounts
from backend.ledger.contracts import Source
from backend.notify import webhooks
from backend.records import devices
from backend.web import auth, dashboard_data
from backend.web.auth import Session, db_call, login_required, safe_next
from backend.web.chart import odometer_chart
from backend.web.context import AppContext
from backend.web.render import STATIC_DIR, render

log = logging.getLogger(__name__)

NOTICES = {
    "approved": "Device approved.",
    "revoked": "Device revoked.",
    "cleared": "Flag cleared: the rewards held since it was raised are credited.",
}


def _page_number(request: Request) -> int:
    text = request.query_params.get("page", "1")
    return int(text) if text.isdigit() and 0 < len(text) < 10 else 1


def _notice(request: Request) -> str | None:
    return NOTICES.get(request.query_params.get("done", ""))


def decide(db: Database, dev: str, decision: str, by: str, now_ms: int, *, replace: bool = False,
           rules: Source | None = None) -> bool:
    """Approve, revoke or clear a device (:mod:`backend.records.devices`); False when there is no
    such device. A refusal (another active device in the vehicle, nothing to clear) is a
    :class:`DeviceInputError` that names why.

    Approving a device whose VIN changed approves it for the new VIN; ``replace`` retires the
    vehicle's active device."""
    try:
        if decision == "approve":
            devices.approve(db, dev, now_ms, by, replace=replace)
        elif decision == "clear":
            if rules is None:
                raise DeviceInputError("no rules file is configured: the held rewards cannot be credited")
            devices.clear(db, rules, dev, now_ms, by)
        else:
            devices.revoke(db, dev, now_ms, by)
    except UnknownDevice:
        return False
    return True


def routes(ctx: AppContext) -> list[BaseRoute]:
    """Every dashboard page, the login and logout, and the static files."""
    page = login_required(ctx)

    def now() -> int:
        return ctx.clock()

    @page
    async def fleet(request: Request, session: Session) -> Response:
        rows = await db_call(ctx.db, dashboard_data.fleet, now())
        return render(request, "fleet.html", {
            "session": session, "title": "Fleet", "nav": "fleet", "rows": rows,
            "problems": sum(1 for r in rows if r.problems), "online": sum(1 for r in rows if r.online),
        })

    @page
    async def device(request: Request, session: Session) -> Response:
        dev = request.path_params["dev"]
        view = await db_call(ctx.db, dashboard_data.device_view, dev, _page_number(request), now(),
                             ctx.display_unit)
        if view is None:
            return _not_found(request, session, f"No device {dev!r}.")
        return render(request, "device.html", {
            "session": session, "title": f"Device {view.device.get('vin') or dev}", "nav": "fleet",
            "v": view, "d": view.device, "chart": odometer_chart(view.chart), "notice": _notice(request),
        })

    def decision(kind: str) -> Any:
        @page
        async def handler(request: Request, session: Session) -> Response:
            dev = request.path_params["dev"]
            replace = request.state.form.get("replace") == "1"
            try:
                found = await db_call(ctx.db, decide, dev, kind, session.username, now(), replace=replace,
                                      rules=ctx.rule_source())
            except DeviceInputError as exc:
                return render(request, "error.html", {"session": session, "title": "Refused",
                                                      "message": str(exc)}, status_code=409)
            if not found:
                return _not_found(request, session, f"No device {dev!r}.")
            log.info("operator %s: %s device %s%s", session.username, kind, dev,
                     " (replacing the active one)" if replace else "")
            back = request.state.form.get("back")
            target = safe_next(back if isinstance(back, str) else f"/devices/{dev}")
            sep = "&" if "?" in target else "?"
            done = {"approve": "approved", "clear": "cleared"}.get(kind, "revoked")
            return RedirectResponse(f"{target}{sep}done={done}", status_code=303)

        return handler

    @page
    async def enrolments(request: Request, session: Session) -> Response:
        rows = await db_call(ctx.db, dashboard_data.enrolment_queue)
        return render(request, "enrolments.html", {
            "session": session, "title": "Enrolments", "nav": "enrolments", "rows": rows,
            "notice": _notice(request),
        })

    @page
    async def drivers(request: Request, session: Session) -> Response:
        rows = await db_call(ctx.db, dashboard_data.drivers, now())
        return render(request, "drivers.html", {
            "session": session, "title": "Drivers", "nav": "drivers", "rows": rows,
        })

    @page
    async def wallet(request: Request, session: Session) -> Response:
        account = request.path_params["account"]
        if not accounts.is_account(account):
            return _not_found(request, session, f"{account!r} is not an account name "
                              "(issuer, driver:<id>, unassigned:<dev>, redeemed:<item>).")
        balance, rows, pg = await db_call(ctx.db, dashboard_data.wallet, account,
                                                    _page_number(request))
        return render(request, "wallet.html", {
            "session": session, "title": f"Wallet {account}", "nav": "drivers", "account": account,
            "balance": balance, "rows": rows, "page": pg,
        })

    @page
    async def ledger_page(request: Request, session: Session) -> Response:
        rows, pg = await db_call(ctx.db, dashboard_data.latest_transfers, _page_number(request))
        return render(request, "ledger.html", {
            "session": session, "title": "Ledger", "nav": "ledger", "rows": rows, "page": pg,
        })

    @page
    async def webhooks_page(request: Request, session: Session) -> Response:
        rows = await db_call(ctx.db, webhooks.recent)
        return render(request, "webhooks.html", {
            "session": session, "title": "Webhooks", "nav": "webhooks", "rows": rows,
        })

    @page
    async def rules_page(request: Request, session: Session) -> Response:
        rows = await db_call(ctx.db, dashboard_data.rules_versions, now())
        return render(request, "rules.html", {
            "session": session, "title": "Rules", "nav": "rules", "rows": rows,
        })

    return [
        Route("/", fleet, name="fleet"),
        Route("/devices/{dev}", device, name="device"),
        Route("/devices/{dev}/approve", decision("approve"), methods=["POST"], name="device_approve"),
        Route("/devices/{dev}/revoke", decision("revoke"), methods=["POST"], name="device_revoke"),
        Route("/devices/{dev}/clear", decision("clear"), methods=["POST"], name="device_clear"),
        Route("/enrolments", enrolments, name="enrolments"),
        Route("/drivers", drivers, name="drivers"),
        Route("/wallets/{account:path}", wallet, name="wallet"),
        Route("/ledger", ledger_page, name="ledger"),
        Route("/rules", rules_page, name="rules"),
        Route("/webhooks", webhooks_page, name="webhooks"),
        *auth.routes(ctx),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]


def _not_found(request: Request, session: Session, message: str) -> Response:
    return render(request, "error.html", {"session": session, "title": "Not found", "message": message},
                  status_code=404)
