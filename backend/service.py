"""``odo-backend run``: the ingest and the HTTP server in one process.

uvicorn serves HTTP in the main thread; paho's network loop runs in its own thread (started
by :class:`backend.records.ingest.Ingest`). SIGTERM or SIGINT stops the HTTP server gracefully, then the
ingest (which finishes the batch in hand, disconnects and keeps its MQTT session). A broker that
refuses the backend's credentials, or another process taking its MQTT session, stops the
whole process with exit status 78, so that systemd does not restart it in a loop.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from backend.config import RunConfig
from backend.errors import EX_CONFIG, ConfigError, DatabaseError, RulesError, TranslogError
from backend.ledger.rules import load_rules
from backend.records import device_log
from backend.records.ingest import Ingest
from backend.transparency import translog
from backend.transparency.sequencer import Sequencer
from backend.transparency.witnesses import Pusher
from backend.web.app import create_app
from backend.web.context import AppContext
from common.clock import now_ms

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5


def run(cfg: RunConfig) -> int:
    """Serve until SIGTERM/SIGINT; return the exit status."""
    try:
        rules = load_rules(cfg.rules_path)
    except RulesError as exc:
        raise ConfigError("rules", str(exc)) from None
    try:
        applied = cfg.db.migrate()
    except DatabaseError as exc:
        log.error("cannot open the database: %s", exc)
        return 1
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    try:
        with cfg.db.write() as tx:            # the rules credited by from now on, once per version and file
            device_log.log_rules_of(tx, rules, now_ms())
    except DatabaseError as exc:
        log.error("cannot log the rules %s: %s", rules.version, exc)
        return 1
    try:
        origin = translog.origin(cfg.db, cfg.log_origin)
    except TranslogError as exc:
        raise ConfigError("log_origin", str(exc)) from None
    ctx = AppContext(db=cfg.db, rules=rules, api_token=cfg.api_token, secure_cookies=cfg.secure_cookies,
                     witnesses=len(cfg.witnesses))
    if cfg.api_token is None:
        log.warning("no --api-token: the /api paths answer anyone who can reach %s:%d",
                    cfg.http_host, cfg.http_port)
    server = uvicorn.Server(uvicorn.Config(
        create_app(ctx), host=cfg.http_host, port=cfg.http_port, log_config=None, access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, server_header=False,
    ))

    def stop(message: str | None = None) -> None:
        server.should_exit = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop()

    # uvicorn installs its own handlers while it serves and calls these again once it has
    # stopped; before and after, these stop the server.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    ingest = Ingest(cfg.db, rules, cfg.broker, cfg.fleet_token, on_fatal=stop, evidence=cfg.evidence,
                    workers=cfg.workers)
    sequencer = Sequencer(cfg.db, ctx.clock)
    pusher = Pusher(cfg.db, cfg.witnesses, ctx.clock)
    started = time.monotonic()
    try:
        ingest.start()
        sequencer.start()
        pusher.start()
        log.info("serving HTTP on %s:%d; rules %s; log %s, %d witness(es)", cfg.http_host, cfg.http_port,
                 rules.version, origin, len(cfg.witnesses))
        try:
            server.run()
        except SystemExit as exc:       # uvicorn exits this way when it cannot bind its socket
            log.error("the HTTP server could not start on %s:%d", cfg.http_host, cfg.http_port)
            return int(exc.code) if isinstance(exc.code, int) else 1
    finally:
        pusher.stop()
        ingest.stop()
        sequencer.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stopped after %.0f s", time.monotonic() - started)
    if ingest.fatal is not None:
        return EX_CONFIG
    return 0
