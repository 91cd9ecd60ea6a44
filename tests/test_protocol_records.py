from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import BadFormat, BadSignature, b64, canonical, records
from protocol.identity import SigningKey, VerifyKey, device_id

KEY = SigningKey.generate()
DEV = KEY.public.id


def payload(seq: int = 1, **over: object) -> dict[str, object]:
    p: dict[str, object] = {
        "dev": DEV, "seq": seq, "prev": records.GENESIS if seq == 1 else "ab" * 32,
        "kind": "odometer", "t": 1_790_000_000_000, "clock": "synced", "boot": "b1",
        "mono_ms": 1234, "vin": "WBA12345678901234", "odo_m": 12_345_000, "src": "obd",
    }
    p.update(over)
    return p


def test_device_id_is_first_16_bytes_of_sha256() -> None:
    import hashlib

    assert device_id(KEY.public.raw) == hashlib.sha256(KEY.public.raw).hexdigest()[:32]
    assert len(DEV) == 32


def test_sign_verify_roundtrip_and_header() -> None:
    rec = records.sign(KEY, payload())
    head = json.loads(b64.decode(rec.jws.split(".")[0]))
    assert head == {"alg": "Ed25519", "kid": DEV}
    back = records.verify(rec.jws, KEY.public)
    assert back == rec
    assert back.odo_m == 12_345_000
    assert rec.id == records.record_id(rec.jws)


def test_payload_is_verbatim_canonical_json() -> None:
    rec = records.sign(KEY, payload())
    body = b64.decode(rec.jws.split(".")[1])
    assert body == json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"odo_m": 1.5}, "odo_m"),
        ({"seq": 0}, "seq"),
        ({"kind": "selfie"}, "kind"),
        ({"clock": "maybe"}, "clock"),
        ({"prev": "12"}, "prev"),
        ({"src": "guess"}, "src"),
        ({"seq": True}, "seq"),
        ({"extra": 1}, "unexpected"),
        ({"vin": "not a vin!"}, "vin"),
        ({"vin": "WVWZZZ1JZXW000001\n"}, "vin"),        # a look-alike with a newline
        ({"vin": "wvwzzz1jzxw000001"}, "vin"),          # lower case
        ({"vin": "WVWZZZ1JZXW00001"}, "vin"),           # 16 characters
        ({"vin": "WVWZZZ1JZXW0000O1"}, "vin"),          # O is not in a VIN (ISO 3779)
        ({"seq": 2**53}, "seq"),
        ({"t": 4_102_444_800_001}, "t"),                # past 2100
        ({"t": 1000, "clock": "synced"}, "t"),          # a synced clock in 1970
        ({"odo_m": 10**10}, "odo_m"),
    ],
)
def test_bad_payload_named(over: dict[str, object], message: str) -> None:
    with pytest.raises(BadFormat, match=message):
        records.sign(KEY, payload(**over))


def test_seq1_requires_genesis_prev() -> None:
    with pytest.raises(BadFormat, match="prev"):
        records.sign(KEY, payload(prev="ab" * 32))


def test_wrong_key_is_rejected() -> None:
    rec = records.sign(KEY, payload())
    other = SigningKey.generate()
    with pytest.raises(BadFormat, match="kid"):
        records.verify(rec.jws, other.public)


def test_alg_eddsa_is_refused() -> None:
    rec = records.sign(KEY, payload())
    head = b64.encode(json.dumps({"alg": "EdDSA", "kid": DEV}).encode())
    forged = ".".join([head, *rec.jws.split(".")[1:]])
    with pytest.raises(BadFormat, match="alg"):
        records.verify(forged, KEY.public)


def test_float_in_signed_payload_refused_on_verify() -> None:
    from protocol import jws

    body = json.dumps(dict(payload(), v=1, odo_m=1.0)).encode()
    compact = jws.sign(body, KEY, DEV)
    with pytest.raises(BadFormat, match="float"):
        records.verify(compact, KEY.public)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_flipping_any_byte_fails_verification(data: st.DataObject) -> None:
    rec = records.sign(KEY, payload())
    raw = bytearray(rec.jws.encode())
    i = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    raw[i] ^= 1 << bit
    with pytest.raises((BadFormat, BadSignature)):
        records.verify(bytes(raw), KEY.public)


