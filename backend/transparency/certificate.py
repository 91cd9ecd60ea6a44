"""Build a vehicle's mileage certificate from the database (docs/certificate.md).

The certificate holds the log entries of the vehicle: its accepted records, verbatim, and the
enrolments and decisions of every device it has had; an inclusion proof of each into one
checkpoint, the most cosigned that covers them all (a new one is signed, and pushed to the
witnesses given, when none does); and the backend's annotations, signed by the log key.
:mod:`protocol.certificate` fixes the format and verifies it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from backend.db import Database, Tx
from backend.errors import CertificateError
from backend.records import device_log
from backend.transparency import translog, witnesses
from protocol import certificate as pc

log = logging.getLogger(__name__)


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


def _indexes(db: Database, vin: str) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    translog.integrate_all(db)         # entries stored a moment ago get their leaf indexes now
    with db.read() as tx:
        recs = tx.query("SELECT dev, seq, id, clock, t_est FROM records "
                        "WHERE vin = ? AND status = 'accepted' ORDER BY dev, seq", (vin,))
        if not recs:
            raise CertificateError(f"no accepted records for VIN {vin}")
        record_indexes = []
        for r in recs:
            idx = translog.leaf_index(tx, str(r["id"]))
            if idx is None:
                raise CertificateError(f"record seq {r['seq']} of device {r['dev']} is accepted but not in "
                                       "the transparency log")
            record_indexes.append(idx)
        device_indexes = device_log.entries_for_vin(tx, vin)
    return recs, record_indexes, device_indexes


def build(db: Database, vin: str, now_ms: int, witness_urls: Sequence[str] = ()) -> dict[str, Any]:
    """The certificate object for ``vin``; raises :class:`CertificateError`. The sequencer is
    run first, so every entry stored so far has its leaf index. When no checkpoint
    that covers its entries is cosigned by every witness (``witness_urls``, or else those the
    daemon pushes to), a new one is signed and pushed to them first."""
    recs, record_indexes, device_indexes = _indexes(db, vin)
    indexes = sorted({*record_indexes, *device_indexes})
    with db.read() as tx:
        cp = translog.best_checkpoint(tx, indexes[-1] + 1)
        if not witness_urls:        # the witnesses ``odo-backend run`` pushes to
            witness_urls = [str(r["witness"]) for r in tx.query("SELECT witness FROM log_witnesses "
                                                                 "ORDER BY witness")]
    if cp is None or (witness_urls and cp["cosignatures"] < len(witness_urls)):
        fresh = translog.checkpoint(db, now_ms)
        witnesses.push_all(db, witness_urls, now_ms)
        with db.read() as tx:
            cp = translog.checkpoint_at(tx, int(fresh["size"]))
    assert cp is not None
    size = int(cp["size"])
    with db.read() as tx:
        proofs = translog.inclusion_proofs(tx, indexes, size)
        leaves = {int(r["idx"]): bytes(r["entry"]) for n in range(0, len(indexes), 500) for r in tx.query(
            f"SELECT idx, entry FROM translog WHERE idx IN ({', '.join('?' for _ in indexes[n:n + 500])})",
            indexes[n:n + 500])}
        seqs: dict[str, list[int]] = {}
        for r in recs:
            seqs.setdefault(str(r["dev"]), []).append(int(r["seq"]))
        gaps = _gaps(tx, vin, seqs)
    t_est = {str(r["id"]): int(r["t_est"]) for r in recs if r["clock"] != "synced" and r["t_est"] is not None}
    with db.write() as tx:
        key = translog.signing_key(tx)
    annotations = pc.sign_annotations(key, vin, now_ms, size, t_est, gaps)
    cert = pc.build(vin, str(cp["origin"]), str(cp["note"]),
                    [(i, leaves[i], p) for i, p in zip(indexes, proofs, strict=True)], annotations)
    try:
        pc.verify(cert, translog.verifier(db))
    except pc.CertificateError as exc:
        raise CertificateError(f"the certificate for {vin} does not verify: {exc}") from None
    log.info("certificate for %s: %d records and %d device entries, checkpoint of %d entries with %d "
             "cosignature(s)", vin, len(recs), len(device_indexes), size, cp["cosignatures"])
    return cert
