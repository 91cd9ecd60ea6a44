"""``odo-backend`` commands of the transparency log::

    odo-backend certificate VIN --db URL --out FILE [--witness URL ...]
    odo-backend log-key --db URL --out FILE [--pem]   # the log's verifier key (note vkey, or PEM)
    odo-backend checkpoint --db URL [--json]          # sign a checkpoint of the log now

Each takes ``--log-origin NAME``, the log's name, which is fixed when the log begins.
"""

from __future__ import annotations

import argparse
import json

from backend.cli.common import Subparsers, add_db_options, add_log_origin, database, iso, write_file
from backend.config import settings, witness_urls
from backend.errors import CertificateError, UsageError
from backend.transparency import certificate, translog
from common.clock import now_ms
from protocol import certificate as pc
from protocol import note


def cmd_certificate(args: argparse.Namespace) -> int:
    s = settings(args)
    out = str(s.require("out"))
    urls = witness_urls(s)
    db = database(args)
    try:
        cert = certificate.build(db, args.vin, now_ms(), urls)
    except CertificateError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    write_file(out, pc.encode(cert))
    records = sum(1 for e in cert["entries"] if not e["leaf"].startswith("{"))
    cosigned = len(note.parse(cert["log"]["checkpoint"]).signatures) - 1
    print(f"certificate for {args.vin}: {records} records and {len(cert['entries']) - records} device "
          f"entries, in a checkpoint of {cert['annotations']['size']} entries with {cosigned} "
          f"cosignature(s), written to {out}; check it with: odo-verify {out} --log-key LOG_KEY.vkey")
    return 0


def cmd_log_key(args: argparse.Namespace) -> int:
    out = str(settings(args).require("out"))
    db = database(args)
    try:
        verifier = translog.verifier(db)
    finally:
        db.close()
    if args.pem:
        write_file(out, verifier.public.to_pem())
    else:
        write_file(out, (verifier.vkey + "\n").encode("utf-8"))
    print(f"log key of {verifier.name} ({verifier.id.hex()}) written to {out}"
          + (" (PEM)" if args.pem else ""))
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    db = database(args)
    try:
        cp = translog.checkpoint_now(db, now_ms())
    finally:
        db.close()
    print(json.dumps(cp) if args.json else f"checkpoint of {cp['origin']}: {cp['size']} entries, root "
          f"{cp['root']}, signed {iso(cp['t'])}, {cp['cosignatures']} cosignature(s)")
    return 0


def register(sub: Subparsers) -> None:
    p = sub.add_parser("certificate", help="write a vehicle's mileage certificate",
                       description="Write a vehicle's mileage certificate: its records and its devices' "
                                   "enrolments and decisions, their inclusion proofs and a cosigned "
                                   "checkpoint (check it with odo-verify).")
    p.add_argument("vin", metavar="VIN")
    add_db_options(p, out=True)
    add_log_origin(p)
    p.add_argument("--witness", action="append", metavar="URL",
                   help="a witness to cosign the checkpoint, when a new one is needed; repeatable")
    p.set_defaults(func=cmd_certificate)

    p = sub.add_parser("log-key", help="write the transparency log's verifier key",
                       description="Write the log's verifier key in the C2SP signed-note format "
                                   "(<origin>+<key id>+<key>), or as PEM with --pem.")
    add_db_options(p, out=True)
    add_log_origin(p)
    p.add_argument("--pem", action="store_true", help="write the bare Ed25519 public key as PEM")
    p.set_defaults(func=cmd_log_key)

    p = sub.add_parser("checkpoint", help="sign a checkpoint of the transparency log now")
    add_db_options(p, json_flag=True)
    add_log_origin(p)
    p.set_defaults(func=cmd_checkpoint)