kinds = st.sampled_from(["odometer", "trip", "confirmation", "event"])
ints = st.integers(0, 2**53 - 1)
HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
VINS = st.text("ABCDEFGHJKLMNPRSTUVWXYZ0123456789", min_size=17, max_size=17)
ODO = st.integers(0, records.MAX_ODO_M)
WALL = st.integers(0, records.MAX_T)
DETAILS = st.none() | st.text(max_size=40) | st.dictionaries(st.text(max_size=5), ints, max_size=3)


@st.composite
def any_payload(draw: st.DrawFn) -> dict[str, object]:
    kind = draw(kinds)
    seq = draw(st.integers(1, 2**40))
    base = {
        "dev": DEV, "seq": seq,
        "prev": records.GENESIS if seq == 1 else draw(HEX64),
        "kind": kind, "clock": (clock := draw(st.sampled_from(records.CLOCKS))),
        "t": draw(st.integers(records.MIN_SYNCED_T if clock == "synced" else 0, records.MAX_T)),
        "boot": draw(st.text("abcdefXYZ0123_-", min_size=1, max_size=64)),
        "mono_ms": draw(ints), "vin": draw(st.none() | VINS),
    }
    if kind == "odometer":
        base.update(odo_m=draw(ODO), src=draw(st.sampled_from(records.SOURCES)))
    elif kind == "trip":
        a, b = sorted([draw(WALL), draw(WALL)])
        c, d = sorted([draw(ODO), draw(ODO)])
        base.update(start_t=a, end_t=b, start_odo_m=c, end_odo_m=d, max_kph=draw(st.integers(0, 400)),
                    src=draw(st.sampled_from(records.SOURCES)))
    elif kind == "confirmation":
        base.update(odo_m=draw(ODO), device_odo_m=draw(st.none() | ODO),
                    week=f"{draw(st.integers(2000, 2100))}-W{draw(st.integers(1, 53)):02d}")
    else:
        base.update(event=draw(st.sampled_from(["adapter_lost", "vin_changed", "buffer_pruned"])),
                    detail=draw(DETAILS))
    return base


@settings(max_examples=200, deadline=None)
@given(any_payload())
def test_decode_encode_roundtrip(p: dict[str, object]) -> None:
    rec = records.sign(KEY, p)
    back = records.verify(rec.jws, KEY.public)
    assert back == rec
    assert back.payload == {"v": 1, **p}


def test_third_party_jose_library_verifies_our_record() -> None:
    from joserfc import jws as jose_jws
    from joserfc.jwk import OKPKey

    rec = records.sign(KEY, payload())
    jwk = OKPKey.import_key({"kty": "OKP", "crv": "Ed25519", "x": b64.encode(KEY.public.raw)})
    obj = jose_jws.deserialize_compact(rec.jws, jwk, algorithms=["Ed25519"])
    assert obj.protected == {"alg": "Ed25519", "kid": DEV}
    assert json.loads(obj.payload) == rec.payload


def test_third_party_jose_signature_verifies_here() -> None:
    from joserfc import jws as jose_jws
    from joserfc.jwk import OKPKey

    pem = KEY.to_pem()
    jwk = OKPKey.import_key(pem)
    body = json.dumps(dict(payload(), v=1), sort_keys=True, separators=(",", ":"))
    compact = jose_jws.serialize_compact({"alg": "Ed25519", "kid": DEV}, body, jwk, algorithms=["Ed25519"])
    assert records.verify(compact, VerifyKey(KEY.public.raw)).odo_m == 12_345_000


def test_iso_week() -> None:
    # 2026-11-19 12:00 UTC is a Thursday of ISO week 47
    assert records.iso_week(1_795_089_600_000) == "2026-W47"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 990 + b"]" * 990, "nested deeper"),
        (b'{"a":' + b"9" * 5000 + b"}", "5000 digits"),
        (b'{"a":"' + b"x" * (2 * 1024 * 1024) + b'"}', "larger than"),
        (b'{"a":1e400}', "floats"),
        (b'{"a":NaN}', "NaN"),
        (b'{"a":1,"a":2}', "duplicate"),
        (b"\xff", "UTF-8"),
    ],
)
def test_json_is_bounded_before_it_is_parsed(body: bytes, message: str) -> None:
    with pytest.raises(BadFormat, match=message):
        canonical.loads_object(body)


def test_depth_ignores_brackets_inside_strings() -> None:
    assert canonical.depth(b'{"a":[1,{"b":"[[[[{{{{"}]}') == 3
    assert canonical.loads_object(b'{"a":"' + b"[" * 100 + b'"}') == {"a": "[" * 100}
