"""The backend's MQTT payloads, fuzzed with hypothesis: ``records``, ``enroll``, ``status`` and
``claim`` bodies of random bytes, wrong types, huge and deep JSON, NaN and Infinity literals,
duplicate keys, BOMs, overlong and invalid UTF-8, and real records and enrolments mangled:
characters changed, non-canonical base64url, a wrong ``alg``, fields missing or of the wrong
type, floats, negative and huge numbers, another device's records, payloads the device's own key
signed that break the format.

Most cases are pure parser cases (:mod:`protocol.messages`, :func:`backend.records.verify.parse`
and ``authenticate``, no database); fewer go through the ingest's handlers
(:class:`backend.records.ingest.Ingest`) on SQLite and PostgreSQL, where each garbage message
must leave everything stored as it was (:func:`tests.backend_helpers.snapshot`), be counted in
the metrics by its reason, and leave the device able to send: its next genuine record is
accepted. The counts are printed at the end; ``ODO_FUZZ_LONG=1`` runs twenty times as many
parser cases, four times as many through the database, and the coverage-guided run of
:mod:`tests.fuzz_atheris`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from backend.db import Database
from backend.metrics import Registry
from backend.records import ingest as ingest_module
from backend.records import store, verify
from backend.records.ingest import Ingest
from backend.records.verify import DeviceKey, Parsed, Refusal
from common.transport import BrokerConfig
from protocol import b64, canonical, messages, records
from protocol.errors import BadFormat, BadSignature
from protocol.identity import SigningKey
from protocol.records import Record
from sim.devices import T0, Dongle, batch, enroll
from tests import fuzz_support
from tests.backend_helpers import snapshot
from tests.fuzz_support import LONG, count

SCALE = 20 if LONG else 1
#: Through the database, a long run does four times as many: each case reads every table twice.
DB_SCALE = 4 if LONG else 1
PURE = settings(deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])
WITH_DB = settings(PURE, suppress_health_check=[*PURE.suppress_health_check,
                                                HealthCheck.function_scoped_fixture])
#: Cases per example of the pure tests: one example draws a list of bodies.
PER_EXAMPLE = 40


@pytest.fixture(scope="module", autouse=True)
def _cases(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from fuzz_support.report(request, "mqtt ")


# -- what the garbage is made of -------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_ODD = ["\u0000", "\u00e9", "\U0001f600", "\ud800", "\udfff", "\ufeff", "\u2028", "\x7f", "\n"]
_BAD_VALUES: list[Any] = [-1, 2**64, "", True, [], {}]
#: Literals spliced into JSON text where a value stands: none is a value the format allows.
_BAD_LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"1.5", b"1e400", b"-0.0", b"1E2", b"9" * 25,
                 b"-" + b"9" * 21, b"\"\\ud800\"", b"\"\\u0000\"", b"[" * 40 + b"]" * 40]
_BOM = b"\xef\xbb\xbf"
_OVERLONG = [b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf", b"\xc0\x80", b"\xed\xa0\x80", b"\xff",
             b"\xfe"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.sampled_from([2**53, 2**53 - 1, 2**63, -(2**63), 0, -1, 10**20, 10**25]),
    st.text(max_size=12), st.sampled_from(_ODD), st.text(alphabet=_B64 + ".", max_size=40))


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)


json_values = st.recursive(scalars, _nested, max_leaves=12)


@st.composite
def json_bytes(draw: st.DrawFn, value: st.SearchStrategy[Any] = json_values) -> bytes:
    """A JSON text of a drawn value, sometimes written in ways the strict decoder refuses."""
    text = json.dumps(draw(value), ensure_ascii=draw(st.booleans()))
    data = text.encode("utf-8", "surrogatepass")            # a lone surrogate: not UTF-8
    return draw(garbled(data))


_GARBLE = st.sampled_from(["as is", "as is", "as is", "bom", "literal", "overlong", "cut", "byte", "dup"])
_LITERAL, _OVERLONG_BYTES = st.sampled_from(_BAD_LITERALS), st.sampled_from(_OVERLONG)
_BYTE, _POSITION = st.integers(0, 255), st.integers(0, 2**16)


def _at(draw: st.DrawFn, n: int) -> int:
    """A position in 0..n, drawn alike whatever n is (the ingest's cases draw from a state that
    moves on; hypothesis wants the same draws each time it replays an example)."""
    return draw(_POSITION) % (n + 1)


@st.composite
def garbled(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` as drawn, or with a BOM, a bad literal, an overlong sequence or a cut spliced in."""
    how = draw(_GARBLE)
    if how == "as is":
        return data
    if how == "bom":
        return _BOM + data
    at = _at(draw, len(data))
    if how == "literal":
        return data[:at] + draw(_LITERAL) + data[at:]
    if how == "overlong":
        return data[:at] + draw(_OVERLONG_BYTES) + data[at:]
    if how == "cut":
        return data[:at]
    if how == "byte":
        return data[:at] + bytes([draw(_BYTE)]) + data[at + 1:]
    literal = draw(_LITERAL)
    if data.endswith(b"}") and len(data) > 2:                 # a duplicate of the first key
        first = data[1:].split(b":", 1)[0]
        return data[:-1] + b"," + first + b":" + literal + b"}"
    return data


