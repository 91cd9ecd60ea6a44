"""The mileage certificate (docs/certificate.md): build one from log entries, verify one offline.

A certificate is one JSON file, in exactly the encoding :func:`encode` gives::

    {"format": "odoledger-mileage-certificate", "v": 2, "vin": "…",
     "log": {"origin": "…", "checkpoint": "<c2sp.org/tlog-checkpoint note, cosignatures and all>"},
     "entries": [{"index": <leaf>, "leaf": "<the log entry>", "proof": ["<hex>", …]}, …],
     "annotations": {"v": 1, "vin", "issued_at", "size", "t_est": {…}, "gaps": [{"dev", "seq", "note"}],
                     "signature": "<base64url: the log key's>"}}

Everything in it is either an entry of the log, proven included in the checkpoint (the
vehicle's records, and the signed enrolments and logged decisions of its devices), or the
checkpoint itself, signed by the log and cosigned by witnesses, or the annotations: the
backend's word (when a record of an unsynced clock was taken; why seqs are missing), signed by
the log key so that it cannot be changed, but not proven. Unknown members are refused, and a
file not in its canonical encoding is refused, so a changed byte anywhere fails.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from protocol import b64, canonical, certificate_fast, jws, merkle, messages, note, records
from protocol.certificate_fast import FastEntry, Signatures
from protocol.checkpoint import NoteCheckpoint, log_verifier, open_note
from protocol.errors import BadFormat, BadSignature, ProtocolError
from protocol.identity import DEV_RE, VIN_RE, SigningKey, VerifyKey
from protocol.messages import Enrollment
from protocol.records import Record

FORMAT = "odoledger-mileage-certificate"
VERSION = 2
#: The largest certificate read: a vehicle's whole life at one record a minute fits many times over.
MAX_CERTIFICATE_BYTES = 2**30
MAX_ENTRIES = 4_000_000
MAX_PROOF = 64
MAX_ENTRY_BYTES = 65535
MAX_NOTE_CHARS = 200
#: A figure that is not the car's own (``derived`` from speed, or typed by the driver) may fall
#: back by this much from the device's previous one: a correction, which the backend accepts.
#: Two OBD figures may never fall.
CORRECTION_SLACK_M = 2_000
#: Between two figures read from the car (A6) by different dongles: rounding of the cluster's value.
OBD_ROUNDING_M = 100
#: What the log key signs to vouch for the annotations (never a checkpoint: that has no brace).
ANNOTATIONS_CONTEXT = b"odoledger certificate annotations v1\n"
DECISIONS = ("approve", "revoke", "retire", "clear")
_TOP = {"format", "v", "vin", "log", "entries", "annotations"}
_LOG = {"origin", "checkpoint"}
_ENTRY = {"index", "leaf", "proof"}
_ANNOTATIONS = {"v", "vin", "issued_at", "size", "t_est", "gaps", "signature"}
_GAP = {"dev", "seq", "note"}
_ENROLMENT = {"entry", "enrolment", "at"}
_DECISION = {"entry", "action", "dev", "vin", "by", "at", "replaces"}
_RECORD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_INT = 2**53 - 1


class CertificateError(ProtocolError):
    """The certificate does not prove what it claims; the message names the first failure."""


# -- the log entries a certificate holds ------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """An operator's (or a fleet token's) logged decision on a device."""

    index: int
    action: str
    dev: str
    vin: str | None
    by: str
    at: int
    replaces: str | None


@dataclass(frozen=True)
class Enrolled:
    """A device's self-signed enrolment, as logged at ``index``."""

    index: int
    enrollment: Enrollment
    at: int


