"""``odo-backend run`` (the daemon) and ``odo-backend migrate``::

    odo-backend run     --db URL --broker URL --http HOST:PORT --rules FILE
                        [--fleet-token TOKEN | --fleet-token-file F] [--api-token TOKEN | --api-token-file F]
                        [--insecure-no-auth] [--metrics-token-file F] [--metrics-listen HOST:PORT]
                        [--allowed-origin ORIGIN ...] [--tls-ca F --tls-cert F --tls-key F]
                        [--client-id ID] [--session-expiry S] [--log-origin NAME] [--witness URL ...]
                        [--workers N]

``run`` refuses to start (exit 78) with no API credential (``api_token``, or an API token in the
database) unless given ``--insecure-no-auth``.
    odo-backend migrate --db URL
"""

from __future__ import annotations

import argparse

from backend.cli.common import Subparsers, add_db_options, add_log_origin, database
from backend.config import run_config, settings


def cmd_run(args: argparse.Namespace) -> int:
    from backend import service  # uvicorn and paho are loaded by the daemon only

    return service.run(run_config(settings(args)))


def cmd_migrate(args: argparse.Namespace) -> int:
    database(args).close()
    print("the database schema is up to date")
    return 0


def register(sub: Subparsers) -> None:
    p = sub.add_parser("run", help="ingest records over MQTT and serve the HTTP API and dashboard")
    add_db_options(p)
    p.add_argument("--broker", help="mqtt://[user:password@]host:port or mqtts://… (also ODO_BROKER)")
    p.add_argument("--http", metavar="HOST:PORT", help="where to serve HTTP, e.g. 127.0.0.1:8080")
    p.add_argument("--rules", metavar="FILE", help="the fleet partner's rules file (TOML)")
    p.add_argument("--fleet-token", help="devices enrolling with this token are approved at once "
                                         "(seen in ps: prefer --fleet-token-file or ODO_FLEET_TOKEN)")
    p.add_argument("--fleet-token-file", metavar="FILE", help="a file holding the fleet token")
    p.add_argument("--api-token", help="an operator's bearer token for every /api path "
                                       "(seen in ps: prefer --api-token-file or ODO_API_TOKEN)")
    p.add_argument("--api-token-file", metavar="FILE", help="a file holding the api token")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="start even with no API credential: /api then answers anyone who reaches --http")
    p.add_argument("--metrics-token-file", metavar="FILE",
                   help="a file holding the bearer token /metrics needs (or metrics_token)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve /metrics here, not on --http")
    p.add_argument("--allowed-origin", action="append", metavar="ORIGIN",
                   help="an origin besides this server's own that may POST (https://host[:port]); repeatable")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate(s) of the broker (mqtts)")
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate (mqtts)")
    p.add_argument("--tls-key", metavar="FILE", help="client key (mqtts)")
    p.add_argument("--client-id", help="MQTT client id, one per backend process (default: odo-backend-HOST)")
    p.add_argument("--session-expiry", type=int, metavar="SECONDS", help="MQTT session expiry (default 300)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="threads that verify and store messages (1 to 32; default: 2 to 4, by CPU count)")
    add_log_origin(p)
    p.add_argument("--witness", action="append", metavar="URL",
                   help="a witness to push each checkpoint to (c2sp.org/tlog-witness); repeatable")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("migrate", help="bring the database schema up to date")
    add_db_options(p)
    p.set_defaults(func=cmd_migrate)
