"""Verifying a large certificate the fast way gives the plain way's answers: the entries read
from the one encoding, the proofs walked as blobs, the signatures checked ahead by threads or
worker processes. The same first failure is named, in certificate order, with any number of
workers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor, Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import b64, canonical, merkle, messages
from protocol import certificate as pc
from protocol import certificate_fast as cf
from protocol.checkpoint import log_verifier, sign_note
from protocol.errors import BadFormat
from protocol.identity import SigningKey
from sim.devices import T0, Dongle
from verifier import cli
from verifier.cli import Workers

ORIGIN = "speedups.odoledger.test/log"
LOG_KEY = SigningKey.generate()
LOG = log_verifier(ORIGIN, LOG_KEY.public)
RECORDS = 5_000
BAD = 3_517                     # the record (counted from 1) whose signature is spoilt
ODO_VERIFY = str(Path(sys.executable).parent / "odo-verify")


def _spoil(jws_text: str) -> str:
    """The same record with one character of its signature changed (still canonical base64url)."""
    head, body, sig = jws_text.split(".")
    swapped = sig[:20] + ("A" if sig[20] != "A" else "B") + sig[21:]
    assert b64.encode(b64.decode(swapped)) == swapped
    return f"{head}.{body}.{swapped}"


class Made:
    """A certificate of one device's ``RECORDS`` records, each followed by another car's entry."""

    def __init__(self, change: Callable[[int, str], str] = lambda n, text: text) -> None:
        device = Dongle()
        self.dev, self.vin = device.dev, str(device.vin)
        entries: list[bytes] = []
        mine: list[int] = []
        at = T0 - 7 * 86_400_000
        entries.append(canonical.dumps({"entry": "enrolment", "at": at,
                                        "enrolment": messages.sign_enrollment(device.key, device.vin, at)}))
        entries.append(canonical.dumps({"entry": "decision", "action": "approve", "dev": device.dev,
                                        "vin": device.vin, "by": "operator:test", "at": at + 1,
                                        "replaces": None}))
        mine += [0, 1]
        self.index: dict[int, int] = {}          # record number (from 1) -> leaf index
        for n in range(1, RECORDS + 1):
            record = device.trip(3, minutes=5) if n % 10 == 0 else device.odometer(1)
            self.index[n] = len(entries)
            mine.append(len(entries))
            entries.append(change(n, record.jws).encode("ascii"))
            entries.append(b'{"entry":"transfer"}')
        self.entries = entries
        self.mth = merkle.range_hashes([merkle.leaf_hash(e) for e in entries])
        self.size = len(entries)
        self.mine = mine

    def cert(self) -> dict[str, Any]:
        checkpoint = sign_note(LOG_KEY, ORIGIN, self.size, self.mth(0, self.size))
        annotations = pc.sign_annotations(LOG_KEY, self.vin, T0 + RECORDS * 60_000, self.size, {}, [])
        chosen = [(i, self.entries[i], merkle.inclusion_path(self.mth, i, self.size)) for i in self.mine]
        return pc.build(self.vin, ORIGIN, checkpoint.signed, chosen, annotations)

    def data(self) -> bytes:
        return pc.encode(self.cert())


@pytest.fixture(scope="module")
def good() -> Made:
    return Made()


@pytest.fixture(scope="module")
def spoilt() -> Made:
    return Made(lambda n, text: _spoil(text) if n == BAD else text)


class Failing(Executor):
    """An executor that is broken: every chunk fails (and is then checked by the caller)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_exception(BrokenExecutor("broken on purpose"))
        return future


@pytest.fixture(params=["inline", "threads", "processes", "broken"])
def executor(request: pytest.FixtureRequest) -> Iterator[Executor | None]:
    if request.param == "inline":
        yield None
    elif request.param == "threads":
        with ThreadPoolExecutor(3) as pool:
            yield pool
    elif request.param == "processes":
        workers = Workers(2)
        try:
            yield workers
        finally:
            workers.shutdown()
    else:
        yield Failing()


def _summary(p: pc.Proven) -> tuple[Any, ...]:
    return (p.vin, [r.id for r in p.records], dict(p.indexes), p.gaps, p.starts, p.warnings, p.corrections,
            p.estimates, p.issued_at, p.ignored_signatures, [d.dev for d in p.devices], p.checkpoint.root)


