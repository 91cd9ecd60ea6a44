"""Coverage-guided fuzzing (atheris, libFuzzer) of the MQTT payload parsers, for long runs::

    python -m tests.fuzz_atheris CORPUS_DIR -atheris_runs=1000000

The first byte of each input picks the message (``records``, ``enroll``, ``claim``, ``status``),
the rest is its body, handed to what the backend does with it before any database: the same
properties as the hypothesis cases of ``tests/test_fuzz_mqtt.py`` (only :class:`BadFormat` and
:class:`BadSignature` escape, every refusal is one that does not take a seq, only a genuine
record authenticates). :func:`write_corpus` writes genuine messages to start from.
``ODO_FUZZ_LONG=1`` runs it from the suite when atheris is installed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["protocol", "backend.records.verify"]):
    from backend.records import verify
    from protocol import messages
    from protocol.errors import BadFormat, BadSignature

from backend.records.verify import DeviceKey, Parsed, Refusal  # noqa: E402
from protocol.identity import SigningKey  # noqa: E402
from sim.devices import Dongle  # noqa: E402

#: Fixed keys, so that a corpus written once still holds records these keys signed.
_D = Dongle(key=SigningKey.from_pem(
    b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g\n"
    b"-----END PRIVATE KEY-----\n"))
_KEYS = {_D.dev: DeviceKey("approved", _D.key.public.raw)}
_RECORDS = [_D.odometer(1), _D.trip(3), _D.confirmation("2026-W40")]
_GENUINE = {r.jws for r in _RECORDS}
_REFUSALS = messages.UNSEQUENCED - {"vin_mismatch"}
CHANNELS = ("records", "enroll", "claim", "status")


def write_corpus(directory: Path) -> None:
    """Genuine messages of each channel, as inputs (the channel's byte, then the body)."""
    bodies = {"records": messages.encode_batch([r.jws for r in _RECORDS], boot="boot-1", mono_ms=5),
              "enroll": _D.enroll_message(), "claim": messages.sign_claim(_D.key, "23456789", 1).encode(),
              "status": messages.encode_status(backlog=3, last_seq=2)}
    directory.mkdir(parents=True, exist_ok=True)
    for i, (channel, body) in enumerate(bodies.items()):
        (directory / f"{channel}-{i}").write_bytes(bytes([CHANNELS.index(channel)]) + body)


def one_input(data: bytes) -> None:
    if not data:
        return
    channel, body = CHANNELS[data[0] % len(CHANNELS)], data[1:]
    try:
        if channel == "records":
            for item in messages.decode_batch(body).records:
                parsed = verify.parse(item)
                if isinstance(parsed, Refusal):
                    assert parsed.reason == "bad_format", parsed
                    continue
                assert isinstance(parsed, Parsed)
                outcome = verify.authenticate(_D.dev, parsed, _KEYS.get(parsed.kid))
                assert (outcome.reason in _REFUSALS if isinstance(outcome, Refusal)
                        else outcome.jws in _GENUINE), item
        elif channel == "enroll":
            messages.decode_enroll(body)
        elif channel == "claim":
            if messages.claim_kid(body) == _D.dev:
                messages.verify_claim(body, _D.key.public)
        else:
            messages.decode_status(body)
    except (BadFormat, BadSignature):
        pass


def main(argv: list[str]) -> None:
    corpus = next((a for a in argv[1:] if not a.startswith("-")), None)
    if corpus is None:
        corpus = tempfile.mkdtemp(prefix="odo-fuzz-corpus-")
        argv = [argv[0], corpus, *argv[1:]]
    write_corpus(Path(corpus))
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