@dataclass(frozen=True)
class Device:
    dev: str
    pub: VerifyKey
    enrolments: tuple[Enrolled, ...]
    decisions: tuple[Decision, ...]


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
    checkpoint: NoteCheckpoint
    devices: tuple[Device, ...]
    records: tuple[Record, ...]          # by device, then seq
    indexes: Mapping[str, int]           # record id -> its leaf index
    gaps: tuple[Gap, ...]
    starts: Mapping[str, int]                    # first seq in the certificate, per device
    warnings: tuple[str, ...]
    corrections: tuple[str, ...] = ()            # small falls of a derived or driver's figure
    estimates: Mapping[str, int] = field(default_factory=dict)   # record id -> backend's t_est (unproven)
    issued_at: int = 0
    ignored_signatures: int = 0          # signature lines on the checkpoint from keys not given: unchecked

    @property
    def readings(self) -> tuple[Record, ...]:
        """Records that state an odometer value, lowest value first."""
        with_odo = [r for r in self.records if r.odo_m is not None]
        return tuple(sorted(with_odo, key=lambda r: (r.odo_m, r.t, r.dev, r.seq)))


# -- building ---------------------------------------------------------------------------------

def _annotations_message(body: Mapping[str, Any]) -> bytes:
    return ANNOTATIONS_CONTEXT + canonical.dumps(dict(body))


