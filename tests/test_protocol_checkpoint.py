"""Inclusion and consistency against C2SP checkpoint notes (protocol.checkpoint)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import BadFormat, BadSignature, checkpoint, merkle, note
from protocol.identity import SigningKey

KEY = SigningKey.generate()
ORIGIN = "odoledger.example.net/log"
LOG = checkpoint.log_verifier(ORIGIN, KEY.public)


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(b"entry %d" % i) for i in range(n)]


def _signed(n: int, root: bytes, origin: str = ORIGIN) -> checkpoint.NoteCheckpoint:
    return checkpoint.open_note(checkpoint.sign_note(KEY, origin, n, root).signed,
                                checkpoint.log_verifier(origin, KEY.public))


def test_a_checkpoint_is_three_lines_signed_under_the_origin() -> None:
    root = merkle.root(_leaves(5))
    cp = checkpoint.sign_note(KEY, ORIGIN, 5, root)
    body, _, sigs = cp.signed.partition("\n\n")
    assert body.split("\n") == [ORIGIN, "5", cp.root_b64]
    assert sigs.startswith(f"{note.DASH} {ORIGIN} ") and sigs.endswith("\n")
    back = checkpoint.open_note(cp.signed, LOG)
    assert (back.origin, back.size, back.root) == (ORIGIN, 5, root)


def test_another_log_or_key_is_refused() -> None:
    cp = checkpoint.sign_note(KEY, ORIGIN, 0, merkle.EMPTY_ROOT)
    with pytest.raises(BadFormat, match="of log"):
        checkpoint.open_note(cp.signed, checkpoint.log_verifier("other.example/log", KEY.public))
    other = SigningKey.generate()
    forged = checkpoint.sign_note(other, ORIGIN, 0, merkle.EMPTY_ROOT)
    with pytest.raises(BadSignature):
        checkpoint.open_note(forged.signed, LOG)


@settings(max_examples=60)
@given(st.data())
def test_changing_any_character_fails(data: st.DataObject) -> None:
    signed = checkpoint.sign_note(KEY, ORIGIN, 3, merkle.root(_leaves(3))).signed
    i = data.draw(st.integers(0, len(signed) - 1))
    replacement = data.draw(st.sampled_from("AQgw+/=x\n0 "))
    tampered = signed[:i] + replacement + signed[i + 1:]
    if tampered == signed:
        return
    with pytest.raises((BadFormat, BadSignature)):
        checkpoint.open_note(tampered, LOG)


@settings(max_examples=40)
@given(st.integers(1, 80), st.data())
def test_inclusion_into_a_checkpoint(n: int, data: st.DataObject) -> None:
    entries = [b"entry %d" % i for i in range(n)]
    leaves = [merkle.leaf_hash(e) for e in entries]
    cp = _signed(n, merkle.root(leaves))
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
    old = _signed(old_n, merkle.root(leaves[:old_n]))
    new = _signed(new_n, merkle.root(leaves))
    proof = merkle.consistency_proof(old_n, leaves) if old_n else []
    checkpoint.verify_consistency(old, new, proof)
    if old_n and old_n < new_n:
        rewritten = _signed(new_n, merkle.root([merkle.leaf_hash(b"other")] + leaves[1:]))
        with pytest.raises(BadFormat, match="does not extend"):
            checkpoint.verify_consistency(old, rewritten, proof)
    with pytest.raises(BadFormat, match="two logs"):
        checkpoint.verify_consistency(old, _signed(new_n, merkle.root(leaves), "other.example/log"), proof)
