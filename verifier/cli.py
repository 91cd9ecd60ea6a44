"""``odo-verify CERT --log-key KEY``: check a mileage certificate offline.

No network and no database: the certificate file and the log's public key are
all it reads. Exit 0 when everything verifies (and say what that proves), 1 at
the first failure (named), 2 on bad usage or a file that cannot be read.
Imports :mod:`protocol` and the standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from protocol import BadFormat
from protocol import certificate as pc
from protocol.identity import VerifyKey
from protocol.records import Record

log = logging.getLogger(__name__)


def _date(t_ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(t_ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _km(metres: int) -> str:
    return f"{metres // 1000:,}.{metres % 1000:03d} km"


def _reading(r: Record, estimates: Mapping[str, int]) -> str:
    assert r.odo_m is not None
    if r.clock == "synced":
        when = _date(r.t)
    elif r.id in estimates:
        when = f"{_date(estimates[r.id])} (backend's estimate: the device clock was not synced)"
    else:
        when = f"{_date(r.t)} (device clock not synced)"
    return f"{_km(r.odo_m)} on {when} ({r.kind}, seq {r.seq} of device {r.dev})"


def _seqs(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seqs {first}-{last}"


def report(p: pc.Proven) -> list[str]:
    """What a verified certificate proves, as lines for a person."""
    lines = [f"VERIFIED: mileage certificate for VIN {p.vin}"]
    for d in p.devices:
        mine = [r for r in p.records if r.dev == d.dev]
        if not mine:
            continue
        approved = d.enrollment.get("decided_at")
        extra = f", approved {_date(int(approved))} (backend's word)" if isinstance(approved, int) else ""
        lines.append(f"  device {d.dev}: {len(mine)} records, seq {mine[0].seq} to {mine[-1].seq}{extra}")
    readings = p.readings
    if readings:
        lines.append(f"  first reading: {_reading(readings[0], p.estimates)}")
        lines.append(f"  last reading:  {_reading(readings[-1], p.estimates)}")
    lines.append(f"  records: {len(p.records)}, each signed by its device's key and included in the "
                 f"log checkpoint")
    lines.append(f"  checkpoint: {p.checkpoint.size} log entries, signed {_date(p.checkpoint.t)} by log key "
                 f"{p.checkpoint.kid}")
    if p.corrections:
        lines.append(f"  odometer: never decreases along each device's chain, but for {len(p.corrections)} "
                     f"correction(s) of at most {pc.CORRECTION_SLACK_M} m by a derived or driver's figure:")
        lines.extend(f"    {c}" for c in p.corrections)
    else:
        lines.append("  odometer: never decreases along each device's chain, nor across the vehicle's "
                     "devices in time order")
    for dev, start in sorted(p.starts.items()):
        if start > 1:
            lines.append(f"  note: device {dev}: its records before seq {start} are not in this certificate "
                         "(not about this VIN, or before it was fitted)")
    if not p.gaps:
        lines.append("  chain: unbroken between the first and last record of each device")
    for g in p.gaps:
        why = "; ".join(g.notes) if g.notes else "no reason given"
        lines.append(f"  gap: device {g.dev} {_seqs(g.first_seq, g.last_seq)} not in the certificate; "
                     f"the chain cannot be checked across it (backend says: {why})")
    lines.extend(f"  warning: {w}" for w in p.warnings)
    lines.append("  not proven: that the vehicle had no dongle besides the ones listed, nor that the log "
                 "holds no later records for this VIN than the certificate")
    return lines


def _summary(p: pc.Proven) -> dict[str, Any]:
    readings = p.readings
    first, last = (readings[0], readings[-1]) if readings else (None, None)
    return {
        "ok": True, "vin": p.vin, "devices": [d.dev for d in p.devices], "records": len(p.records),
        "first": None if first is None else {"t": first.t, "odo_m": first.odo_m, "dev": first.dev,
                                              "seq": first.seq},
        "last": None if last is None else {"t": last.t, "odo_m": last.odo_m, "dev": last.dev,
                                            "seq": last.seq},
        "checkpoint": {"size": p.checkpoint.size, "root": p.checkpoint.root_hex, "t": p.checkpoint.t,
                       "kid": p.checkpoint.kid},
        "gaps": [{"dev": g.dev, "first_seq": g.first_seq, "last_seq": g.last_seq, "notes": list(g.notes)}
                 for g in p.gaps],
        "warnings": list(p.warnings),
        "corrections": list(p.corrections),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="odo-verify", description="Verify a mileage certificate offline with the log's public key.")
    parser.add_argument("certificate", metavar="FILE", help="the certificate (JSON)")
    parser.add_argument("--log-key", required=True, metavar="FILE",
                        help="the transparency log's public key (PEM), from odo-backend log-key")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with open(args.log_key, "rb") as f:
            key_pem = f.read()
        with open(args.certificate, "rb") as f:
            data = f.read()
    except OSError as exc:
        print(f"odo-verify: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        key = VerifyKey.from_pem(key_pem)
    except BadFormat as exc:
        print(f"odo-verify: --log-key {args.log_key}: {exc}", file=sys.stderr)
        return 2
    try:
        proven = pc.verify(data, key)
    except pc.CertificateError as exc:
        if args.json:
            print(json.dumps({"ok": False, "failure": str(exc)}))
        print(f"FAILED: {exc}", file=sys.stdout if not args.json else sys.stderr)
        return 1
    if args.json:
        print(json.dumps(_summary(proven), indent=1))
    else:
        print("\n".join(report(proven)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
