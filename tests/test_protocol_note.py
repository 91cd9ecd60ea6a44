"""Signed notes and cosignatures: the published vectors of c2sp.org/signed-note, and refusals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import BadFormat, BadSignature, b64, note
from protocol.identity import SigningKey

# c2sp.org/signed-note, "Verifier keys: Example".
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = ("This is an example message.\n\n"
             "\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mF"
             "XmRKuwHjG1Yu72IneyaQM=\n")
KEY = SigningKey.generate()
CHECKPOINT = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"


def test_the_specs_vector_verifies() -> None:
    v = note.parse_vkey(SPEC_VKEY)
    assert v.name == "example.com/foo" and v.kind == note.ED25519 and v.vkey == SPEC_VKEY
    parsed = note.parse(SPEC_NOTE)
    assert parsed.text == "This is an example message.\n"
    [ok] = note.verify(parsed, [v])
    assert ok.verifier == v
    assert parsed.encode() == SPEC_NOTE


def test_every_changed_character_of_the_specs_note_fails() -> None:
    v = note.parse_vkey(SPEC_VKEY)
    for i, c in enumerate(SPEC_NOTE):
        if c in "\u2014\n":
            continue
        changed = SPEC_NOTE[:i] + ("B" if c != "B" else "C") + SPEC_NOTE[i + 1:]
        with pytest.raises((BadFormat, BadSignature)):
            note.verify(note.parse(changed), [v])


def test_vkey_refusals() -> None:
    for bad in ("example.com/foo+530d903b+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",   # wrong ID
                "example.com/foo+530D903A+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",   # upper hex
                "example com+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",       # space
                "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2l",   # non-canonical
                "example.com/foo+530d903a", "x" * 600):
        with pytest.raises(BadFormat):
            note.parse_vkey(bad)


def test_sign_and_cosign_round_trip() -> None:
    log = note.Verifier("odoledger.example.net/log", note.ED25519, KEY.public)
    witness_key = SigningKey.generate()
    witness = note.Verifier("witness.example/w1", note.COSIGNATURE_V1, witness_key.public)
    signed = note.Note(CHECKPOINT, (note.sign(CHECKPOINT, log.name, KEY),
                                    note.cosign(CHECKPOINT, witness.name, witness_key, 1_679_315_147)))
    back = note.parse(signed.encode())
    assert back == signed
    [by_log] = note.verify(back, [log])
    [by_witness] = note.verify(back, [witness])
    assert by_log.timestamp is None and by_witness.timestamp == 1_679_315_147
    assert note.parse_vkey(witness.vkey) == witness
    # The same key under the other type has another ID: a log signature is no cosignature.
    assert note.Verifier(log.name, note.COSIGNATURE_V1, KEY.public).id != log.id
    with pytest.raises(BadSignature):
        note.verify(back, [note.Verifier("witness.example/w2", note.COSIGNATURE_V1, KEY.public)])


def test_a_known_key_that_fails_fails_the_note() -> None:
    log = note.Verifier("odoledger.example.net/log", note.ED25519, KEY.public)
    good = note.sign(CHECKPOINT, log.name, KEY)
    forged = note.Signature(log.name, log.id, bytes(64))
    with pytest.raises(BadSignature, match="does not verify"):
        note.verify(note.Note(CHECKPOINT, (good, forged)), [log])
    # Unknown keys are ignored, even with the log's name.
    stranger = note.Signature(log.name, b"\0\0\0\0", bytes(64))
    assert len(note.verify(note.Note(CHECKPOINT, (stranger, good)), [log])) == 1


def test_cosignature_timestamp_is_signed() -> None:
    wkey = SigningKey.generate()
    w = note.Verifier("w.example", note.COSIGNATURE_V1, wkey.public)
    sig = note.cosign(CHECKPOINT, w.name, wkey, 1000)
    moved = note.Signature(sig.name, sig.key_id, (1001).to_bytes(8, "big") + sig.signature[8:])
    with pytest.raises(BadSignature):
        note.verify(note.Note(CHECKPOINT, (moved,)), [w])


@pytest.mark.parametrize("text", [
    "no blank line\n\u2014 a AAAAAAA=\n",
    "text\n\n\u2014 a AAAA\n",                  # too short a signature
    "text\n\n- a AAAAAAAAAAAA\n",               # not an em dash
    "text\n\n\u2014 a AAAAAAAAAAAA",            # no final newline
    "te\x01xt\n\n\u2014 a AAAAAAAAAAAA\n",      # a control character
    "text\n\n" + "\u2014 a AAAAAAAAAAAA\n" * (note.MAX_SIGNATURES + 1),
    "x" * (note.MAX_NOTE_BYTES + 1),
])
def test_malformed_notes_are_refused(text: str) -> None:
    with pytest.raises(BadFormat):
        note.parse(text)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1, max_size=200))
def test_any_text_signs_and_verifies(body: str) -> None:
    text = body.replace("\n", " ") + "\n"
    v = note.Verifier("example.org/k", note.ED25519, KEY.public)
    signed = note.Note(text, (note.sign(text, v.name, KEY),)).encode()
    assert note.verify(note.parse(signed), [v])[0].verifier == v


def test_c2sp_checkpoint_round_trip_and_refusals() -> None:
    from protocol import checkpoint, merkle

    root = merkle.root([merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")])
    cp = checkpoint.sign_note(KEY, "odoledger.example.net/log", 2, root)
    assert cp.text == f"odoledger.example.net/log\n2\n{b64.std_encode(root)}\n"
    log = checkpoint.log_verifier("odoledger.example.net/log", KEY.public)
    back = checkpoint.open_note(cp.signed, log)
    assert (back.origin, back.size, back.root) == ("odoledger.example.net/log", 2, root)
    wkey = SigningKey.generate()
    w = note.Verifier("w.example", note.COSIGNATURE_V1, wkey.public)
    cosigned = cp.signed + note.cosign(cp.text, w.name, wkey, 1_700_000_000).line
    assert len(checkpoint.open_note(cosigned, log, [w], quorum=1).cosignatures) == 1
    with pytest.raises(BadSignature, match="1 needed"):
        checkpoint.open_note(cp.signed, log, [w], quorum=1)
    with pytest.raises(BadFormat, match="not of"):
        checkpoint.open_note(cp.signed, checkpoint.log_verifier("other.example/log", KEY.public))
    for text in ("o\n02\nAAAA\n", "o\n1\nAAAA\n", "o\n1\n" + b64.std_encode(root) + "\next\n",
                 "o\n0\n" + b64.std_encode(root) + "\n"):
        with pytest.raises(BadFormat):
            checkpoint.parse_text(text)


def test_a_vkey_whose_base64_holds_a_plus_parses() -> None:
    for _ in range(500):
        v = note.Verifier("example.org/k", note.COSIGNATURE_V1, SigningKey.generate().public)
        if "+" in v.vkey.split("+", 2)[2]:
            assert note.parse_vkey(v.vkey) == v
            return
    pytest.fail("no key with a '+' in its base64 in 500 tries")
