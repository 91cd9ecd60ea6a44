"""Enrolments, decisions on devices and rules versions as entries of the transparency log.

Each is a JSON entry (canonical JSON, :mod:`protocol.canonical`) whose ``"entry"`` member names
its kind::

    {"entry":"enrolment","enrolment":"<the device's signed enrolment>","at":<ms>}
    {"entry":"decision","action":"approve|revoke|retire|clear","dev","vin","by","at","replaces"}
    {"entry":"rules","version","sha256":"<hex of the rules file>","text":"<the file>","at":<ms>}

They are appended in the transaction of the change they describe, so the log never says less
or more than the database. An enrolment is logged once per signed enrolment (its first arrival
gives ``at``), a decision once per entry, a rules file once per version and SHA-256. Enrolment
and decision entries are also indexed by device and VIN (table ``device_log``), so that
:func:`entries_for_vin` finds every one of the devices a vehicle has had in O(its entries).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from backend.db import Tx
from backend.ledger.rules import VERSION_RE, Rules
from backend.transparency import translog
from protocol import canonical, messages
from protocol.identity import DEV_RE, VIN_RE

ACTIONS = ("approve", "revoke", "retire", "clear")
#: Who decided: an operator's name, ``fleet-token``, ``cli:<user>``, ``api``: printable, bounded.
BY_RE = re.compile(r"[^\x00-\x1f\x7f]{1,200}")
#: Times are Unix ms; this bound keeps them JSON-safe integers.
MAX_MS = 2**53 - 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_at(at: int) -> None:
    if not isinstance(at, int) or isinstance(at, bool) or not 0 <= at <= MAX_MS:
        raise ValueError(f"a log entry's time must be 0..{MAX_MS} ms, got {at!r}")


def _index(tx: Tx, ref: str, dev: str, vin: str | None, kind: str, action: str | None, at: int) -> None:
    tx.insert_ignore("device_log", {"ref": ref, "dev": dev, "vin": vin, "kind": kind, "action": action,
                                    "at": at}, ("ref",))


def log_enrolment(tx: Tx, enrollment: messages.Enrollment, at: int) -> str:
    """Log a device's signed enrolment as the backend received it at ``at``; return its ref.
    The same signed enrolment again (a replay, at any time) is the entry it already is."""
    _check_at(at)
    ref = "enrolment:" + _sha256(enrollment.jws.encode("ascii"))
    if not translog.has(tx, ref):
        entry = canonical.dumps({"entry": "enrolment", "enrolment": enrollment.jws, "at": at})
        translog.append(tx, "enrolment", ref, entry, at)
    _index(tx, ref, enrollment.dev, enrollment.vin, "enrolment", None, at)
    return ref


def log_decision(tx: Tx, action: str, dev: str, vin: str | None, by: str, at: int,
                 replaces: str | None = None) -> str:
    """Log a decision on device ``dev``; return its ref. ``vin`` is the VIN it is
    about (the one approved for, or the device's), ``replaces`` on an approve the device it
    retired. The same entry appended twice is one leaf."""
    if action not in ACTIONS:
        raise ValueError(f"a decision's action must be one of {', '.join(ACTIONS)}, got {action!r}")
    if not isinstance(dev, str) or not DEV_RE.fullmatch(dev):
        raise ValueError(f"a decision's device must be 32 lowercase hex characters, got {dev!r}")
    if vin is not None and (not isinstance(vin, str) or not VIN_RE.fullmatch(vin)):
        raise ValueError(f"a decision's VIN must be a VIN or None, got {vin!r}")
    if not isinstance(by, str) or not BY_RE.fullmatch(by):
        raise ValueError("a decision's author must be 1 to 200 characters, none of them a control character")
    if replaces is not None and (not isinstance(replaces, str) or not DEV_RE.fullmatch(replaces)
                                 or replaces == dev or action != "approve"):
        raise ValueError(f"replaces: only an approve names another device it retires, got {replaces!r}")
    _check_at(at)
    entry = canonical.dumps({"entry": "decision", "action": action, "dev": dev, "vin": vin, "by": by,
                             "at": at, "replaces": replaces})
    ref = "decision:" + _sha256(entry)
    translog.append(tx, "decision", ref, entry, at)
    _index(tx, ref, dev, vin, "decision", action, at)
    return ref


def log_rules(tx: Tx, version: str, text: str, at: int) -> str:
    """Log a rules file the backend credits by; return its ref. Logged once per version and
    SHA-256 of the file; ``text`` is left out of an entry it would make too large."""
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise ValueError(f"a rules version must match {VERSION_RE.pattern}, got {version!r}")
    _check_at(at)
    digest = _sha256(text.encode("utf-8"))
    ref = f"rules:{version}:{digest}"
    if translog.has(tx, ref):
        return ref
    fields: dict[str, Any] = {"entry": "rules", "version": version, "sha256": digest, "at": at}
    entry = canonical.dumps({**fields, "text": text})
    if len(entry) > translog.MAX_ENTRY_BYTES:
        entry = canonical.dumps(fields)
    translog.append(tx, "rules", ref, entry, at)
    return ref


def log_rules_of(tx: Tx, rules: Rules, at: int) -> str | None:
    """:func:`log_rules` of rules read from a file; None for rules that were not (no text)."""
    if not rules.text:
        return None
    return log_rules(tx, rules.version, rules.text, at)


def refs_for_vin(tx: Tx, vin: str) -> list[str]:
    """The refs of every enrolment and decision entry of every device the vehicle ``vin`` has
    had: one that signed an accepted record about it, enrolled with it, or that a decision
    names it for."""
    if not isinstance(vin, str) or not VIN_RE.fullmatch(vin):
        raise ValueError(f"not a VIN: {vin!r}")
    rows = tx.query(
        "SELECT ref FROM device_log WHERE dev IN ("
        "SELECT dev FROM device_log WHERE vin = ? "
        "UNION SELECT dev FROM records WHERE vin = ? AND status = 'accepted') ORDER BY ref", (vin, vin))
    return [str(r["ref"]) for r in rows]


def entries_for_vin(tx: Tx, vin: str) -> list[int]:
    """The leaf indexes, ascending, of :func:`refs_for_vin`'s entries that are in the tree
    (:func:`backend.transparency.translog.integrate_all` first, to have them all)."""
    return sorted(i for i in (translog.leaf_index(tx, ref) for ref in refs_for_vin(tx, vin)) if i is not None)
