"""Build a vehicle's mileage certificate from the database (DESIGN §6).

The certificate holds the keys and enrolments of the devices that signed the
vehicle's accepted records, those records verbatim, an inclusion proof of each
into one freshly signed checkpoint of the transparency log, and that
checkpoint; :mod:`protocol.certificate` fixes the format and verifies it.
"""

from __future__ import annotations

import logging
from typing import Any

from backend.db import Database, Tx
from backend.errors import CertificateError
from backend.transparency import translog
from protocol import BadFormat, BadSignature, messages
from protocol import certificate as pc
from protocol.identity import VerifyKey

log = logging.getLogger(__name__)


def _enrollment(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"status": row["status"], "approved_vin": row["vin"],
                           "enrolled_at": int(row["enrolled_at"]),
                           "decided_at": None if row["decided_at"] is None else int(row["decided_at"])}
    try:
        e = messages.verify_enrollment(str(row["enrollment"]))
    except (BadFormat, BadSignature):
        return out
    out.update({"vin": e.vin, "t": e.t})
    if e.fleet_token is None:
        out["jws"] = e.jws
    else:
        out["fleet_token"] = "withheld: the signed enrolment carries the fleet's enrolment token"
    return out


def _gap_note(row: dict[str, Any] | None, vin: str) -> str:
    if row is None:
        return "not stored by the backend"
    if row["status"] != "accepted":
        return f"{row['status']}: {row['reason']}"
    if row["vin"] is None:
        return "accepted, but no VIN was read with it"
    return f"accepted, about another VIN ({row['vin']})" if row["vin"] != vin else "accepted"


def _gaps(tx: Tx, vin: str, seqs: dict[str, list[int]]) -> list[dict[str, Any]]:
    out = []
    for dev, have in sorted(seqs.items()):
        present = set(have)
        rows = {int(r["seq"]): r for r in tx.query(
            "SELECT seq, status, reason, vin FROM records WHERE dev = ? AND seq > ? AND seq < ?",
            (dev, min(have), max(have)))}
        for seq in range(min(have) + 1, max(have)):
            if seq not in present:
                out.append({"dev": dev, "seq": seq, "note": _gap_note(rows.get(seq), vin)})
    return out


def build(db: Database, vin: str, now_ms: int) -> dict[str, Any]:
    """The certificate object for ``vin``; raises :class:`CertificateError`."""
    with db.read() as tx:
        recs = tx.query("SELECT dev, seq, id, jws, clock, t_est FROM records "
                        "WHERE vin = ? AND status = 'accepted' ORDER BY dev, seq", (vin,))
        if not recs:
            raise CertificateError(f"no accepted records for VIN {vin}")
        devs = sorted({str(r["dev"]) for r in recs})
        rows = {str(d["dev"]): d for d in tx.query(
            f"SELECT * FROM devices WHERE dev IN ({', '.join('?' for _ in devs)})", devs)}
    cp = translog.checkpoint(db, now_ms)
    with db.read() as tx:
        indexes = []
        for r in recs:
            idx = translog.leaf_index(tx, str(r["id"]))
            if idx is None or idx >= cp["size"]:
                raise CertificateError(f"record seq {r['seq']} of device {r['dev']} is accepted but not in "
                                       "the transparency log")
            indexes.append(idx)
        proofs = translog.inclusion_proofs(tx, indexes, cp["size"])
        seqs: dict[str, list[int]] = {}
        for r in recs:
            seqs.setdefault(str(r["dev"]), []).append(int(r["seq"]))
        gaps = _gaps(tx, vin, seqs)
    devices = [pc.DeviceEntry(dev, VerifyKey(bytes(rows[dev]["pub"])), _enrollment(rows[dev]))
               for dev in devs]
    entries = [pc.RecordEntry(str(r["jws"]), i, tuple(p),
                              None if r["clock"] == "synced" or r["t_est"] is None else int(r["t_est"]))
               for r, i, p in zip(recs, indexes, proofs, strict=True)]
    cert = pc.build(vin, devices, entries, cp["jws"], gaps, now_ms)
    try:
        pc.verify(cert, translog.public_key(db))
    except pc.CertificateError as exc:
        raise CertificateError(f"the certificate for {vin} does not verify: {exc}") from exc
    log.info("certificate for %s: %d records from %d devices, checkpoint of %d leaves", vin, len(recs),
             len(devices), cp["size"])
    return cert


def write(db: Database, vin: str, out_path: str, now_ms: int) -> dict[str, Any]:
    """Build the certificate and write it to ``out_path``; return it."""
    cert = build(db, vin, now_ms)
    with open(out_path, "wb") as f:
        f.write(pc.encode(cert))
    return cert
