"""``odo-backend run``: the ingest and the HTTP server in one process.

uvicorn serves HTTP in the main thread; paho's network loop runs in its own thread (started
by :class:`backend.records.ingest.Ingest`). SIGTERM or SIGINT stops the HTTP server gracefully, then the
ingest (which finishes the batch in hand, disconnects and keeps its MQTT session). A broker that
refuses the backend's credentials, or another process taking its MQTT session, stops the
whole process with exit status 78, so that systemd does not restart it in a loop.
The webhooks' watcher and deliverers (:mod:`backend.notify.runner`) run in threads of their own
and are stopped first.

It does not start (exit 78) with no API credential, neither ``api_token`` nor any API token in the
database, unless told ``--insecure-no-auth``. ``/metrics`` is served on a listener of its own
(``metrics_listen``, in a thread), else on ``--http`` with ``metrics_token``, else on ``--http``
only when that is loopback (docs/DESIGN.md §7).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

import uvicorn

from backend.config import RunConfig
from backend.db import Database
from backend.errors import EX_CONFIG, ConfigError, DatabaseError, RulesError, TranslogError
from backend.ledger import contracts
from backend.ledger.rules import Rules, load_rules
from backend.notify.runner import Notifier
from backend.records.ingest import Ingest
from backend.transparency import translog
from backend.transparency.sequencer import Sequencer
from backend.transparency.witnesses import Pusher
from backend.web.app import MetricsDoor, create_app, metrics_app
from backend.web.context import AppContext
from common.clock import now_ms

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5
#: How long the metrics listener may take to bind.
METRICS_START_S = 10


def _check_credentials(cfg: RunConfig) -> None:
    """:class:`ConfigError` when the API would be open and ``--insecure-no-auth`` was not given; the
    loud warning when it was."""
    if cfg.api_token is not None or cfg.db.one("SELECT id FROM api_tokens LIMIT 1") is not None:
        return
    where = f"{cfg.http_host}:{cfg.http_port}"
    if not cfg.insecure_no_auth:
        raise ConfigError("api_token", (
            f"no API credential, so /api would answer anyone who reaches {where} (approve devices, "
            "redeem tokens). Make an operator token (odo-backend api-tokens add NAME --role operator "
            "--db URL), or give one with --api-token-file FILE, api_token_file or ODO_API_TOKEN; to run "
            "open on purpose, pass --insecure-no-auth"))
    log.warning("INSECURE: --insecure-no-auth and no API credential: every /api path, approving devices "
                "and redeeming tokens included, answers anyone who reaches %s", where)


def _metrics_doors(cfg: RunConfig) -> tuple[MetricsDoor, MetricsDoor | None]:
    """How ``--http`` serves /metrics, and how the metrics listener does (None: there is none)."""
    if cfg.metrics_listen is not None:
        host, port = cfg.metrics_listen
        return (MetricsDoor(served=False, elsewhere=f"it is on the metrics listener ({host}:{port})"),
                MetricsDoor(token=cfg.metrics_token))
    if cfg.metrics_token is not None:
        return MetricsDoor(token=cfg.metrics_token), None
    if cfg.http_loopback:
        return MetricsDoor(), None
    log.warning("/metrics is not served: --http %s is not loopback; set metrics_token (or "
                "--metrics-token-file) or --metrics-listen HOST:PORT", cfg.http_host)
    return MetricsDoor(served=False, elsewhere=(
        "--http is not loopback, so it needs metrics_token or --metrics-listen")), None


def _start_metrics_server(cfg: RunConfig,
                          door: MetricsDoor) -> tuple[uvicorn.Server, threading.Thread] | None:
    """The metrics listener in a thread of its own, once it listens; None when it could not bind."""
    assert cfg.metrics_listen is not None
    host, port = cfg.metrics_listen
    server = uvicorn.Server(uvicorn.Config(metrics_app(door), host=host, port=port, log_config=None,
                                           access_log=False, server_header=False, lifespan="off"))
    thread = threading.Thread(target=server.run, name="odo-metrics-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + METRICS_START_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        log.error("the metrics listener could not start on %s:%d", host, port)
        return None
    log.info("serving /metrics on %s:%d%s", host, port, " (bearer token)" if door.token else "")
    return server, thread


def _rule_book(db: Database, given: Rules | None) -> contracts.LiveBook:
    """Publish the rules file given, if it is new (the checks of ``rules publish``; a file without
    ``effective_from`` is in force from the beginning), then the whole published book, kept up to
    date with versions published while the backend runs."""
    if given is not None:
        try:
            done = contracts.publish(db, given, now_ms(), require_effective_from=False)
        except RulesError as exc:
            raise ConfigError("rules", str(exc)) from None
        log.info("rules %s %s", given.version, "published" if done.new else "already published")
    try:
        live = contracts.LiveBook(db)
    except RulesError as exc:
        raise ConfigError("rules", str(exc)) from None
    if not live.book().versions:
        raise ConfigError("rules", "no rules file given and no rules version published in the database "
                                   "(--rules FILE, or odo-backend rules publish FILE)")
    return live


def run(cfg: RunConfig) -> int:
    """Serve until SIGTERM/SIGINT; return the exit status."""
    try:
        given = None if cfg.rules_path is None else load_rules(cfg.rules_path)
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
        _check_credentials(cfg)
    except DatabaseError as exc:
        log.error("cannot read the API tokens: %s", exc)
        return 1
    try:
        rules = _rule_book(cfg.db, given)
    except DatabaseError as exc:
        log.error("cannot publish or read the rules: %s", exc)
        return 1
    try:
        origin = translog.origin(cfg.db, cfg.log_origin)
    except TranslogError as exc:
        raise ConfigError("log_origin", str(exc)) from None
    in_force = rules.book().at(now_ms())
    ctx = AppContext(db=cfg.db, rules=None if in_force is None else in_force.rules, book=rules,
                     api_token=cfg.api_token, secure_cookies=cfg.secure_cookies,
                     witnesses=len(cfg.witnesses), display_unit=cfg.display_unit)
    main_door, own_door = _metrics_doors(cfg)
    if not cfg.secure_cookies:
        log.info("session cookies are not marked Secure (--http %s)", cfg.http_host)
    server = uvicorn.Server(uvicorn.Config(
        create_app(ctx, allowed_origins=cfg.allowed_origins, metrics_door=main_door), host=cfg.http_host,
        port=cfg.http_port, log_config=None, access_log=False,
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
                    workers=cfg.workers, processes=cfg.worker_processes)
    sequencer = Sequencer(cfg.db, ctx.clock)
    pusher = Pusher(cfg.db, cfg.witnesses, ctx.clock)
    notifier = Notifier(cfg.db, cfg.notify, ctx.clock)
    started = time.monotonic()
    metrics_server = None
    if own_door is not None:
        metrics_server = _start_metrics_server(cfg, own_door)
        if metrics_server is None:
            return 1
    try:
        ingest.start()
        sequencer.start()
        pusher.start()
        notifier.start()
        log.info("serving HTTP on %s:%d; rules %s; log %s, %d witness(es)", cfg.http_host, cfg.http_port,
                 ", ".join(v.name for v in rules.book().versions), origin, len(cfg.witnesses))
        try:
            server.run()
        except SystemExit as exc:       # uvicorn exits this way when it cannot bind its socket
            log.error("the HTTP server could not start on %s:%d", cfg.http_host, cfg.http_port)
            return int(exc.code) if isinstance(exc.code, int) else 1
    finally:
        if metrics_server is not None:
            metrics_server[0].should_exit = True
            metrics_server[1].join(GRACEFUL_SHUTDOWN_S + 1)
        notifier.stop()
        pusher.stop()
        ingest.stop()
        sequencer.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stopped after %.0f s", time.monotonic() - started)
    if ingest.fatal is not None:
        return EX_CONFIG
    return 0
