"""The drivers' portal: server-rendered pages under ``/driver/``, for phones first.

A driver signs in with their driver ID and a password or a one-time code
(:mod:`backend.web.portal_auth`); every page shows only their own account, named by the
session, never by the request. Every POST carries the session's CSRF token.

    /driver/login       sign in (GET, POST); /driver/logout (POST) signs out
    /driver/            balance, weeks confirmed and streak, credits by rule and by vehicle,
                        redemptions, and a pairing code to claim a car (POST /driver/pairing)
    /driver/redeem      the catalogue of the rules in force; POST redeems one item, once per
                        idempotency key (a hidden field of each form: a double submit redeems once)
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from backend.db import Database
from backend.errors import ClaimError, InsufficientFunds, InvalidKey, KeyConflict, UnknownItem
from backend.ledger import accounts, claims
from backend.ledger.rules import Rules
from backend.web import portal_data
from backend.web.auth import LoginThrottle, Session, db_call, login_required, login_routes
from backend.web.context import AppContext
from backend.web.portal_auth import DRIVERS, check_login
from backend.web.render import render, tokens

log = logging.getLogger(__name__)

MAX_FIELD = 200


def rules_in_force(ctx: AppContext, now_ms: int) -> Rules | None:
    """The rules whose catalogue a driver redeems from at ``now_ms`` (the version in force then)."""
    return ctx.rules_at(now_ms)


def catalogue(rules: Rules | None) -> list[tuple[str, int]]:
    """(item, price in milli-tokens), cheapest first."""
    items: Mapping[str, int] = rules.catalogue if rules is not None else {}
    return sorted(items.items(), key=lambda kv: (kv[1], kv[0]))


def _field(form: Any, name: str) -> str:
    value = form.get(name)
    return value[:MAX_FIELD + 1] if isinstance(value, str) else ""


def routes(ctx: AppContext, limiter: LoginThrottle | None = None) -> list[BaseRoute]:
    """The portal's pages, its login and logout."""
    page = login_required(ctx, DRIVERS)

    async def home_page(request: Request, session: Session, code: Pairing | None = None) -> Response:
        view = await db_call(ctx.db, portal_data.overview, session.username, ctx.clock())
        if view is None:
            return _error(request, session, "Not found", "Your driver account is gone.", 404)
        return render(request, "portal_home.html", {
            "session": session, "title": "My rewards", "nav": "home", "v": view, "pairing": code,
        })

    @page
    async def home(request: Request, session: Session) -> Response:
        return await home_page(request, session)

    @page
    async def pair(request: Request, session: Session) -> Response:
        try:
            made = await db_call(ctx.db, pairing, session.username, ctx.clock())
        except ClaimError as exc:
            return _error(request, session, "No pairing code", str(exc), 409)
        return await home_page(request, session, made)

    async def catalogue_page(request: Request, session: Session, error: str | None = None,
                             status_code: int = 200) -> Response:
        now = ctx.clock()
        rules = rules_in_force(ctx, now)
        balance = await db_call(ctx.db, portal_data.balance, session.username)
        key = request.query_params.get("receipt", "")[:MAX_FIELD + 1]
        done = await db_call(ctx.db, portal_data.receipt, session.username, key) if key else None
        return render(request, "portal_redeem.html", {
            "session": session, "title": "Redeem", "nav": "redeem", "balance": balance, "error": error,
            "items": [(item, price, secrets.token_urlsafe(18)) for item, price in catalogue(rules)],
            "rules": rules, "receipt": done,
            "notice": (f"Redeemed {done.item} for {tokens(done.amount)} tokens." if done else None),
        }, status_code=status_code)

    @page
    async def redeem_page(request: Request, session: Session) -> Response:
        return await catalogue_page(request, session)

    @page
    async def redeem(request: Request, session: Session) -> Response:
        form = request.state.form
        item, key = _field(form, "item"), _field(form, "key")
        now = ctx.clock()
        rules = rules_in_force(ctx, now)
        if rules is None:
            return await catalogue_page(request, session, "Nothing can be redeemed: no rules are in force.",
                                        409)
        try:
            await db_call(ctx.db, _redeem, rules, session.username, item, key, now)
        except InsufficientFunds:
            price = rules.catalogue.get(item, 0)
            return await catalogue_page(request, session, f"Not enough tokens for {item}: it costs "
                                        f"{tokens(price)}.", 409)
        except UnknownItem:
            return await catalogue_page(request, session, f"{item[:64]!r} is not in the catalogue.", 404)
        except KeyConflict:
            return await catalogue_page(request, session, "This form was already used for another item. "
                                        "Choose the item again.", 409)
        except InvalidKey:
            return await catalogue_page(request, session, "The form was incomplete. Choose the item again.",
                                        400)
        return RedirectResponse("/driver/redeem?receipt=" + quote(key, safe=""), status_code=303)

    return [
        Route("/driver/", home, name="portal_home"),
        Route("/driver/pairing", pair, methods=["POST"], name="portal_pairing"),
        Route("/driver/redeem", redeem_page, methods=["GET"], name="portal_redeem_page"),
        Route("/driver/redeem", redeem, methods=["POST"], name="portal_redeem"),
        *login_routes(ctx, DRIVERS, check_login, limiter),
    ]


def _redeem(db: Database, rules: Rules, driver_id: str, item: str, key: str, now_ms: int) -> None:
    made = accounts.redeem(db, rules, accounts.driver_account(driver_id), item, key, now_ms)
    log.info("driver %s redeemed %s (transfer %d)", driver_id, item, made.id)


@dataclass(frozen=True)
class Pairing:
    code: str
    expires_at: int


def pairing(db: Database, driver_id: str, now_ms: int) -> Pairing:
    """A new code for claiming a car (:func:`backend.ledger.claims.pairing_code`), with its expiry."""
    return Pairing(claims.pairing_code(db, driver_id, now_ms), now_ms + claims.CODE_TTL_MS)


def _error(request: Request, session: Session, title: str, message: str, status_code: int) -> Response:
    return render(request, "portal_error.html", {"session": session, "title": title, "message": message},
                  status_code=status_code)
