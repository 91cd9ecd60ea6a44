"""``odo-backend`` commands of the transparency log::

    odo-backend certificate VIN --db URL --out FILE
    odo-backend log-key --db URL --out FILE          # the log's public verifier key (PEM)
    odo-backend checkpoint --db URL [--json]         # sign a checkpoint of the log now
"""

from __future__ import annotations

import argparse
import json

from backend.cli.common import Subparsers, add_db_options, database, iso, write_file
from backend.config import settings
from backend.errors import CertificateError, UsageError
from backend.transparency import certificate, translog
from common.clock import now_ms
from protocol import certificate as pc


def cmd_certificate(args: argparse.Namespace) -> int:
    out = str(settings(args).require("out"))
    db = database(args)
    try:
        cert = certificate.build(db, args.vin, now_ms())
    except CertificateError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    write_file(out, pc.encode(cert))
    print(f"certificate for {args.vin}: {len(cert['records'])} records from {len(cert['devices'])} "
          f"device(s) written to {out}; check it with: odo-verify {out} --log-key LOG_KEY.pem")
    return 0


def cmd_log_key(args: argparse.Namespace) -> int:
    out = str(settings(args).require("out"))
    db = database(args)
    try:
        key = translog.public_key(db)
    finally:
        db.close()
    write_file(out, key.to_pem())
    print(f"log key {key.id} written to {out}")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    db = database(args)
    try:
        cp = translog.checkpoint(db, now_ms())
    finally:
        db.close()
    print(json.dumps(cp) if args.json else f"checkpoint of {cp['size']} entries, root {cp['root']}, "
          f"signed {iso(cp['t'])} by log key {cp['kid']}")
    return 0


def register(sub: Subparsers) -> None:
    p = sub.add_parser("certificate", help="write a vehicle's mileage certificate",
                       description="Write a vehicle's mileage certificate: its records, their "
                                   "inclusion proofs and a signed checkpoint (check it with odo-verify).")
    p.add_argument("vin", metavar="VIN")
    add_db_options(p, out=True)
    p.set_defaults(func=cmd_certificate)

    p = sub.add_parser("log-key", help="write the transparency log's public key (PEM)")
    add_db_options(p, out=True)
    p.set_defaults(func=cmd_log_key)

    p = sub.add_parser("checkpoint", help="sign a checkpoint of the transparency log now")
    add_db_options(p, json_flag=True)
    p.set_defaults(func=cmd_checkpoint)