def _raw_jws(key: SigningKey, header: bytes, payload: bytes) -> str:
    """A compact JWS over exactly these header and payload bytes, really signed by ``key``."""
    signing_input = f"{b64.encode(header)}.{b64.encode(payload)}"
    return f"{signing_input}.{b64.encode(key.sign(signing_input.encode('ascii')))}"


def _header(kid: str, **extra: Any) -> bytes:
    return json.dumps({"alg": "Ed25519", "kid": kid, **extra}, separators=(",", ":")).encode()


#: Fields whose every value in :data:`_BAD_VALUES` breaks the format (``detail`` takes any JSON).
_CHECKED = set(records.COMMON) | {"odo_m", "src", "start_t", "end_t", "start_odo_m", "end_odo_m", "max_kph",
                                  "device_odo_m", "week", "event"}


_HOW = st.sampled_from(["char", "char", "segment", "b64", "alg", "header", "payload", "payload", "text",
                        "forged", "type", "json"])
_CHARS = st.sampled_from([*_B64[:8], ".", "=", "+", "/", " ", *_ODD])
_ALGS = st.sampled_from(["EdDSA", "none", "HS256", "ed25519", "ED25519", "", None, 1, ["Ed25519"]])
_TEXT_CHOICES = st.sampled_from(["splice", "splice", "bom", "overlong", "dup", "array", "trailing"])
_TRAILING = st.sampled_from([b"x", b"{}", b"\x00", b" ,"])
_NOT_STRINGS = st.one_of(st.integers(), st.none(), st.booleans(), st.lists(st.text(max_size=3), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_JUNK_TEXT = st.text(alphabet=_B64 + "." + "".join(_ODD), max_size=200)
_BAD_VALUE = st.sampled_from(_BAD_VALUES)
_NUMBERS = st.sampled_from(["seq", "mono_ms"])


def _pick(draw: st.DrawFn, options: list[Any]) -> Any:
    """One of ``options``, drawn alike whatever they are (see :func:`_at`)."""
    return options[_at(draw, len(options) - 1)]


def _mangle(draw: st.DrawFn, base: Record, owner: SigningKey, other: SigningKey) -> object:
    """A record that must not take a seq: ``base`` (a genuine record of ``owner``'s device)
    changed, re-signed, forged or replaced; or not a string at all."""
    how = draw(_HOW)
    text = base.jws
    head, body, sig = text.split(".")
    if how == "char":
        at, c, cut = _at(draw, len(text) - 1), draw(_CHARS), _at(draw, 2)
        out = text[:at] + c + text[at + cut:]
        return out if out != text else text[:at]
    if how == "segment":
        parts = [head, body, sig]
        i = _at(draw, 2)
        parts[i] = _pick(draw, ["", parts[i] + "=", parts[i] + "==", parts[i][:-1], parts[i] + "A",
                                parts[i].replace("-", "+").replace("_", "/") + "+"])
        out = ".".join(parts + _pick(draw, [[], [], ["x"], [sig]]))
        return out if out != text else out + "."
    if how == "b64":                     # the same bytes, by a last character with its unused bits set
        parts = [head, body, sig]
        i, bits = _at(draw, 2), _at(draw, 14) + 1
        seg = parts[i]
        if len(seg) % 4 in (2, 3):
            spare = 4 if len(seg) % 4 == 2 else 2
            last = _B64.index(seg[-1])
            parts[i] = seg[:-1] + _B64[last | (bits % (2**spare - 1) + 1)]
        else:
            parts[i] = seg + "A="
        out = ".".join(parts)
        return out if out != text else out + "A"
    if how == "alg":
        return _raw_jws(owner, json.dumps({"alg": draw(_ALGS), "kid": base.dev}).encode(), b64.decode(body))
    if how == "header":
        header = _pick(draw, [
            _header(base.dev, crit=["b64"]), _header(base.dev, typ="JWT"), b'{"alg":"Ed25519"}',
            b'{"alg":"Ed25519","kid":1}', b'{"alg":"Ed25519","kid":"' + base.dev.upper().encode() + b'"}',
            b'{"alg":"Ed25519","kid":"' + base.dev.encode() + b'","alg":"Ed25519"}', b"[]", b"null",
            _BOM + _header(base.dev), b'{"alg":"Ed25519","kid":"' + other.public.id.encode() + b'"}'])
        return _raw_jws(owner, header, b64.decode(body))
    payload = dict(base.payload)
    if how == "payload":                 # well-formed JSON the device's key signed, but not a record
        key = _pick(draw, [*sorted(_CHECKED & set(payload)), "unknown_field"])
        if key == "unknown_field":
            payload[key] = draw(json_values)
        elif draw(st.booleans()):
            del payload[key]
        else:
            payload[key] = draw(_BAD_VALUE)
        return _raw_jws(owner, _header(base.dev), json.dumps(payload, sort_keys=draw(st.booleans())).encode())
    if how == "text":                    # the device's key signed bytes that are no strict JSON object
        data = canonical.dumps(payload)
        name, literal, choice = draw(_NUMBERS), draw(_LITERAL), draw(_TEXT_CHOICES)
        overlong, trailing = draw(_OVERLONG_BYTES), draw(_TRAILING)
        spliced = data.replace(f'"{name}":{payload[name]}'.encode(), f'"{name}":'.encode() + literal)
        if choice == "bom":
            spliced = _BOM + data
        elif choice == "overlong":
            q = data.index(b'"boot":"') + len(b'"boot":"')
            spliced = data[:q] + overlong + data[q:]
        elif choice == "dup":
            spliced = data[:-1] + b',"seq":' + str(base.seq).encode() + b"}"
        elif choice == "array":
            spliced = b"[" + data + b"]"
        elif choice == "trailing":
            spliced = data + trailing
        return _raw_jws(owner, _header(base.dev), spliced)
    if how == "forged":                  # the device's payload, signed by another key
        return _raw_jws(other, _header(base.dev), b64.decode(body))
    if how == "type":
        return draw(_NOT_STRINGS)
    return draw(_JUNK_TEXT)


mangled_record = st.composite(_mangle)


_FORM = st.sampled_from(["batch", "batch", "batch", "batch", "bytes", "json", "members", "many", "huge"])
_MEMBERS = st.sampled_from([{}, {"records": None}, {"records": "x"}, {"records": {"0": "x"}}, {"Records": []},
                            {"records": 1}])
_BOOT = st.one_of(st.text(max_size=70), st.integers(), st.none())
_MONO = st.one_of(st.integers(-(2**64), 2**64), st.text(max_size=3))
_BYTES = st.binary(max_size=300)


@st.composite
def records_body(draw: st.DrawFn, items: st.SearchStrategy[list[object]]) -> bytes:
    """A ``records`` message around a list of ``items``, or one whose shape is wrong."""
    form = draw(_FORM)
    if form == "bytes":
        return draw(_BYTES)
    if form == "json":
        return draw(json_bytes())
    if form == "many":                       # more records than a batch may hold, within the bytes
        extra = draw(st.integers(1, 3))
        return json.dumps({"records": ["x"] * (messages.MAX_BATCH_RECORDS + extra)}).encode()
    if form == "huge":                       # more bytes than a batch may hold
        size = messages.MAX_BATCH_BYTES + draw(st.sampled_from([1, 1000, 300_000]))
        return b'{"records":["' + b"A" * (size - 16) + b'"]}'
    obj: dict[str, Any] = dict(draw(_MEMBERS)) if form == "members" else {"records": draw(items)}
    if draw(st.booleans()):
        obj["boot"], obj["mono_ms"] = draw(_BOOT), draw(_MONO)
    if draw(st.integers(0, 4)) == 0:
        obj[draw(st.text(max_size=8))] = draw(json_values)
    return draw(garbled(json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")))


_ENROL_HOW = st.sampled_from(["bytes", "json", "record", "members", "payload", "payload", "bare", "topic"])
_ENROL_CHANGE = st.sampled_from(["drop", "extra", "enrolment", "token"])
_ENROL_MEMBER = st.sampled_from(["enrolment", "fleet_token"])
_ENROL_KEY = st.sampled_from(["v", "dev", "pub", "vin", "t", "fleet_token", "extra"])
_BAD_TOKEN = st.sampled_from([1, True, [], "", "x" * 201, "tok\u00e9n", "t\x00"])
_CLAIM_HOW = st.sampled_from(["bytes", "json", "record", "payload"])
_CLAIM_KEY = st.sampled_from(["v", "dev", "code", "t", "extra"])
_SIGNED: dict[tuple[str, str], Any] = {}


def _signed(kind: str, key: SigningKey) -> Any:
    """``key``'s genuine enrolment, claim or record, signed once."""
    if (kind, key.public.id) not in _SIGNED:
        _SIGNED[kind, key.public.id] = {
            "enrolment": lambda: messages.sign_enrollment(key, "WVWZZZ1JZXW000001", T0),
            "bare enrolment": lambda: messages.sign_enrollment(key, None, T0),
            "claim": lambda: messages.sign_claim(key, "23456789", T0),
            "record": lambda: records.sign(key, {
                "dev": key.public.id, "seq": 1, "prev": records.GENESIS, "kind": "odometer", "t": T0,
                "clock": "synced", "boot": "b", "mono_ms": 1, "vin": None, "odo_m": 1, "src": "obd"}),
        }[kind]()
    return _SIGNED[kind, key.public.id]


@st.composite
def mangled_enrolment(draw: st.DrawFn, device: SigningKey, other: SigningKey, token: str | None) -> bytes:
    """An ``enroll`` message that must be refused: ``device``'s genuine one mangled."""
    how = draw(_ENROL_HOW)
    if how == "bytes":
        return draw(_BYTES)
    if how == "json":
        return draw(json_bytes())
    if how == "record":
        return json.dumps({"enrolment": _mangle(draw, _signed("record", device), device, other),
                           "fleet_token": token}).encode()
    good = _signed("enrolment", device)
    if how == "members":
        obj: dict[str, Any] = {"enrolment": good, "fleet_token": token}
        change = draw(_ENROL_CHANGE)
        if change == "drop":
            del obj[draw(_ENROL_MEMBER)]
        elif change == "extra":
            obj["x" + draw(st.text(max_size=5))] = draw(json_values)
        elif change == "enrolment":
            obj["enrolment"] = _pick(draw, [None, 1, [good], {"jws": good}, good + ".", ""])
        else:
            obj["fleet_token"] = draw(_BAD_TOKEN)
        return draw(garbled(json.dumps(obj).encode()))
    if how == "bare":
        return str(good).encode()
    if how == "topic":                        # another device's genuine enrolment
        return messages.encode_enroll(_signed("bare enrolment", other), token)
    payload: dict[str, Any] = {"v": 1, "dev": device.public.id, "pub": b64.encode(device.public.raw),
                               "vin": "WVWZZZ1JZXW000001", "t": T0}
    key = draw(_ENROL_KEY)
    bad = {"v": [2, True, "1", None], "dev": [other.public.id, "", None], "vin": ["", "WVWZZZ1JZXW00000I", 1],
           "pub": [b64.encode(other.public.raw), "", "A" * 43 + "=", None], "t": [-1, 2**53, "1", None, True],
           "fleet_token": [token or "x"], "extra": [1]}[key]
    if key not in ("fleet_token", "extra") and draw(st.booleans()):
        del payload[key]
    else:
        payload[key] = _pick(draw, bad)
    signed = _raw_jws(device, _header(device.public.id), json.dumps(payload).encode())
    return json.dumps({"enrolment": signed, "fleet_token": token}).encode()


@st.composite
def mangled_claim(draw: st.DrawFn, device: SigningKey, other: SigningKey) -> bytes:
    """A ``claim`` message that must be refused."""
    how = draw(_CLAIM_HOW)
    if how == "bytes":
        return draw(_BYTES)
    if how == "json":
        return draw(json_bytes())
    if how == "record":
        return str(_mangle(draw, _signed("record", device), device, other)).encode("utf-8", "surrogatepass")
    payload = json.loads(b64.decode(_signed("claim", device).split(".")[1]))
    key = draw(_CLAIM_KEY)
    bad = {"v": [2, True], "dev": [other.public.id, ""], "code": ["", "0OIL1UUU", 1], "t": [-1, 2**53, 1.5],
           "extra": [1]}
    payload[key] = _pick(draw, bad[key])
    return _raw_jws(device, _header(device.public.id), json.dumps(payload).encode()).encode()


status_body = st.one_of(st.binary(max_size=200), json_bytes(),
                        json_bytes(st.fixed_dictionaries({"online": json_values},
                                                         optional={"backlog": json_values})))


# -- the pure cases ----------------------------------------------------------------------------

D, E, R, U = Dongle(), Dongle(), Dongle(), Dongle()      # approved, approved, revoked, never enrolled
POOL = [D.odometer(1), D.trip(5), D.confirmation("2026-W40"), D.odometer(1, clock="unsynced"),
        D.sign(D.payload("event", {"event": "adapter_lost", "detail": {"a": [1, {"b": None}]}}))]
OTHERS = [E.odometer(1).jws, R.odometer(1).jws, U.odometer(1).jws]
GENUINE = {r.jws for r in POOL} | {OTHERS[0]}
KEYS = {D.dev: DeviceKey("approved", D.key.public.raw), E.dev: DeviceKey("approved", E.key.public.raw),
        R.dev: DeviceKey("revoked", R.key.public.raw)}
_REFUSALS = messages.UNSEQUENCED - {"vin_mismatch"}


@st.composite
def pool_mangled(draw: st.DrawFn) -> object:
    """A record of :data:`POOL` mangled."""
    return _mangle(draw, POOL[_at(draw, len(POOL) - 1)], D.key, E.key)


PURE_ITEMS = st.lists(st.one_of(pool_mangled(), st.sampled_from(OTHERS), st.sampled_from(sorted(GENUINE)),
                                json_values), max_size=4)


def check_items(topic: str, items: tuple[object, ...]) -> None:
    """What the store does with the items of a batch, before any database: each is refused as
    ``bad_format``, or parsed and then refused for a reason that does not take a seq, or is a
    genuine record."""
    for item in items:
        parsed = verify.parse(item)
        if isinstance(parsed, Refusal):
            assert parsed.reason == "bad_format", parsed
            assert parsed.seq is None or 1 <= parsed.seq <= records.MAX_INT
            continue
        assert isinstance(parsed, Parsed)
        outcome = verify.authenticate(topic, parsed, KEYS.get(parsed.kid))
        if isinstance(outcome, Refusal):
            assert outcome.reason in _REFUSALS, outcome
        else:
            assert outcome.jws in GENUINE and outcome.dev == topic, item


@given(topic=st.sampled_from([D.dev, E.dev, U.dev]),
       bodies=st.lists(records_body(PURE_ITEMS), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
@settings(PURE, max_examples=650 * SCALE)
def test_records_messages_are_decoded_or_refused(topic: str, bodies: list[bytes]) -> None:
    for body in bodies:
        count("mqtt records bodies (parser)")
        try:
            sent = messages.decode_batch(body)
        except messages.TooLarge:
            assert len(body) > messages.MAX_BATCH_BYTES or len(json.loads(body)["records"]) > 500
            continue
        except BadFormat:
            assert len(body) <= messages.MAX_BATCH_BYTES
            continue
        assert len(body) <= messages.MAX_BATCH_BYTES and len(sent.records) <= messages.MAX_BATCH_RECORDS
        assert (sent.boot is None) == (sent.mono_ms is None)
        check_items(topic, sent.records)


@given(items=st.lists(pool_mangled(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
@settings(PURE, max_examples=1000 * SCALE)
def test_a_mangled_record_never_authenticates(items: list[object]) -> None:
    for item in items:
        count("mqtt mangled records (parser)")
        parsed = verify.parse(item)
        if isinstance(parsed, Parsed):
            outcome = verify.authenticate(D.dev, parsed, KEYS[D.dev])
            assert isinstance(outcome, Refusal) or outcome.jws in GENUINE, item
            assert not isinstance(outcome, Refusal) or outcome.reason in _REFUSALS


@given(bodies=st.lists(st.one_of(mangled_enrolment(D.key, E.key, "tok"), mangled_claim(D.key, E.key),
                                 status_body, st.binary(max_size=200)),
                       min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
@settings(PURE, max_examples=700 * SCALE)
def test_enroll_status_and_claim_messages_are_decoded_or_refused(bodies: list[bytes]) -> None:
    for body in bodies:
        count("mqtt enroll/claim/status/ack bodies (parser)")
        try:
            enrolment, _ = messages.decode_enroll(body)
            assert enrolment.dev in (D.dev, E.dev)
        except (BadFormat, BadSignature):
            pass
        try:
            if messages.claim_kid(body) == D.dev:
                messages.verify_claim(body, D.key.public)
        except (BadFormat, BadSignature):
            pass
        for decode in (messages.decode_status, messages.decode_ack, messages.decode_enrolled,
                       messages.decode_claim_result):
            try:
                decode(body)
            except BadFormat:
                pass


@given(texts=st.lists(st.one_of(st.text(max_size=60), st.text(alphabet=_B64, max_size=60),
                                st.binary(max_size=60).map(lambda b: b.decode("latin-1"))),
                      min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
@settings(PURE, max_examples=200 * SCALE)
def test_base64url_reads_only_the_canonical_encoding(texts: list[str]) -> None:
    for text in texts:
        count("mqtt base64url segments (parser)")
        try:
            data = b64.decode(text)
        except BadFormat:
            continue
        assert b64.encode(data) == text


# -- through the ingest, on SQLite and PostgreSQL ----------------------------------------------

class _Sink:
    """Stands in for the ingest's MQTT client: keeps what it would publish."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.published.append((topic, payload))


def samples(registry: Registry) -> Counter[tuple[str, ...]]:
    """Every counter sample of ``registry``, by name and labels."""
    out: Counter[tuple[str, ...]] = Counter()
    for family in registry.registry.collect():
        for s in family.samples:
            if s.name in ("odo_records_total", "odo_messages_refused_total", "odo_ingest_errors_total"):
                out[(s.name, *(s.labels[k] for k in sorted(s.labels)))] = int(s.value)
    return out


class Rig:
    """An ingest on ``db``, its devices, and the clock that follows the device under test."""

    def __init__(self, db: Database, rules: Any) -> None:
        self.db, self.d, self.e, self.r, self.u = db, Dongle(), Dongle(), Dongle(), Dongle()
        for device in (self.d, self.e, self.r):
            enroll(db, device)
        with db.write() as tx:
            tx.execute("UPDATE devices SET status = 'revoked' WHERE dev = ?", (self.r.dev,))
        self.registry = Registry()
        self.ingest = Ingest(db, rules, BrokerConfig("127.0.0.1", 1883), registry=self.registry,
                             clock=lambda: self.d.t + 1000, fleet_token="tok")
        self.ingest.client = _Sink()  # type: ignore[assignment]
        self.stored = [self.d.odometer(1), self.d.odometer(1)]
        self.send(batch(*self.stored))

    def send(self, body: bytes) -> store.BatchResult:
        return self.ingest.handle_records(self.d.dev, body)

    def genuine(self) -> None:
        """The device's next record: accepted whatever came before it."""
        record = self.d.odometer(1)
        result = self.send(batch(record))
        assert result.ack.through == record.seq and not result.ack.rejected, result
        self.stored.append(record)


@st.composite
def garbage(draw: st.DrawFn, rig: Rig) -> tuple[str, str, bytes]:
    """A message that must change nothing stored: (channel, topic device, body)."""
    d, e = rig.d, rig.e
    channel = draw(st.sampled_from(["records"] * 6 + ["enroll", "status", "claim"]))
    topic = draw(st.sampled_from([d.dev] * 4 + [e.dev, rig.u.dev]))
    if channel == "enroll":
        return channel, topic, draw(mangled_enrolment(SigningKey.generate(), SigningKey.generate(), None))
    if channel == "status":
        return channel, rig.u.dev, draw(status_body)
    if channel == "claim":
        return channel, topic, draw(mangled_claim(d.key, e.key))
    nxt = d.sign(d.payload("odometer", {"odo_m": d.odo_m + 1000, "src": "obd"}, dt_ms=0), advance=False)
    items = st.lists(st.one_of(
        mangled_record(nxt, d.key, e.key),
        st.sampled_from(rig.stored[-3:]).map(lambda r: r.jws),                  # duplicates: no-ops
        st.just(e.odometer(1, seq=e.seq + 5, advance=False).jws),             # another device's
        st.just(rig.r.odometer(1, advance=False).jws), st.just(rig.u.odometer(1, advance=False).jws),
        st.just(d.odometer(1, seq=d.seq + 2, advance=False).jws),             # a gap: not yet
        json_values), max_size=4)
    return channel, topic, draw(records_body(items))


def _handle(rig: Rig, channel: str, topic: str, body: bytes) -> None:
    """Hand one message to the ingest as its worker would; check that it is counted."""
    before = samples(rig.registry)
    refused_reason: str | None = None
    if channel == "records":
        result = rig.ingest.handle_records(topic, body)
        if topic == rig.d.dev:
            assert result.ack.through == rig.d.seq
        rejected = Counter(r.reason for r in result.ack.rejected)
        refused_reason = result.refused
    elif channel == "enroll":
        answer = rig.ingest.handle_enroll(topic, body)
        assert answer.dev == topic
        refused_reason = ingest_module.enrolment_refusal(topic, body)
        assert refused_reason in ("too_large", "bad_format", "bad_signature", "dev_mismatch"), body
    elif channel == "claim":
        claim = rig.ingest.handle_claim(topic, body)
        assert claim.status == "refused" and claim.reason
        refused_reason = claim.reason
    else:
        rig.ingest.handle(ingest_module.Received(topic, "status", body, 0, 0, -1))
        refused_reason = ingest_module.status_refusal(body)
    diff = samples(rig.registry) - before
    assert not diff[("odo_ingest_errors_total",)], body
    if channel == "records":
        counted = Counter({reason: n for (name, reason, *status), n in diff.items()
                           if name == "odo_records_total" and status == ["rejected"]})
        assert counted == rejected, (counted, rejected)
        assert sum(n for k, n in diff.items() if k[0] == "odo_records_total") == len(result.outcomes)
    if refused_reason is not None:
        assert diff[("odo_messages_refused_total", channel, refused_reason)] == 1, (channel, diff)


def _fuzz_through_the_ingest(db: Database, rules: Any, examples: int) -> None:
    rig = Rig(db, rules)

    @given(st.data())
    @settings(WITH_DB, max_examples=examples)
    def run(data: st.DataObject) -> None:
        before = snapshot(db)
        for _ in range(8):
            channel, topic, body = data.draw(garbage(rig))
            count(f"mqtt {channel} messages through the ingest ({db.dialect})")
            _handle(rig, channel, topic, body)
        assert snapshot(db) == before
        rig.genuine()

    run()
    assert rig.registry.records("accepted") == len(rig.stored)
    device = db.one("SELECT through FROM devices WHERE dev = ?", (rig.d.dev,))
    assert device is not None and device["through"] == len(rig.stored)


def test_garbage_through_the_ingest_changes_nothing_and_is_counted(db: Database, rules: Any) -> None:
    _fuzz_through_the_ingest(db, rules, (450 if db.dialect == "sqlite" else 150) * DB_SCALE)


# -- a batch over the limits is refused unread --------------------------------------------------

class _Watched(bytes):
    """A message body that records what was done with it whole."""

    decoded: list[int] = []

    def decode(self, *args: Any, **kwargs: Any) -> str:
        type(self).decoded.append(len(self))
        return super().decode(*args, **kwargs)


def _unreadable(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a batch over the limits was read")


@pytest.mark.parametrize("size", [messages.MAX_BATCH_BYTES + 1, 4 * 1024 * 1024, 64 * 1024 * 1024])
def test_a_batch_over_the_byte_limit_is_refused_unread(db: Database, rules: Any, size: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(db, rules)
    before = snapshot(db)
    _Watched.decoded = []
    body = _Watched(b'{"records":["' + b"\xc3\xa9" * ((size - 16) // 2 + 2) + b'"]}')
    assert len(body) > messages.MAX_BATCH_BYTES
    monkeypatch.setattr(canonical.json, "loads", _unreadable)
    monkeypatch.setattr(canonical, "loads_object", _unreadable)
    monkeypatch.setattr(verify, "parse", _unreadable)
    started = time.perf_counter()
    result = rig.send(body)
    took = time.perf_counter() - started
    monkeypatch.undo()
    assert result.refused == "too_large" and [r.reason for r in result.ack.rejected] == ["bad_format"]
    assert _Watched.decoded == []                        # not even decoded whole for the evidence kept
    assert rig.registry.refused("records", "too_large") == 1
    assert ('odo_messages_refused_total{channel="records",reason="too_large"} 1.0'
            in rig.registry.exposition().decode())
    assert snapshot(db) == before
    kept = db.one("SELECT body FROM rejections WHERE dev = ? ORDER BY id DESC LIMIT 1", (rig.d.dev,))
    assert kept is not None and len(kept["body"]) <= store.MAX_LOGGED_BODY
    assert took < 5, took
    rig.genuine()


def test_a_batch_over_the_record_limit_is_refused_before_any_record_is_read(
        db: Database, rules: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(db, rules)
    before = snapshot(db)
    genuine = rig.d.odometer(1, advance=False).jws
    body = json.dumps({"records": [genuine] + ["x"] * messages.MAX_BATCH_RECORDS}).encode()
    assert len(body) <= messages.MAX_BATCH_BYTES
    monkeypatch.setattr(store, "parse", _unreadable)
    monkeypatch.setattr(store, "authenticate", _unreadable)
    result = rig.send(body)
    monkeypatch.undo()
    assert result.refused == "too_large" and result.ack.through == rig.d.seq
    assert rig.registry.refused("records", "too_large") == 1
    assert snapshot(db) == before
    rig.genuine()


def test_refused_content_with_nul_and_lone_surrogates_is_kept(db: Database, rules: Any) -> None:
    """A record text holding what a database cannot store verbatim is kept escaped."""
    rig = Rig(db, rules)
    for text in ["\u0000", "\ud800", "a\udfffb\u0000c", "\U0001f600\ud83d"]:
        body = json.dumps({"records": [text]}).encode()
        result = rig.send(body)
        assert [r.reason for r in result.ack.rejected] == ["bad_format"]
    kept = db.query("SELECT body FROM rejections WHERE dev = ? ORDER BY id", (rig.d.dev,))
    bodies = [r["body"] for r in kept]
    assert bodies == ["\\x00", "\\ud800", "a\\udfffb\\x00c", "\U0001f600\\ud83d"]
    rig.genuine()


@pytest.mark.skipif(not LONG, reason="a long run only: ODO_FUZZ_LONG=1")
def test_the_parsers_under_coverage_guided_fuzzing(tmp_path: Path) -> None:
    """:mod:`tests.fuzz_atheris`, a million inputs (or ten minutes) from genuine messages on."""
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    result = subprocess.run([sys.executable, "-m", "tests.fuzz_atheris", str(tmp_path / "corpus"),
                             "-atheris_runs=1000000", "-max_total_time=600"],
                            capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-5000:]
    done = re.search(r"^Done (\d+) ", result.stderr, re.MULTILINE)
    assert done is not None, result.stderr[-2000:]
    count("mqtt coverage-guided inputs (atheris)", int(done.group(1)))
