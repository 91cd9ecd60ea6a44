"""The mileage certificate (DESIGN §6): build one from values, verify one offline.

A certificate is one JSON object::

    {"format": "odoledger-mileage-certificate", "v": 1, "vin": "…", "issued_at": <ms>,
     "checkpoint": "<JWS by the log key>",
     "devices": [{"dev", "pub": "<base64url raw key>",
                  "enrollment": {"vin", "t", "status", "decided_at", "jws"?}}],
     "records": [{"jws": "<record, verbatim>", "index": <leaf>, "proof": ["<hex>", …], "t_est"?}],
     "gaps":    [{"dev", "seq", "note"}]}

What a verifier can check with the log key alone: the checkpoint's signature;
every record's signature by its device's key (the device id is derived from the
key); every record's inclusion in the checkpointed tree; each device's chain of
``prev`` links between consecutive records; that the odometer never decreases
(but for corrections of at most :data:`CORRECTION_SLACK_M` by a figure that is
not the car's own, which are listed).
The enrolment, the gap notes and ``t_est`` (the backend's estimate of when a
record was taken while the device's clock was not synced) are the backend's
word: shown, not proven (an
enrolment's own signature is checked when it is included, which the backend does
only when it carries no fleet token).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol import b64, canonical, checkpoint, messages, records
from protocol.checkpoint import Checkpoint
from protocol.errors import BadFormat, BadSignature, ProtocolError
from protocol.identity import VerifyKey
from protocol.records import Record

FORMAT = "odoledger-mileage-certificate"
VERSION = 1
#: The largest certificate read: a vehicle's whole life at one record a minute fits many times over.
MAX_CERTIFICATE_BYTES = 2**30
#: A figure that is not the car's own (``derived`` from speed, or typed by the driver) may fall
#: back by this much from the device's previous one: a correction, which the backend accepts.
#: Two OBD figures may never fall.
CORRECTION_SLACK_M = 2_000
#: Between two figures read from the car (A6) by different dongles: rounding of the cluster's value.
OBD_ROUNDING_M = 100


class CertificateError(ProtocolError):
    """The certificate does not prove what it claims; the message names the first failure."""


@dataclass(frozen=True)
class DeviceEntry:
    dev: str
    pub: VerifyKey
    enrollment: Mapping[str, Any]


@dataclass(frozen=True)
class RecordEntry:
    jws: str = field(repr=False)
    index: int
    proof: tuple[bytes, ...]
    t_est: int | None = None        # the backend's estimate of when, for a device clock not synced


@dataclass(frozen=True)
class Gap:
    """Seqs of a device missing between two records of the certificate."""

    dev: str
    first_seq: int
    last_seq: int
    notes: tuple[str, ...]          # the backend's word on why, when it gives one


@dataclass(frozen=True)
class Proven:
    """What a verified certificate proves."""

    vin: str
    checkpoint: Checkpoint
    devices: tuple[DeviceEntry, ...]
    records: tuple[Record, ...]          # by device, then seq
    gaps: tuple[Gap, ...]
    starts: Mapping[str, int]                    # first seq in the certificate, per device
    warnings: tuple[str, ...]
    corrections: tuple[str, ...] = ()            # small falls of a derived or driver's figure
    estimates: Mapping[str, int] = field(default_factory=dict)   # record id -> backend's t_est (unproven)

    @property
    def readings(self) -> tuple[Record, ...]:
        """Records that state an odometer value, lowest value first."""
        with_odo = [r for r in self.records if r.odo_m is not None]
        return tuple(sorted(with_odo, key=lambda r: (r.odo_m, r.t, r.dev, r.seq)))


def build(vin: str, devices: Sequence[DeviceEntry], entries: Sequence[RecordEntry], checkpoint_jws: str,
          gaps: Sequence[Mapping[str, Any]], issued_at: int) -> dict[str, Any]:
    """Assemble a certificate object from values the backend looked up."""
    return {
        "format": FORMAT,
        "v": VERSION,
        "vin": vin,
        "issued_at": issued_at,
        "checkpoint": checkpoint_jws,
        "devices": [{"dev": d.dev, "pub": b64.encode(d.pub.raw), "enrollment": dict(d.enrollment)}
                    for d in devices],
        "records": [{"jws": e.jws, "index": e.index, "proof": [p.hex() for p in e.proof],
                     **({"t_est": e.t_est} if e.t_est is not None else {})} for e in entries],
        "gaps": [dict(g) for g in gaps],
    }


def encode(cert: Mapping[str, Any]) -> bytes:
    """The certificate as a JSON file (one record per line, for people who open it)."""
    return (json.dumps(cert, indent=1, ensure_ascii=True) + "\n").encode("ascii")


# -- verification ------------------------------------------------------------------------------


def _fail(message: str) -> CertificateError:
    return CertificateError(message)


def _get(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(f"{where}: {name} missing or of the wrong type")
    return value


def _devices(cert: Mapping[str, Any], vin: str) -> dict[str, DeviceEntry]:
    out: dict[str, DeviceEntry] = {}
    for i, item in enumerate(_get(cert, "devices", list, "certificate")):
        where = f"devices[{i}]"
        if not isinstance(item, dict):
            raise _fail(f"{where}: must be an object")
        dev = _get(item, "dev", str, where)
        try:
            pub = VerifyKey(b64.decode(_get(item, "pub", str, where), f"{where}.pub"))
        except BadFormat as exc:
            raise _fail(f"{where}: {exc}") from None
        if pub.id != dev:
            raise _fail(f"{where}: device id {dev} is not the id of its public key ({pub.id})")
        enrollment = item.get("enrollment", {})
        if not isinstance(enrollment, dict):
            raise _fail(f"{where}: enrollment must be an object")
        signed = enrollment.get("jws")
        if signed is not None:
            try:
                e = messages.verify_enrollment(signed)
            except (BadFormat, BadSignature) as exc:
                raise _fail(f"device {dev}: its enrolment does not verify ({exc})") from None
            if e.dev != dev:
                raise _fail(f"device {dev}: its enrolment is another device's ({e.dev})")
        if dev in out:
            raise _fail(f"device {dev}: listed twice")
        out[dev] = DeviceEntry(dev, pub, enrollment)
    if not out:
        raise _fail("certificate: no devices")
    return out


def _records(cert: Mapping[str, Any], vin: str, devices: Mapping[str, DeviceEntry],
             cp: Checkpoint, estimates: dict[str, int]) -> list[Record]:
    out: list[Record] = []
    seen: set[tuple[str, int]] = set()
    for i, item in enumerate(_get(cert, "records", list, "certificate")):
        where = f"records[{i}]"
        if not isinstance(item, dict):
            raise _fail(f"{where}: must be an object")
        text = _get(item, "jws", str, where)
        index = _get(item, "index", int, where)
        try:
            parts = records.open_unverified(text)
        except BadFormat as exc:
            raise _fail(f"{where}: not a record ({exc})") from None
        device = devices.get(parts.kid)
        if device is None:
            raise _fail(f"{where}: signed by device {parts.kid}, which the certificate does not list")
        try:
            record = records.verify(parts, device.pub)
        except BadSignature:
            raise _fail(f"{where}: the signature of device {parts.kid} does not verify") from None
        except BadFormat as exc:
            raise _fail(f"{where}: {exc}") from None
        label = f"record seq {record.seq} of device {record.dev}"
        if record.vin != vin:
            raise _fail(f"{label}: is about VIN {record.vin}, not {vin}")
        if (record.dev, record.seq) in seen:
            raise _fail(f"{label}: appears twice")
        seen.add((record.dev, record.seq))
        raw_proof = _get(item, "proof", list, where)
        try:
            proof = [bytes.fromhex(p) for p in raw_proof]
        except (TypeError, ValueError):
            raise _fail(f"{label}: its inclusion proof is not a list of hex hashes") from None
        if any(len(p) != 32 for p in proof):
            raise _fail(f"{label}: its inclusion proof has a hash that is not 32 bytes")
        try:
            checkpoint.verify_inclusion(cp, index, text.encode("ascii"), proof)
        except BadFormat as exc:
            raise _fail(f"{label}: {exc}") from None
        t_est = item.get("t_est")
        if isinstance(t_est, int) and not isinstance(t_est, bool) and record.clock != "synced":
            estimates[record.id] = t_est
        out.append(record)
    if not out:
        raise _fail("certificate: no records")
    out.sort(key=lambda r: (r.dev, r.seq))
    return out


def _gap_notes(cert: Mapping[str, Any]) -> dict[tuple[str, int], str]:
    notes: dict[tuple[str, int], str] = {}
    raw = cert.get("gaps", [])
    if not isinstance(raw, list):
        raise _fail("certificate: gaps must be a list")
    for item in raw:
        if (isinstance(item, dict) and isinstance(item.get("dev"), str) and isinstance(item.get("seq"), int)
                and isinstance(item.get("note"), str)):
            notes[(item["dev"], item["seq"])] = item["note"]
    return notes


def _source(r: Record) -> str | None:
    src = r.fields.get("src")
    return src if isinstance(src, str) else ("driver" if r.kind == "confirmation" else None)


def _chains(recs: Sequence[Record], notes: Mapping[tuple[str, int], str], estimates: Mapping[str, int]
            ) -> tuple[list[Gap], dict[str, int], list[str], list[str]]:
    gaps: list[Gap] = []
    starts: dict[str, int] = {}
    warnings: list[str] = []
    corrections: list[str] = []
    last: dict[str, Record] = {}
    reading: dict[str, Record] = {}
    for r in recs:
        before = last.get(r.dev)
        label = f"record seq {r.seq} of device {r.dev}"
        if before is None:
            starts[r.dev] = r.seq
        elif r.seq == before.seq + 1:
            if r.prev != before.id:
                raise _fail(f"{label}: chain broken: prev is not the id of seq {before.seq}")
        else:
            missing = range(before.seq + 1, r.seq)
            said = tuple(sorted({notes[(r.dev, s)] for s in missing if (r.dev, s) in notes}))
            gaps.append(Gap(r.dev, before.seq + 1, r.seq - 1, said))
        prior = reading.get(r.dev)
        if r.odo_m is not None:
            if prior is not None and prior.odo_m is not None and r.odo_m < prior.odo_m:
                drop = prior.odo_m - r.odo_m
                both_obd = _source(r) == "obd" and _source(prior) == "obd"
                if both_obd or drop > CORRECTION_SLACK_M:
                    raise _fail(f"{label}: the odometer goes back from {prior.odo_m} m (seq {prior.seq}) "
                                f"to {r.odo_m} m")
                corrections.append(f"{label}: {_source(r)} figure {r.odo_m} m corrects the "
                                   f"{_source(prior)} figure {prior.odo_m} m of seq {prior.seq} by {drop} m")
            reading[r.dev] = r
        last[r.dev] = r
    # Across the vehicle's devices, in time order: the odometer of the car never goes back.
    timed = sorted(((r.t if r.clock == "synced" else estimates[r.id], r) for r in recs
                    if r.odo_m is not None and (r.clock == "synced" or r.id in estimates)),
                   key=lambda tr: (tr[0], tr[1].dev, tr[1].seq))
    top: Record | None = None
    for _, r in timed:
        assert r.odo_m is not None
        if top is not None and top.odo_m is not None and r.dev != top.dev:
            both_obd = _source(r) == "obd" and _source(top) == "obd"
            if r.odo_m < top.odo_m - (OBD_ROUNDING_M if both_obd else CORRECTION_SLACK_M):
                raise _fail(f"record seq {r.seq} of device {r.dev}: the vehicle's odometer goes back from "
                            f"{top.odo_m} m (device {top.dev} seq {top.seq}) to {r.odo_m} m")
        if top is None or (top.odo_m is not None and r.odo_m >= top.odo_m):
            top = r
    return gaps, starts, warnings, corrections


def verify(data: bytes | str | Mapping[str, Any], log_key: VerifyKey) -> Proven:
    """Verify a certificate offline; raise :class:`CertificateError` naming the first failure."""
    if isinstance(data, Mapping):
        cert: Mapping[str, Any] = data
    else:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        try:
            cert = canonical.loads_object(raw, "certificate", max_bytes=MAX_CERTIFICATE_BYTES)
        except BadFormat as exc:
            raise _fail(str(exc)) from None
    if cert.get("format") != FORMAT or cert.get("v") != VERSION:
        raise _fail(f"certificate: not an {FORMAT} version {VERSION}")
    vin = _get(cert, "vin", str, "certificate")
    try:
        cp = checkpoint.verify(_get(cert, "checkpoint", str, "certificate"), log_key)
    except BadSignature:
        raise _fail("checkpoint: the log key's signature does not verify") from None
    except BadFormat as exc:
        raise _fail(str(exc) if str(exc).startswith("checkpoint") else f"checkpoint: {exc}") from None
    devices = _devices(cert, vin)
    estimates: dict[str, int] = {}
    recs = _records(cert, vin, devices, cp, estimates)
    gaps, starts, warnings, corrections = _chains(recs, _gap_notes(cert), estimates)
    unused = sorted(set(devices) - {r.dev for r in recs})
    warnings.extend(f"device {d} is listed but signed none of the records" for d in unused)
    return Proven(vin, cp, tuple(devices.values()), tuple(recs), tuple(gaps), starts, tuple(warnings),
                  tuple(corrections), estimates)