def test_the_same_proof_with_any_executor(good: Made, executor: Executor | None) -> None:
    data = good.data()
    plain = pc.verify(data, LOG)
    assert len(plain.records) == RECORDS and cf.START_AT < RECORDS
    assert _summary(pc.verify(data, LOG, executor=executor)) == _summary(plain)
    # read the plain way (a mapping: no encoding to read fast), the same
    assert _summary(pc.verify(json.loads(data), LOG, executor=executor)) == _summary(plain)


def test_one_bad_signature_in_the_middle_is_named(spoilt: Made, executor: Executor | None) -> None:
    index = spoilt.index[BAD]
    expected = f"entry {index}: the signature of device {spoilt.dev} does not verify"
    data = spoilt.data()
    with pytest.raises(pc.CertificateError) as caught:
        pc.verify(data, LOG, executor=executor)
    assert str(caught.value) == expected
    with pytest.raises(pc.CertificateError) as caught:
        pc.verify(json.loads(data), LOG, executor=executor)
    assert str(caught.value) == expected


def test_the_first_failure_in_certificate_order_is_named(executor: Executor | None) -> None:
    """A bad signature after a record about another VIN: the VIN is named; before it: the
    signature (checked ahead, but reported in order)."""
    other = "WBA0OTHER00000002".replace("O", "0")

    def vin_then_signature(n: int, text: str) -> str:
        return _spoil(text) if n == 4_000 else text

    made = Made(vin_then_signature)
    cert = made.cert()
    leaves = [e for e in cert["entries"] if e["index"] == made.index[4_000]]
    assert leaves
    data = pc.encode(cert)
    with pytest.raises(pc.CertificateError, match=f"entry {made.index[4_000]}: the signature"):
        pc.verify(data, LOG, executor=executor)
    # the same certificate issued for another VIN: every record is about the wrong VIN, and the
    # first record's failure comes first, before the bad signature far behind it
    checkpoint = sign_note(LOG_KEY, ORIGIN, made.size, made.mth(0, made.size))
    annotations = pc.sign_annotations(LOG_KEY, other, 1, made.size, {}, [])
    chosen = [(i, made.entries[i], merkle.inclusion_path(made.mth, i, made.size)) for i in made.mine]
    wrong = pc.encode(pc.build(other, ORIGIN, checkpoint.signed, chosen, annotations))
    with pytest.raises(pc.CertificateError, match=f"record seq 1 of device {made.dev}: is about VIN"):
        pc.verify(wrong, LOG, executor=executor)


def test_a_wrong_proof_is_refused(good: Made, executor: Executor | None) -> None:
    cert = good.cert()
    n = 2_500
    proof = cert["entries"][n]["proof"]
    proof[3] = ("0" if proof[3][0] != "0" else "1") + proof[3][1:]
    with pytest.raises(pc.CertificateError) as caught:
        pc.verify(pc.encode(cert), LOG, executor=executor)
    assert str(caught.value).startswith(f"entries[{n}]: not included in the checkpoint (inclusion proof: "
                                        f"leaf {cert['entries'][n]['index']} does not lead")
    # a proof one hash short, and one hash too long
    for change in (lambda p: p.pop(), lambda p: p.append("ab" * 32)):
        cert = good.cert()
        change(cert["entries"][n]["proof"])
        with pytest.raises(pc.CertificateError, match=rf"entries\[{n}\]: not included in the checkpoint"):
            pc.verify(pc.encode(cert), LOG, executor=executor)


