from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import BadFormat, BadSignature, merkle, messages, topics
from protocol.identity import SigningKey


def test_topics_roundtrip() -> None:
    dev = SigningKey.generate().public.id
    assert topics.records(dev) == f"odo/v1/{dev}/records"
    assert topics.parse(topics.ack(dev)) == (dev, "ack")
    assert topics.shared("records") == "$share/odo-backend/odo/v1/+/records"
    with pytest.raises(BadFormat, match="device id"):
        topics.parse("odo/v1/XYZ/records")


def test_ack_roundtrip() -> None:
    rejected = (messages.Rejection(8, "chain_break"), messages.Rejection(None, "bad_format"))
    ack = messages.Ack(7, rejected, 1500)
    assert messages.decode_ack(messages.encode_ack(ack)) == ack


def test_batch_limits() -> None:
    with pytest.raises(BadFormat, match="records"):
        messages.decode_batch(b'{"records": 3}')
    with pytest.raises(BadFormat, match="JSON"):
        messages.decode_batch(b"{not json")
    assert messages.decode_batch(messages.encode_batch(["a.b.c"])) == messages.Batch(("a.b.c",))


def test_batch_carries_the_senders_clock() -> None:
    body = messages.encode_batch(["a.b.c"], boot="b00t", mono_ms=90_000)
    assert messages.decode_batch(body) == messages.Batch(("a.b.c",), "b00t", 90_000)
    with pytest.raises(ValueError, match="together"):
        messages.encode_batch(["a.b.c"], boot="b00t")
    # A clock that cannot be used only costs the dating: the records still count.
    for clock in ('"boot":"b\\n","mono_ms":1', '"boot":"b","mono_ms":-1',
                  '"boot":"b","mono_ms":9007199254740992', '"boot":"b","mono_ms":true',
                  '"boot":7,"mono_ms":1'):
        got = messages.decode_batch(('{"records":["a.b.c"],' + clock + "}").encode())
        assert got == messages.Batch(("a.b.c",)), clock
    assert messages.batch_fits(["x" * 1000] * 200)
    assert not messages.batch_fits(["x" * 1000] * 400)


def test_enrollment_self_signed() -> None:
    key = SigningKey.generate()
    body = messages.sign_enrollment(key, "WBA12345678901234", 1)
    e = messages.verify_enrollment(body)
    assert e.dev == key.public.id and e.vin == "WBA12345678901234" and e.t == 1 and e.jws == body
    assert not hasattr(e, "fleet_token")
    # another key cannot enrol under this id
    other = SigningKey.generate()
    forged = messages.sign_enrollment(other, None, 1)
    head, body_b64, sig = forged.split(".")
    with pytest.raises((BadFormat, BadSignature)):
        messages.verify_enrollment(".".join([body.split(".")[0], body_b64, sig]))


def _signed(key: SigningKey, **payload: object) -> str:
    from protocol import b64, canonical, jws

    full = {"v": 1, "dev": key.public.id, "pub": b64.encode(key.public.raw), "vin": None, "t": 1, **payload}
    return jws.sign(canonical.dumps(full), key, key.public.id)


def test_enroll_message_carries_the_token_beside_the_signed_enrolment() -> None:
    key = SigningKey.generate()
    signed = messages.sign_enrollment(key, None, 7)
    body = messages.encode_enroll(signed, "tok en~1")
    e, token = messages.decode_enroll(body)
    assert (e.jws, e.dev, e.vin, e.t, token) == (signed, key.public.id, None, 7, "tok en~1")
    assert messages.decode_enroll(messages.encode_enroll(signed, None)) == (e, None)
    for bad in ("", "x" * 201, "caf\u00e9", "line\nbreak"):
        with pytest.raises(ValueError, match="printable ASCII"):
            messages.encode_enroll(signed, bad)
        raw = ('{"enrolment":"' + signed + '","fleet_token":' + json.dumps(bad) + "}").encode()
        with pytest.raises(BadFormat, match="fleet_token must be 1 to 200 printable ASCII") as info:
            messages.decode_enroll(raw)
        assert bad not in str(info.value) or not bad


def test_enroll_message_is_strict_and_bounded() -> None:
    key = SigningKey.generate()
    signed = messages.sign_enrollment(key, None, 7)
    def body(**obj: object) -> bytes:
        return json.dumps(obj).encode()

    cases = {
        b"x" * (messages.MAX_ENROLL_BYTES + 1): "larger than 8192 bytes",
        b"[1]": "must be a JSON object",
        body(enrolment=signed, fleet_token=None, extra=1): "unknown members 'extra'",
        body(enrolment=signed): "missing 'fleet_token'",
        body(enrolment=3, fleet_token=None): "enrolment must be a string",
        body(enrolment=signed, fleet_token=5): "fleet_token must be",
        body(enrolment=signed, fleet_token={"a": 1}): "nested deeper",
        body(enrolment=_signed(key, extra=1), fleet_token=None): "unknown members 'extra'",
        body(enrolment=_signed(key, v=True), fleet_token=None): "v must be 1",
        body(enrolment=_signed(key, vin="nope"), fleet_token=None): "vin must be a VIN",
        body(enrolment=_signed(key, t=-1), fleet_token=None): "t must be",
    }
    for message, reason in cases.items():
        with pytest.raises(BadFormat, match=reason):
            messages.decode_enroll(message)


def test_the_old_enroll_form_is_refused_saying_what_the_new_one_is() -> None:
    key = SigningKey.generate()
    old_payload = _signed(key, fleet_token="secret-token")
    for body in (old_payload.encode(), messages.sign_enrollment(key, None, 1).encode()):
        with pytest.raises(BadFormat, match="old form") as info:
            messages.decode_enroll(body)
        assert '"fleet_token"' in str(info.value) and "secret-token" not in str(info.value)
    wrapped = messages.encode_enroll(old_payload, None)
    with pytest.raises(BadFormat, match="holding fleet_token is the old form") as info:
        messages.decode_enroll(wrapped)
    assert "secret-token" not in str(info.value)
    with pytest.raises(BadFormat, match="old form"):
        messages.verify_enrollment(old_payload)


@given(st.integers(1, 70))
def test_merkle_inclusion_and_consistency(n: int) -> None:
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    root = merkle.root(leaves)
    for i in range(n):
        assert merkle.root_from_inclusion(i, n, leaves[i], merkle.inclusion_proof(i, leaves)) == root
    for m in range(1, n + 1):
        proof = merkle.consistency_proof(m, leaves)
        assert merkle.verify_consistency(m, n, merkle.root(leaves[:m]), root, proof)
    if n > 1:
        bad = merkle.leaf_hash(b"x")
        assert merkle.root_from_inclusion(0, n, bad, merkle.inclusion_proof(0, leaves)) != root


def test_merkle_known_vector() -> None:
    # RFC 6962 test vector: the empty tree and a one-leaf tree of the empty string
    assert merkle.root([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert merkle.leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
