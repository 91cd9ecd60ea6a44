"""The checks every HTTP request passes before any route (docs/DESIGN.md §7, "HTTP doors").

- A state-changing request (POST, PUT, PATCH, DELETE) that carries ``Origin`` must come from the
  server's own origin (the scheme of the request and its ``Host`` header) or one of the origins
  configured (``allowed_origin``); ``Origin: null`` is never one. ``Sec-Fetch-Site``, when sent,
  must be ``same-origin`` (or ``none``, a request the user made) unless ``Origin`` is one of those
  configured. Anything else is refused with 403 and changes nothing. A request with neither
  header (``curl``, scripts, the agent) is not a browser's cross-site request and passes.
- A state-changing request under ``/api`` with a body, or with a ``Content-Type`` at all, must say
  ``Content-Type: application/json`` (parameters such as ``charset`` allowed); 415 otherwise. A
  browser sends a cross-site ``no-cors`` request only as ``text/plain``, a form's types or none.

:func:`is_loopback` says whether a listen address is reachable from this machine only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: An origin as the ``allowed_origin`` setting takes it: scheme, host, optional port, no path.
ORIGIN_RE = re.compile(r"https?://(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253})(:[0-9]{1,5})?")
#: The longest Origin, Host or Content-Type header looked at.
MAX_HEADER = 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SAME = frozenset({"same-origin", "none"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def normalise_origin(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an origin, the port made explicit; None when it is no http(s) origin."""
    if len(origin) > MAX_HEADER:
        return None
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query:
        return None
    return scheme, parts.hostname.lower(), _DEFAULT_PORTS[scheme] if port is None else port


def check_origin(origin: str) -> str:
    """An ``allowed_origin`` value as given, or ValueError naming what is wrong with it."""
    if not ORIGIN_RE.fullmatch(origin) or normalise_origin(origin) is None:
        raise ValueError(f"{origin!r}: an origin is scheme://host[:port], e.g. https://odo.example.net")
    return origin


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            text: str = value[:MAX_HEADER].decode("latin-1")
            return text
    return None


def _own_origin(scope: Scope) -> tuple[str, str, int] | None:
    host = _header(scope, b"host")
    if not host:
        return None
    return normalise_origin(f"{scope.get('scheme', 'http')}://{host}")


def is_json(content_type: str) -> bool:
    """Whether a Content-Type names ``application/json`` (any parameters)."""
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return _header(scope, b"transfer-encoding") is not None


class Doors:
    """ASGI middleware: the origin check on every state-changing request, the content type on
    those under ``/api``; see the module docstring."""

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = frozenset(o for o in (normalise_origin(a) for a in allowed_origins) if o is not None)

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        """``(status, message)`` when the request may not go on, else None."""
        if scope["method"] not in STATE_CHANGING:
            return None
        origin = _header(scope, b"origin")
        site = _header(scope, b"sec-fetch-site")
        given = None if origin is None else normalise_origin(origin)
        if given is None or given not in self.allowed:
            if origin is not None and (given is None or given != _own_origin(scope)):
                return 403, (f"cross-origin {scope['method']} refused: Origin {origin[:100]!r} is not "
                             "this server's (nor an allowed_origin)")
            if site is not None and site.lower() not in _SAME:
                return 403, f"cross-site {scope['method']} refused (Sec-Fetch-Site: {site[:40]})"
        path = scope["path"]
        if path == "/api" or path.startswith("/api/"):
            content_type = _header(scope, b"content-type")
            if (content_type is not None or _has_body(scope)) and not is_json(content_type or ""):
                return 415, (f"Content-Type: {(content_type or 'none')[:100]}: the body must be JSON, "
                             "sent as Content-Type: application/json")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self.refusal(scope) if scope["type"] == "http" else None
        if refused is None:
            await self.app(scope, receive, send)
            return
        status, message = refused
        log.warning("%s %s refused with %d: %s", scope["method"], scope["path"], status, message)
        api = scope["path"] == "/api" or scope["path"].startswith("/api/")
        body = json.dumps({"error": message}).encode() if api else message.encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json" if api else b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()), (b"vary", b"Origin")]})
        await send({"type": "http.response.body", "body": body})
