from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import BadFormat, BadSignature, canonical, checkpoint, jws, merkle
from protocol.identity import SigningKey

KEY = SigningKey.generate()


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(b"entry %d" % i) for i in range(n)]


def test_sign_and_verify() -> None:
    leaves = _leaves(5)
    cp = checkpoint.sign(KEY, 5, merkle.root(leaves), 1_700_000_000_000)
    back = checkpoint.verify(cp.jws, KEY.public)
    assert back == cp
    assert back.kid == KEY.public.id and back.size == 5 and back.root == merkle.root(leaves)
    parts = jws.split(cp.jws)
    assert parts.header == {"alg": "Ed25519", "kid": KEY.public.id}
    assert canonical.loads_object(parts.payload) == {"v": 1, "size": 5, "root": merkle.root(leaves).hex(),
                                                     "t": 1_700_000_000_000}


def test_another_key_is_refused() -> None:
    cp = checkpoint.sign(KEY, 0, merkle.EMPTY_ROOT, 1)
    other = SigningKey.generate()
    with pytest.raises(BadFormat, match="signed by log key"):
        checkpoint.verify(cp.jws, other.public)
    # a checkpoint signed by another key that claims our kid
    forged = jws.sign(jws.split(cp.jws).payload, other, KEY.public.id)
    with pytest.raises(BadSignature):
        checkpoint.verify(forged, KEY.public)


def test_malformed_payloads() -> None:
    for payload, match in (({"v": 2, "size": 0, "root": "00" * 32, "t": 0}, "version"),
                           ({"v": 1, "size": -1, "root": "00" * 32, "t": 0}, "size"),
                           ({"v": 1, "size": 1, "root": "AB" * 32, "t": 0}, "root"),
                           ({"v": 1, "size": 0, "root": "00" * 32, "t": 0}, "empty tree"),
                           ({"v": 1, "size": 1, "root": "00" * 32, "t": 0, "x": 1}, "unexpected")):
        text = jws.sign(canonical.dumps(payload), KEY, KEY.public.id)
        with pytest.raises(BadFormat, match=match):
            checkpoint.verify(text, KEY.public)


@settings(max_examples=60)
@given(st.data())
def test_flipping_any_character_fails(data: st.DataObject) -> None:
    cp = checkpoint.sign(KEY, 3, merkle.root(_leaves(3)), 42)
    i = data.draw(st.integers(0, len(cp.jws) - 1))
    replacement = data.draw(st.sampled_from("AQgw-_.x"))
    tampered = cp.jws[:i] + replacement + cp.jws[i + 1:]
    if tampered == cp.jws:
        return
    with pytest.raises((BadFormat, BadSignature)):
        checkpoint.verify(tampered, KEY.public)


@settings(max_examples=40)
@given(st.integers(1, 80), st.data())
def test_inclusion_into_a_checkpoint(n: int, data: st.DataObject) -> None:
    entries = [b"entry %d" % i for i in range(n)]
    leaves = [merkle.leaf_hash(e) for e in entries]
    cp = checkpoint.sign(KEY, n, merkle.root(leaves), 1)
    i = data.draw(st.integers(0, n - 1))
    proof = merkle.inclusion_proof(i, leaves)
    checkpoint.verify_inclusion(cp, i, entries[i], proof)
    with pytest.raises(BadFormat, match="does not lead to the checkpoint's root"):
        checkpoint.verify_inclusion(cp, i, entries[i] + b"!", proof)
    if proof:
        j = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[j] = bytes([bad[j][0] ^ 1]) + bad[j][1:]
        with pytest.raises(BadFormat):
            checkpoint.verify_inclusion(cp, i, entries[i], bad)
    with pytest.raises(BadFormat, match="outside"):
        checkpoint.verify_inclusion(cp, n, entries[i], proof)


@settings(max_examples=30)
@given(st.integers(0, 40), st.integers(0, 40))
def test_consistency_between_checkpoints(a: int, b: int) -> None:
    old_n, new_n = sorted((a, b))
    leaves = _leaves(new_n)
    old = checkpoint.sign(KEY, old_n, merkle.root(leaves[:old_n]), 1)
    new = checkpoint.sign(KEY, new_n, merkle.root(leaves), 2)
    proof = merkle.consistency_proof(old_n, leaves) if old_n else []
    checkpoint.verify_consistency(old, new, proof)
    if old_n and old_n < new_n:
        rewritten = checkpoint.sign(KEY, new_n, merkle.root([merkle.leaf_hash(b"other")] + leaves[1:]), 3)
        with pytest.raises(BadFormat, match="does not extend"):
            checkpoint.verify_consistency(old, rewritten, proof)