def sign_annotations(key: SigningKey, vin: str, issued_at: int, size: int, t_est: Mapping[str, int],
                     gaps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The annotations object, signed by the log key."""
    body: dict[str, Any] = {"v": 1, "vin": vin, "issued_at": issued_at, "size": size, "t_est": dict(t_est),
                            "gaps": [{"dev": g["dev"], "seq": g["seq"], "note": g["note"][:MAX_NOTE_CHARS]}
                                     for g in gaps]}
    return {**body, "signature": b64.encode(key.sign(_annotations_message(body)))}


def build(vin: str, origin: str, checkpoint_note: str, entries: Sequence[tuple[int, bytes, Sequence[bytes]]],
          annotations: Mapping[str, Any]) -> dict[str, Any]:
    """Assemble a certificate from the log's entries ``(index, entry, proof)`` and the rest."""
    return {
        "format": FORMAT, "v": VERSION, "vin": vin,
        "log": {"origin": origin, "checkpoint": checkpoint_note},
        "entries": [{"index": i, "leaf": e.decode("utf-8"), "proof": [p.hex() for p in proof]}
                    for i, e, proof in sorted(entries, key=lambda x: x[0])],
        "annotations": dict(annotations),
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True, ensure_ascii=True)


_quote = json.encoder.encode_basestring_ascii    # what json.dumps writes a string with


def _entry_text(entry: Any) -> str:
    """An entry as :func:`_dumps` writes it two levels in; an entry of the usual shape directly."""
    if type(entry) is dict and len(entry) == 3:
        index, leaf, proof = entry.get("index"), entry.get("leaf"), entry.get("proof")
        if type(index) is int and type(leaf) is str and type(proof) is list:
            try:
                hashes = ",\n    ".join(map(_quote, proof))    # TypeError unless strings
            except TypeError:
                pass
            else:
                listed = f"[\n    {hashes}\n   ]" if proof else "[]"
                return f'{{\n   "index": {index},\n   "leaf": {_quote(leaf)},\n   "proof": {listed}\n  }}'
    return _dumps(entry).replace("\n", "\n  ")


def encode(cert: Mapping[str, Any]) -> bytes:
    """The certificate's one encoding (an entry a line or so, for people who open it): that of
    ``json.dumps(cert, indent=1, sort_keys=True, ensure_ascii=True)`` and a newline.

    json's indented encoder is pure Python; the entries, nearly all of a certificate, are written
    here directly in the same form (a value's text n levels in is its text alone with n spaces
    after each newline: no string in it holds a newline)."""
    if type(cert) is not dict or not cert or not all(type(k) is str for k in cert):
        return (_dumps(cert) + "\n").encode("ascii")
    parts = ["{"]
    for n, key in enumerate(sorted(cert)):
        value = cert[key]
        parts.append(f'{"," if n else ""}\n {_quote(key)}: ')
        if key == "entries" and type(value) is list and value:
            parts.append("[\n  ")
            parts.append(",\n  ".join([_entry_text(e) for e in value]))
            parts.append("\n ]")
        else:
            parts.append(_dumps(value).replace("\n", "\n "))
    parts.append("\n}\n")
    return "".join(parts).encode("ascii")


# -- verification -----------------------------------------------------------------------------

def _fail(message: str) -> CertificateError:
    return CertificateError(message)


def _members(obj: object, allowed: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise _fail(f"{where}: must be an object")
    try:
        canonical.check_members(obj, allowed, where)
    except BadFormat as exc:
        raise _fail(str(exc)) from None
    return obj


def _int(obj: Mapping[str, Any], name: str, where: str, high: int = _MAX_INT) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise _fail(f"{where}: {name} must be an integer from 0 to {high}")
    return value


def _str(obj: Mapping[str, Any], name: str, where: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise _fail(f"{where}: {name} must be a string")
    return value


def _hashes(proof: object) -> bytes | None:
    """A proof's hashes, concatenated; None unless it is a list of at most MAX_PROOF strings, each
    64 lowercase hex. (Joined by newlines, n strings make 65n - 1 characters of n such hashes
    only if no string holds a newline and each is one hash.)"""
    if not isinstance(proof, list) or len(proof) > MAX_PROOF:
        return None
    if not proof:
        return b""
    try:
        lines = "\n".join(proof)
    except TypeError:           # not all strings
        return None
    if len(lines) != 65 * len(proof) - 1:
        return None
    try:
        raw = bytes.fromhex(lines)      # which skips whitespace, and reads capitals ...
    except ValueError:
        return None
    if raw.hex("\n", 32) != lines:     # ... so: each line 32 bytes in lowercase hex, and nothing else
        return None
    return raw


_Classified = tuple[list[tuple[int, jws.Compact]], list[Enrolled], list[Decision]]


def _entries(raw: object, fast: Sequence[FastEntry] | None, cp: NoteCheckpoint, checks: Signatures
             ) -> _Classified:
    """Every entry proven included in the checkpoint (the first that is not fails), then told
    apart (:func:`_classify`: the first that is none of a certificate's kinds fails). A record of
    a device enrolled in an entry before it has its signature checked ahead by ``checks``."""
    if fast is None and (not isinstance(raw, list) or not raw):
        raise _fail("certificate: entries must be a non-empty list")
    count = len(fast) if fast is not None else len(raw) if isinstance(raw, list) else 0
    if count > MAX_ENTRIES:
        raise _fail(f"certificate: more than {MAX_ENTRIES} entries")
    walker = merkle.InclusionWalker(cp.size)
    classified: _Classified = ([], [], [])
    keys: dict[str, VerifyKey] = {}         # each device's key, from its first enrolment so far
    unclassified: CertificateError | None = None
    last = -1
    for n in range(count):
        where = f"entries[{n}]"
        proof: bytes | None
        if fast is not None:
            index, data, proof = fast[n]
            if index > _MAX_INT:
                raise _fail(f"{where}: index must be an integer from 0 to {_MAX_INT}")
        else:
            assert isinstance(raw, list)
            obj = _members(raw[n], _ENTRY, where)
            index = _int(obj, "index", where)
        if index >= cp.size:
            raise _fail(f"{where}: index {index} is outside the checkpoint's {cp.size} entries")
        if index <= last:
            raise _fail(f"{where}: entries must be in ascending index order, each once")
        if fast is None:
            data = _str(obj, "leaf", where).encode("utf-8", "surrogatepass")
        if len(data) > MAX_ENTRY_BYTES:
            raise _fail(f"{where}: an entry of more than {MAX_ENTRY_BYTES} bytes")
        if fast is None:
            proof = _hashes(obj["proof"])
        if proof is None or len(proof) > 32 * MAX_PROOF:
            raise _fail(f"{where}: proof must be a list of at most {MAX_PROOF} hashes, each 64 lowercase hex")
        try:
            certificate_fast.check_inclusion(walker, cp.root, index, data, proof)
        except BadFormat as exc:
            raise _fail(f"{where}: not included in the checkpoint ({exc})") from None
        last = index
        if unclassified is None:
            try:
                _classify(index, data, classified, keys, checks)
            except CertificateError as exc:
                unclassified = exc      # raised once every entry is proven included
    if unclassified is not None:
        raise unclassified
    return classified


def _decision(obj: Mapping[str, Any], index: int, where: str) -> Decision:
    _members(obj, _DECISION, where)
    action, dev, vin, by, replaces = (obj.get(k) for k in ("action", "dev", "vin", "by", "replaces"))
    if action not in DECISIONS:
        raise _fail(f"{where}: action must be one of {', '.join(DECISIONS)}")
    if not isinstance(dev, str) or not DEV_RE.fullmatch(dev):
        raise _fail(f"{where}: dev must be a device id")
    if vin is not None and (not isinstance(vin, str) or not VIN_RE.fullmatch(vin)):
        raise _fail(f"{where}: vin must be a VIN or null")
    if not isinstance(by, str) or not 1 <= len(by) <= 200:
        raise _fail(f"{where}: by must be a string of 1 to 200 characters")
    if replaces is not None and (not isinstance(replaces, str) or not DEV_RE.fullmatch(replaces)):
        raise _fail(f"{where}: replaces must be a device id or null")
    return Decision(index, str(action), dev, vin, by, _int(obj, "at", where), replaces)


def _classify(index: int, data: bytes, classified: _Classified, keys: dict[str, VerifyKey],
              checks: Signatures) -> None:
    """Add the entry logged at ``index`` to the records, enrolments or decisions."""
    recs, enrolled, decisions = classified
    where = f"entry {index}"
    if not data.startswith(b"{"):
        try:
            parts = records.open_unverified(data)
        except BadFormat as exc:
            raise _fail(f"{where}: not a record ({exc})") from None
        recs.append((index, parts))
        key = keys.get(parts.kid)
        if key is not None:
            checks.add(index, key, parts)
        return
    try:
        obj = canonical.loads_object(data, where)
        if canonical.dumps(obj) != data:
            raise BadFormat(f"{where}: not in canonical JSON")
    except BadFormat as exc:
        raise _fail(str(exc)) from None
    kind = obj.get("entry")
    if kind == "enrolment":
        _members(obj, _ENROLMENT, where)
        try:
            e = messages.verify_enrollment(_str(obj, "enrolment", where))
        except (BadFormat, BadSignature) as exc:
            raise _fail(f"{where}: the device's enrolment does not verify ({exc})") from None
        enrolled.append(Enrolled(index, e, _int(obj, "at", where)))
        keys.setdefault(e.dev, e.pub)
    elif kind == "decision":
        decisions.append(_decision(obj, index, where))
    else:
        raise _fail(f"{where}: a {kind!r} entry, which a certificate does not hold")


def _devices(enrolled: Sequence[Enrolled], decisions: Sequence[Decision]) -> dict[str, Device]:
    keys: dict[str, VerifyKey] = {}
    for e in enrolled:
        keys.setdefault(e.enrollment.dev, e.enrollment.pub)
    for d in decisions:
        if d.dev not in keys:
            raise _fail(f"entry {d.index}: a decision on device {d.dev}, whose enrolment the certificate "
                        "does not hold")
    return {dev: Device(dev, pub, tuple(e for e in enrolled if e.enrollment.dev == dev),
                        tuple(d for d in decisions if d.dev == dev)) for dev, pub in sorted(keys.items())}


class _Authority:
    """What :func:`_authorised` reads of a device, found in one step for each record."""

    def __init__(self, device: Device) -> None:
        self.enrolled = min((e.index for e in device.enrolments), default=None)
        self.standing = [d for d in device.decisions if d.action != "clear"]     # by index
        self.at = [d.index for d in self.standing]


def _authorised(authority: _Authority, index: int, vin: str, label: str) -> None:
    """The record logged at ``index`` came after its device's enrolment and an approval for
    ``vin``, with no revocation or retirement between."""
    if authority.enrolled is None or authority.enrolled >= index:
        raise _fail(f"{label}: logged before its device enrolled")
    n = bisect.bisect_left(authority.at, index)        # the decisions logged before the record
    if not n or authority.standing[n - 1].action != "approve":
        state = "never approved" if not n else \
            f"{authority.standing[n - 1].action}d at entry {authority.standing[n - 1].index}"
        raise _fail(f"{label}: logged while its device was {state}")
    if authority.standing[n - 1].vin not in (vin, None):
        raise _fail(f"{label}: logged while its device was approved for VIN {authority.standing[n - 1].vin}, "
                    f"not {vin}")


def _records(recs: Sequence[tuple[int, jws.Compact]], devices: Mapping[str, Device], vin: str,
             indexes: dict[str, int]) -> tuple[list[Record], CertificateError | None, int]:
    """The records, checked in order but for their signatures (checked ahead meanwhile: see
    :func:`_signed`); the first failure, if any; and how many records' signatures come before
    it (the signature of a record is checked before everything but its device's enrolment)."""
    out: list[Record] = []
    seen: set[tuple[str, int]] = set()
    keyed = {dev for dev, d in devices.items() if d.pub.id == dev}      # records.verify's check
    authorities = {dev: _Authority(d) for dev, d in devices.items()}
    for n, (index, parts) in enumerate(recs):
        where = f"entry {index}"
        device = devices.get(parts.kid)
        if device is None:
            return out, _fail(f"{where}: a record of device {parts.kid}, whose enrolment the certificate "
                              "does not hold"), n
        if parts.kid not in keyed:
            return out, _fail(f"{where}: jws header: kid does not match the key"), n
        try:
            # records.verify, but for the signature: the same payload, read the same way
            record = records.assemble(parts.text, records.read_payload(parts))
        except BadFormat as exc:
            return out, _fail(f"{where}: {exc}"), n + 1
        label = f"record seq {record.seq} of device {record.dev}"
        try:
            if record.vin != vin:
                raise _fail(f"{label}: is about VIN {record.vin}, not {vin}")
            if (record.dev, record.seq) in seen:
                raise _fail(f"{label}: appears twice")
            _authorised(authorities[device.dev], index, vin, label)
        except CertificateError as exc:
            return out, exc, n + 1
        seen.add((record.dev, record.seq))
        indexes[record.id] = index
        out.append(record)
    if not out:
        return out, _fail("certificate: no records"), len(recs)
    out.sort(key=lambda r: (r.dev, r.seq))
    return out, None, len(recs)


def _signed(recs: Sequence[tuple[int, jws.Compact]], devices: Mapping[str, Device], checks: Signatures
            ) -> None:
    """Raise for the first of ``recs`` that its device did not sign."""
    for index, parts in recs:
        if not checks.verifies(index, devices[parts.kid].pub, parts):
            raise _fail(f"entry {index}: the signature of device {parts.kid} does not verify")


def _annotations(raw: object, log_key: VerifyKey, vin: str, cp: NoteCheckpoint, recs: Sequence[Record]
                 ) -> tuple[int, dict[str, int], dict[tuple[str, int], str]]:
    obj = _members(raw, _ANNOTATIONS, "annotations")
    body = {k: v for k, v in obj.items() if k != "signature"}
    try:
        signature = b64.decode(_str(obj, "signature", "annotations"), "annotations signature")
        log_key.verify(signature, _annotations_message(body))
    except (BadFormat, BadSignature):
        raise _fail("annotations: the log key's signature does not verify") from None
    if obj["v"] != 1:
        raise _fail("annotations: v must be 1")
    if obj["vin"] != vin:
        raise _fail(f"annotations: made for VIN {str(obj['vin'])[:20]}, not {vin}")
    if _int(obj, "size", "annotations") != cp.size:
        raise _fail(f"annotations: made for a checkpoint of {obj['size']} entries, not {cp.size}")
    issued_at = _int(obj, "issued_at", "annotations")
    unsynced = {r.id for r in recs if r.clock != "synced"}
    t_est = obj["t_est"]
    if not isinstance(t_est, dict):
        raise _fail("annotations: t_est must be an object")
    estimates: dict[str, int] = {}
    for rid in t_est:
        if not _RECORD_ID.fullmatch(rid) or rid not in unsynced:
            raise _fail(f"annotations: t_est for {rid[:70]!r}, not a record of this certificate with an "
                        "unsynced clock")
        estimates[rid] = _int(t_est, rid, "annotations t_est")
    gaps = obj["gaps"]
    if not isinstance(gaps, list):
        raise _fail("annotations: gaps must be a list")
    notes: dict[tuple[str, int], str] = {}
    for n, item in enumerate(gaps):
        g = _members(item, _GAP, f"annotations gaps[{n}]")
        dev = _str(g, "dev", f"annotations gaps[{n}]")
        text = _str(g, "note", f"annotations gaps[{n}]")
        if not DEV_RE.fullmatch(dev) or len(text) > MAX_NOTE_CHARS:
            raise _fail(f"annotations gaps[{n}]: a device id and a note of at most {MAX_NOTE_CHARS} "
                        "characters")
        notes[(dev, _int(g, "seq", f"annotations gaps[{n}]"))] = text
    return issued_at, estimates, notes


def _source(r: Record) -> str | None:
    src = r.fields.get("src")
    return src if isinstance(src, str) else ("driver" if r.kind == "confirmation" else None)


def _chains(recs: Sequence[Record], notes: Mapping[tuple[str, int], str], estimates: Mapping[str, int]
            ) -> tuple[list[Gap], dict[str, int], list[str]]:
    gaps: list[Gap] = []
    starts: dict[str, int] = {}
    corrections: list[str] = []
    last: dict[str, Record] = {}
    reading: dict[str, tuple[Record, int]] = {}     # each device's last record with a figure, and it
    odos = [r.odo_m for r in recs]
    for r, odo in zip(recs, odos, strict=True):
        before = last.get(r.dev)
        if before is None:
            starts[r.dev] = r.seq
        elif r.seq == before.seq + 1:
            if r.prev != before.id:
                raise _fail(f"record seq {r.seq} of device {r.dev}: chain broken: prev is not the id of seq "
                            f"{before.seq}")
        else:
            missing = range(before.seq + 1, r.seq)
            said = tuple(sorted({notes[(r.dev, s)] for s in missing if (r.dev, s) in notes}))
            gaps.append(Gap(r.dev, before.seq + 1, r.seq - 1, said))
        if odo is not None:
            prior = reading.get(r.dev)
            if prior is not None and odo < prior[1]:
                label = f"record seq {r.seq} of device {r.dev}"
                p, prior_odo = prior
                drop = prior_odo - odo
                both_obd = _source(r) == "obd" and _source(p) == "obd"
                if both_obd or drop > CORRECTION_SLACK_M:
                    raise _fail(f"{label}: the odometer goes back from {prior_odo} m (seq {p.seq}) to "
                                f"{odo} m")
                corrections.append(f"{label}: {_source(r)} figure {odo} m corrects the "
                                   f"{_source(p)} figure {prior_odo} m of seq {p.seq} by {drop} m")
            reading[r.dev] = (r, odo)
        last[r.dev] = r
    # Across the vehicle's devices, in time order: the odometer of the car never goes back.
    timed = sorted(((r.t if r.clock == "synced" else estimates[r.id], r.dev, r.seq, odo, r)
                    for r, odo in zip(recs, odos, strict=True)
                    if odo is not None and (r.clock == "synced" or r.id in estimates)),
                   key=lambda tr: tr[:3])
    top: tuple[Record, int] | None = None
    for _, _, _, odo, r in timed:
        if top is not None and r.dev != top[0].dev:
            both_obd = _source(r) == "obd" and _source(top[0]) == "obd"
            if odo < top[1] - (OBD_ROUNDING_M if both_obd else CORRECTION_SLACK_M):
                raise _fail(f"record seq {r.seq} of device {r.dev}: the vehicle's odometer goes back from "
                            f"{top[1]} m (device {top[0].dev} seq {top[0].seq}) to {odo} m")
        if top is None or odo >= top[1]:
            top = (r, odo)
    return gaps, starts, corrections


def _load(data: bytes | str | Mapping[str, Any]) -> tuple[Mapping[str, Any], list[FastEntry] | None]:
    """The certificate, and its entries if they were read on their own (then ``entries`` is
    empty in the certificate); refused unless in its one encoding."""
    if isinstance(data, Mapping):
        return data, None
    raw = data.encode("utf-8") if isinstance(data, str) else data
    split = certificate_fast.split_encoded(raw) if len(raw) <= MAX_CERTIFICATE_BYTES else None
    if split is not None:
        # The entries each as the one encoding writes one: if the rest is in it too, so is the
        # whole. Otherwise the whole is read below, and what is wrong named.
        rest, entries = split
        try:
            cert = canonical.loads_object(rest, "certificate", max_bytes=MAX_CERTIFICATE_BYTES)
        except BadFormat:
            pass
        else:
            if cert.get("format") == FORMAT and cert.get("v") == VERSION and encode(cert) == rest:
                return cert, entries
    try:
        cert = canonical.loads_object(raw, "certificate", max_bytes=MAX_CERTIFICATE_BYTES)
    except BadFormat as exc:
        raise _fail(str(exc)) from None
    if cert.get("format") != FORMAT or cert.get("v") != VERSION:
        raise _fail(f"certificate: not an {FORMAT} version {VERSION}")
    if encode(cert) != raw:
        raise _fail("certificate: not in its one encoding (a byte was changed, or the file was rewritten)")
    return cert, None


def verify(data: bytes | str | Mapping[str, Any], log_key: note.Verifier | VerifyKey,
           witnesses: Sequence[note.Verifier] = (), quorum: int = 0, *, executor: Executor | None = None
           ) -> Proven:
    """Verify a certificate offline, with the log's key (a note verifier key, whose name must be
    the certificate's origin, or a bare key) and ``quorum`` of ``witnesses``' cosignatures;
    raise :class:`CertificateError` naming the first failure. With ``executor``, the records'
    signatures are checked there (:func:`protocol.certificate_fast.check_chunk`) while the rest
    is; the answer is the same."""
    loaded, fast = _load(data)
    cert = _members(loaded, _TOP, "certificate")
    if cert["format"] != FORMAT or cert["v"] != VERSION:
        raise _fail(f"certificate: not an {FORMAT} version {VERSION}")
    vin = _str(cert, "vin", "certificate")
    if not VIN_RE.fullmatch(vin):
        raise _fail("certificate: vin is not a VIN")
    log = _members(cert["log"], _LOG, "log")
    origin = _str(log, "origin", "log")
    if isinstance(log_key, note.Verifier):
        if log_key.name != origin:
            raise _fail(f"log: the certificate is of log {origin!r}; the key given is of log "
                        f"{log_key.name!r}")
        verifier = log_key
    else:
        try:
            verifier = log_verifier(origin, log_key)
        except BadFormat as exc:
            raise _fail(f"log: origin {exc}") from None
    try:
        cp = open_note(_str(log, "checkpoint", "log"), verifier, witnesses, quorum)
    except BadSignature as exc:
        raise _fail(f"checkpoint: {str(exc).removeprefix('checkpoint: ')}") from None
    except BadFormat as exc:
        raise _fail(f"checkpoint: {str(exc).removeprefix('checkpoint: ')}") from None
    checks = Signatures(executor)
    try:
        recs, enrolled, decisions = _entries(cert["entries"], fast, cp, checks)
        checks.flush()
        devices = _devices(enrolled, decisions)
        indexes: dict[str, int] = {}
        # Everything after the records' signatures is checked while they are, and the first
        # failure raised in the order of the checks: a record's signature, the rest of it ...
        verified, failure, signed = _records(recs, devices, vin, indexes)
        if failure is None:
            try:
                issued_at, estimates, notes = _annotations(cert["annotations"], verifier.public, vin, cp,
                                                           verified)
                gaps, starts, corrections = _chains(verified, notes, estimates)
            except CertificateError as exc:     # ... then the annotations and the chains
                failure = exc
        _signed(recs[:signed], devices, checks)
    finally:
        checks.close()
    if failure is not None:
        raise failure
    warnings = [f"device {d} is in the certificate but signed none of its records"
                for d in sorted(set(devices) - {r.dev for r in verified})]
    ignored = len(note.parse(cp.signed).signatures) - 1 - len(cp.cosignatures)
    return Proven(vin, cp, tuple(devices.values()), tuple(verified), indexes, tuple(gaps), starts,
                  tuple(warnings), tuple(corrections), estimates, issued_at, ignored)
