"""Rendering the dashboard's pages: the Jinja2 environment, its filters, and the
headers every page carries.

Autoescaping is on for every template: nothing a device, a driver or an operator
typed reaches a page unescaped. Times are shown in UTC ISO 8601; metres as km and
milli-tokens as tokens, both with integer arithmetic only.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"

#: Times before this are a clock that was never set (a Pi without RTC boots in 1970).
PLAUSIBLE_SINCE_MS = 946_684_800_000   # 2000-01-01T00:00:00Z

SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def iso(ms: int | None, never: str = "never") -> str:
    """Unix milliseconds as ``2026-11-17T08:30:05Z``; ``never`` for no time at all."""
    if ms is None or ms <= 0:
        return never
    when = datetime.datetime.fromtimestamp(ms // 1000, tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_date(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms // 1000, tz=datetime.UTC).strftime("%Y-%m-%d")


def km(metres: int | None) -> str:
    """Metres as kilometres with one decimal, thousands separated: ``123,456.7 km``."""
    if metres is None:
        return "–"
    sign = "-" if metres < 0 else ""
    whole, rest = divmod(abs(int(metres)), 1000)
    return f"{sign}{whole:,}.{rest // 100} km"


def tokens(milli: int | None) -> str:
    """Milli-tokens as tokens with three decimals: ``12.500``."""
    if milli is None:
        return "–"
    sign = "-" if milli < 0 else ""
    whole, rest = divmod(abs(int(milli)), 1000)
    return f"{sign}{whole:,}.{rest:03d}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["iso"] = iso
    env.filters["km"] = km
    env.filters["tokens"] = tokens
    return env


TEMPLATES = Jinja2Templates(env=_environment())


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    """One page from ``templates/<name>``, with the security headers."""
    context.setdefault("session", None)
    context.setdefault("notice", None)
    context.setdefault("nav", "")
    return TEMPLATES.TemplateResponse(request, name, context, status_code=status_code,
                                      headers=dict(SECURITY_HEADERS))
