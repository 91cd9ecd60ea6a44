"""The transparency log's public HTTP paths under ``/log`` (docs/log.md), for anyone, no token.

- ``GET /log/checkpoint``: the latest checkpoint (c2sp.org/tlog-checkpoint) cosigned by every
  witness configured, with their cosignatures (a newer one is served once they have cosigned
  it). Without witnesses, a log that has grown gets a new checkpoint, at most one a second.
- ``GET /log/tile/<L>/<N>[.p/<W>]``: hash tiles (c2sp.org/tlog-tiles).
- ``GET /log/tile/entries/<N>[.p/<W>]``: entry bundles.

Tiles are served within the latest checkpoint only, so every one a client can fetch is one
that checkpoint commits to. A full tile never changes (``immutable``); a partial one does not
either, but a client should move to the full one, so it is cached for a short while only.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from backend.db import Database
from backend.transparency import translog
from backend.web.auth import db_call
from backend.web.context import AppContext
from protocol import tiles
from protocol.errors import BadFormat

#: How often a public request may make the backend sign a new checkpoint.
CHECKPOINT_INTERVAL_MS = 1000
IMMUTABLE = "public, max-age=31536000, immutable"
PARTIAL = "public, max-age=60"
CHECKPOINT_CACHE = "no-cache"
TILE_TYPE = "application/octet-stream"
TEXT_TYPE = "text/plain; charset=utf-8"


def _not_found(message: str) -> Response:
    return PlainTextResponse(message + "\n", status_code=404, headers={"Cache-Control": "no-cache"})


def routes(ctx: AppContext) -> list[BaseRoute]:
    db = ctx.db

    async def checkpoint(request: Request) -> Response:
        cp = None
        if ctx.witnesses:       # the checkpointer signs and has them cosigned: serve what they cosigned
            cp = await db_call(db, translog.witnessed_checkpoint, ctx.witnesses)
        if cp is None:
            cp = await db_call(db, translog.checkpoint, ctx.clock(), min_interval_ms=CHECKPOINT_INTERVAL_MS)
        return Response(cp["note"].encode("utf-8"), media_type=TEXT_TYPE,
                        headers={"Cache-Control": CHECKPOINT_CACHE})

    def read_tile(db: Database, level: int | None, n: int, width: int | None) -> bytes | None:
        with db.read() as tx:
            size = tx.scalar("SELECT MAX(size) AS n FROM log_checkpoints")
            return None if size is None else translog.tile(tx, level, n, width, int(size))

    async def tile(request: Request) -> Response:
        wanted = "tile/" + str(request.path_params["rest"])
        try:
            level, n, width = tiles.parse_path(wanted)
        except BadFormat as exc:
            return _not_found(f"no such tile: {exc}")
        data: Any = await db_call(db, read_tile, level, n, width)
        if data is None:
            return _not_found(f"{wanted} is beyond the latest checkpoint")
        return Response(data, media_type=TILE_TYPE,
                        headers={"Cache-Control": IMMUTABLE if width is None else PARTIAL})

    return [Route("/log/checkpoint", checkpoint, methods=["GET"]),
            Route("/log/tile/{rest:path}", tile, methods=["GET"])]