def test_odo_verify_says_the_same_with_any_number_of_jobs(good: Made, spoilt: Made, tmp_path: Path) -> None:
    key = tmp_path / "log.vkey"
    key.write_text(LOG.vkey + "\n")
    for made, name in ((good, "good.json"), (spoilt, "spoilt.json")):
        cert = tmp_path / name
        cert.write_bytes(made.data())
        runs = [subprocess.run([ODO_VERIFY, str(cert), "--log-key", str(key), "--json", "--jobs", str(jobs)],
                               capture_output=True, text=True, timeout=300, check=False) for jobs in (1, 3)]
        assert runs[0].returncode == runs[1].returncode == (0 if made is good else 1), runs[0].stderr
        assert runs[0].stdout == runs[1].stdout
        if made is spoilt:
            assert json.loads(runs[0].stdout)["failure"] == \
                f"entry {made.index[BAD]}: the signature of device {made.dev} does not verify"
    bad = subprocess.run([ODO_VERIFY, str(cert), "--log-key", str(key), "--jobs", "0"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "--jobs 0" in bad.stderr


def test_a_worker_that_dies_leaves_its_chunks_to_the_caller(spoilt: Made,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_WORKER", "import sys; sys.stdin.buffer.read(8); sys.exit(3)")
    workers = Workers(2)
    try:
        with pytest.raises(pc.CertificateError, match=f"entry {spoilt.index[BAD]}: the signature"):
            pc.verify(spoilt.data(), LOG, executor=workers)
    finally:
        workers.shutdown()


def test_workers_stop_whatever_order_they_are_shut_down_in() -> None:
    """odo-verify lets them stop while it writes the report, then cancels what is left: the
    second call must not take away the end marks of the first (every worker would wait)."""
    for jobs in (1, 3):
        workers = Workers(jobs)
        futures = [workers.submit(cf.check_chunk, [(0, SigningKey.generate().public.raw, bytes(64), b"x")])
                   for _ in range(jobs * 2)]
        workers.shutdown(wait=False)
        stopping = threading.Thread(target=workers.shutdown, kwargs={"cancel_futures": True}, daemon=True)
        stopping.start()                             # waits for every worker thread
        stopping.join(20)
        assert not stopping.is_alive(), "a worker thread never stopped"
        assert all(f.done() for f in futures)


# -- the pieces -------------------------------------------------------------------------------

def test_the_fast_reading_falls_back_to_the_plain_one_for_anything_else(good: Made) -> None:
    data = good.data()
    split = cf.split_encoded(data)
    assert split is not None and len(split[1]) == RECORDS + 2
    assert split[1][0][1] == good.entries[0]                       # an escaped leaf, read back
    assert split[1][5][2] == b"".join(merkle.inclusion_path(good.mth, good.mine[5], good.size))
    for old, new, error in (
        (b'"index": 4,', b'"index": 04,', "not JSON"),
        (b'"index": 4,', b'"index":  4,', "not in its one encoding"),
        (b'"proof": [\n    "', b'"proof": [\n    "a', r"entries\[0\]: proof must be a list of at most 64"),
    ):
        assert old in data
        changed = data.replace(old, new, 1)
        assert cf.split_encoded(changed) is None
        with pytest.raises(pc.CertificateError, match=error):
            pc.verify(changed, LOG)
    upper = data.replace(split[1][5][2].hex()[:64].encode(), split[1][5][2].hex()[:64].upper().encode(), 1)
    assert cf.split_encoded(upper) is None
    with pytest.raises(pc.CertificateError, match="lowercase hex"):
        pc.verify(upper, LOG)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 300), data=st.data())
def test_the_proof_walker_answers_as_the_rfc_does(size: int, data: st.DataObject) -> None:
    leaves = [merkle.leaf_hash(b"%d" % i) for i in range(size)]
    mth = merkle.range_hashes(leaves)
    walker = merkle.InclusionWalker(size)
    for index in sorted(data.draw(st.sets(st.integers(0, size - 1), min_size=1, max_size=20))):
        proof = merkle.inclusion_path(mth, index, size)
        cut = data.draw(st.sampled_from(["whole", "short", "long", "flipped"]))
        if cut == "short" and proof:
            proof = proof[:-1]
        elif cut == "long":
            proof = [*proof, b"\x07" * 32]
        elif cut == "flipped" and proof:
            proof = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
        try:
            expected: bytes | str = merkle.root_from_inclusion(index, size, leaves[index], proof)
        except BadFormat as exc:
            expected = str(exc)
        answers: list[bytes | str] = []
        for form in (b"".join(proof), proof):            # as a certificate carries it, and as a list
            try:
                answers.append(walker.root(index, leaves[index], form))
            except BadFormat as exc:
                answers.append(str(exc))
        got = answers[0]
        assert answers == [expected, expected]
        if cut == "whole":
            assert got == mth(0, size)
