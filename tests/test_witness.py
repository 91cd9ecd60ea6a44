"""The witness: the add-checkpoint wire format (protocol.witness), its decisions (witness.core),
its state file, and the real ``odo-witness`` process over HTTP on a loopback port."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from protocol import BadFormat, merkle, note
from protocol import checkpoint as cp
from protocol import witness as wire
from protocol.b64 import std_encode
from protocol.identity import SigningKey
from tests.e2e_support import left_running
from witness import core
from witness.state import MAX_REFUSED, NameMismatch, State, StateError

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = "odoledger.example.net/log"
TIMEOUT = 20


# -- a log to witness, built with the protocol code ------------------------------------------

@dataclass
class Log:
    """A Merkle log of random leaves, and its checkpoints signed by its key."""

    origin: str = ORIGIN
    key: SigningKey = field(default_factory=SigningKey.generate)
    leaves: list[bytes] = field(default_factory=list)

    def grow(self, n: int) -> Log:
        self.leaves += [merkle.leaf_hash(os.urandom(16)) for _ in range(n)]
        return self

    @property
    def size(self) -> int:
        return len(self.leaves)

    @property
    def root(self) -> bytes:
        return merkle.root(self.leaves)

    def checkpoint(self, key: SigningKey | None = None) -> bytes:
        return cp.sign_note(key or self.key, self.origin, self.size, self.root).signed.encode()

    def proof(self, old: int) -> list[bytes]:
        return [] if old in (0, self.size) else merkle.consistency_proof(old, self.leaves)

    def forged(self) -> bytes:
        """The checkpoint under the log key's name and ID, signed by another key."""
        text = cp.note_text(self.origin, self.size, self.root)
        line = note.sign(text, self.origin, SigningKey.generate())
        key_id = cp.log_verifier(self.origin, self.key.public).id
        return note.Note(text, (note.Signature(self.origin, key_id, line.signature),)).encode().encode()

    def request(self, old: int, proof: list[bytes] | None = None, key: SigningKey | None = None) -> bytes:
        return wire.encode_add_checkpoint(old, self.proof(old) if proof is None else proof,
                                          self.checkpoint(key))

    @property
    def vkey(self) -> str:
        return cp.log_verifier(self.origin, self.key.public).vkey

    def fork(self, keep: int) -> Log:
        """The same log key and origin, the first ``keep`` leaves, then other ones."""
        return Log(self.origin, self.key, self.leaves[:keep])


def _note_request(old: int, proof: list[bytes], log: Log | None = None) -> bytes:
    log = log or Log().grow(3)
    return f"old {old}\n".encode() + b"".join(std_encode(h).encode() + b"\n" for h in proof) + b"\n" + \
        log.checkpoint()


# -- protocol.witness ---------------------------------------------------------------------------

def test_request_round_trip() -> None:
    log = Log().grow(20)
    proof = merkle.consistency_proof(7, log.leaves)
    body = wire.encode_add_checkpoint(7, proof, log.checkpoint())
    assert body.startswith(b"old 7\n" + std_encode(proof[0]).encode() + b"\n")
    assert b"\n\n" + log.checkpoint() in body
    req = wire.parse_add_checkpoint(body)
    assert req == wire.AddCheckpoint(7, tuple(proof), log.checkpoint())
    empty = wire.parse_add_checkpoint(wire.encode_add_checkpoint(0, [], log.checkpoint()))
    assert empty.old_size == 0 and empty.proof == () and empty.note == log.checkpoint()
    assert wire.encode_add_checkpoint(0, [], log.checkpoint()) == b"old 0\n\n" + log.checkpoint()


def test_the_spec_example_is_read() -> None:
    """The request of c2sp.org/tlog-witness, as it shows it."""
    body = ("old 20852014\n"
            "PlRNCrwHpqhGrupue0L7gxbjbMiKA9temvuZZDDpkaw=\n"
            "jrJZDmY8Y7SyJE0MWLpLozkIVMSMZcD5kvuKxPC3swk=\n"
            "5+pKlUdi2LeF/BcMHBn+Ku6yhPGNCswZZD1X/6QgPd8=\n"
            "/6WVhPs2CwSsb5rYBH5cjHV/wSmA79abXAwhXw3Kj/0=\n"
            "\n"
            "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
            "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5"
            "/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n").encode()
    req = wire.parse_add_checkpoint(body)
    assert req.old_size == 20852014 and len(req.proof) == 4
    assert note.parse(req.note).text.startswith("example.com/behind-the-sofa\n20852163\n")


HASH = std_encode(bytes(32))
NOTE = Log().grow(3).checkpoint()


@pytest.mark.parametrize(("body", "message"), [
    (b"", "old size line"),
    (b"old 5", "old size line"),
    (b"olde 5\n\n" + NOTE, "must start with an old size line"),
    (b"old  5\n\n" + NOTE, "no leading zeroes"),
    (b"old 05\n\n" + NOTE, "no leading zeroes"),
    (b"old -1\n\n" + NOTE, "no leading zeroes"),
    (b"old 5\r\n\r\n" + NOTE, "no leading zeroes"),
    (b"old 9007199254740992\n\n" + NOTE, "2\\^53 - 1"),
    (b"old 12345678901234567890\n\n" + NOTE, "old size line is longer"),
    (b"old 0\n", "no empty line"),
    (f"old 0\n{HASH}\n".encode(), "no empty line"),
    (b"old 0\n\n", "no checkpoint after the empty line"),
    (b"old 0\nnot base64!\n\n" + NOTE, "proof line 1: not base64"),
    (f"old 0\n{HASH}\n{HASH[:-2]}B=\n\n".encode() + NOTE, "proof line 2: non-canonical base64"),
    (f"old 0\n{std_encode(bytes(31))}\n\n".encode() + NOTE, "proof line 1 is not a 32-byte hash"),
    (f"old 0\n{std_encode(bytes(33))}\n\n".encode() + NOTE, "proof line 1 is not a 32-byte hash"),
    (f"old 0\n{std_encode(bytes(34))}\n\n".encode() + NOTE, "proof line 1 is longer than 44"),
    (f"old 0\n{HASH}\r\n\n".encode() + NOTE, "proof line 1 is longer than 44"),
    (f"old 0\n{HASH}".encode(), "proof line 1 is longer than 44 characters or has no newline"),
    (b"old 0\n" + f"{HASH}\n".encode() * 64 + b"\n" + NOTE, "more than 63"),
    (b"old 0\n\nexample.com/log\n1\n" + HASH.encode() + b"\n", "no blank line before the signatures"),
    (b"old 0\n\n" + NOTE + b"trailing", "final newline"),
    (b"old 0\n\n" + NOTE.replace(b"\xe2\x80\x94", b"-"), "em dash"),
    (b"old 0\n\n\xff\n\n", "not UTF-8"),
])
def test_malformed_requests_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadFormat, match=message):
        wire.parse_add_checkpoint(body)


def test_sixty_three_proof_lines_are_read() -> None:
    body = f"old 0\n{HASH}\n".encode() + f"{HASH}\n".encode() * 62 + b"\n" + NOTE
    assert len(wire.parse_add_checkpoint(body).proof) == 63


def test_the_body_is_bounded_before_it_is_read() -> None:
    assert wire.MAX_REQUEST_BYTES == 21 + 63 * 45 + 1 + note.MAX_NOTE_BYTES
    with pytest.raises(BadFormat, match=f"larger than {wire.MAX_REQUEST_BYTES} bytes"):
        wire.parse_add_checkpoint(b"old 0\n\n" + b"x" * wire.MAX_REQUEST_BYTES)
    big = b"old 0\n\n" + b"a" * (note.MAX_NOTE_BYTES + 1)
    with pytest.raises(BadFormat, match="larger than 65536 bytes"):
        wire.parse_add_checkpoint(big)


@pytest.mark.parametrize(("old", "proof", "data", "error", "message"), [
    (-1, [], NOTE, ValueError, "old size"),
    (2**53, [], NOTE, ValueError, "old size"),
    (True, [], NOTE, ValueError, "old size"),
    (1, [bytes(32)] * 64, NOTE, ValueError, "at most 63"),
    (1, [bytes(31)], NOTE, ValueError, "hash 0 is 31 bytes"),
    (1, [], b"no note", BadFormat, "no blank line"),
])
def test_encoding_refuses_what_could_not_be_sent(old: int, proof: list[bytes], data: bytes,
                                                 error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        wire.encode_add_checkpoint(old, proof, data)


def test_cosignature_answer_round_trip() -> None:
    text = cp.note_text(ORIGIN, 3, bytes(32))
    key = SigningKey.generate()
    sigs = [note.cosign(text, "witness.example/w1", key, 1_700_000_000),
            note.cosign(text, "witness.example/w2", key, 1_700_000_001)]
    body = wire.encode_cosignatures(sigs)
    assert body.count(b"\n") == 2 and body.startswith("\u2014 witness.example/w1 ".encode())
    assert wire.parse_cosignatures(body) == sigs
    with pytest.raises(ValueError, match="1 to 64"):
        wire.encode_cosignatures([])


LINE = note.cosign(cp.note_text(ORIGIN, 3, bytes(32)), "w", SigningKey.generate(), 1).line.encode()


@pytest.mark.parametrize(("body", "message"), [
    (b"", "one or more signature lines"),
    (LINE[:-1], "ending in a newline"),
    (b"\xff\n", "not UTF-8"),
    (LINE + b"\n", "line 2: must start with an em dash"),
    (LINE.replace(b" w ", b" w\t"), "control character"),
    (LINE * 65, "more than 64"),
    (b"x" * (wire.MAX_RESPONSE_BYTES + 1), "larger than"),
    ("\u2014 w not-base64!\n".encode(), "line 1 w: not base64"),
    ("\u2014 w+x AAAAAAA=\n".encode(), "key name"),
])
def test_malformed_answers_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadFormat, match=message):
        wire.parse_cosignatures(body)


def test_size_answer() -> None:
    assert wire.encode_size(20852014) == b"20852014\n"
    assert wire.parse_size(b"0\n") == 0 and wire.parse_size(b"17\n") == 17
    for bad in (b"", b"17", b"017\n", b"-1\n", b"1 \n", b"9" * 30 + b"\n"):
        with pytest.raises(BadFormat, match="witness size"):
            wire.parse_size(bad)
    assert wire.PATH == "/add-checkpoint" and wire.SIZE_CONTENT_TYPE == "text/x.tlog.size"


# -- witness.core: the decisions, without a process ------------------------------------------

def _submit(log: Log, body: bytes) -> core.Submission:
    return core.open_submission(body, {log.origin: [cp.log_verifier(log.origin, log.key.public)]})


def _refused(status: int, message: str, log: Log, body: bytes, last: core.Cosigned | None = None) -> None:
    with pytest.raises(core.Refused, match=message) as info:
        core.check(_submit(log, body), last)
    assert info.value.status == status


def test_core_decisions() -> None:
    log = Log().grow(10)
    last = core.Cosigned(log.origin, 10, log.root)
    core.check(_submit(log, log.request(0)), None)
    core.check(_submit(log, log.request(10)), last)                     # the same checkpoint again
    _refused(409, "last cosigned size is 10", log, log.request(0), last)
    _refused(422, "old size 0 takes an empty consistency proof", log, log.request(0, [bytes(32)]))
    _refused(422, "the consistency proof must be empty", log, log.request(10, [bytes(32)]), last)
    other = log.fork(0).grow(10)
    _refused(422, "size 10 was cosigned with root", other, other.request(10), last)
    log.grow(5)
    core.check(_submit(log, log.request(10)), last)
    _refused(422, "does not lead from the cosigned size 10", other.grow(5), other.request(10), last)
    with pytest.raises(core.Refused, match="above the checkpoint's size") as info:
        _submit(log, log.request(16, []))
    assert info.value.status == 400


def test_an_empty_tree_must_have_the_empty_root() -> None:
    log = Log()
    text = f"{ORIGIN}\n0\n{std_encode(bytes(32))}\n"
    body = b"old 0\n\n" + note.Note(text, (note.sign(text, ORIGIN, log.key),)).encode().encode()
    with pytest.raises(core.Refused, match="empty tree") as info:
        _submit(log, body)
    assert info.value.status == 422
    core.check(_submit(log, log.request(0)), None)                      # the real empty tree is fine


def test_core_refusals_before_any_state() -> None:
    log = Log().grow(4)
    cases = [
        (b"old x\n\n", 400, "old size must be"),
        (b"old 0\n\n" + log.forged(), 403, "does not verify"),
        (log.request(0, key=SigningKey.generate()), 403, "0 valid signature"),
        (Log("elsewhere.example/log", log.key).grow(1).request(0), 404, "unknown log origin"),
        (b"old 0\n\n" + f"{ORIGIN}\n4\n{std_encode(log.root)}\nextension\n\n".encode()
         + log.checkpoint().split(b"\n\n")[1], 400, "exactly an origin"),
    ]
    for body, status, message in cases:
        with pytest.raises(core.Refused, match=message) as info:
            _submit(log, body)
        assert info.value.status == status, message
    unsigned = note.Note(cp.note_text(ORIGIN, 4, log.root),
                         (note.sign(cp.note_text(ORIGIN, 4, log.root), "someone.else", log.key),))
    with pytest.raises(core.Refused, match="0 valid signature") as info:
        _submit(log, b"old 0\n\n" + unsigned.encode().encode())
    assert info.value.status == 403


# -- witness.state ------------------------------------------------------------------------------

def test_state_keeps_the_key_and_compares_and_sets(tmp_path: Path) -> None:
    path = str(tmp_path / "w.db")
    state = State(path)
    me = state.identity("witness.example/w1", 1)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    a, b = core.Cosigned(ORIGIN, 5, bytes(32)), core.Cosigned(ORIGIN, 9, bytes([1]) * 32)
    assert state.advance(None, a, "note a", 2)
    assert not state.advance(None, b, "note b", 3)                       # someone else was first
    assert state.advance(a, b, "note b", 3)
    assert not state.advance(a, core.Cosigned(ORIGIN, 7, bytes(32)), "note", 4)   # a is stale
    record = state.last(ORIGIN)
    assert record is not None and record.cosigned == b and record.note == "note b"
    state.close()
    again = State(path)
    assert again.identity().verifier == me.verifier == again.identity("witness.example/w1").verifier
    with pytest.raises(NameMismatch, match="named 'witness.example/w1', not 'other'"):
        again.identity("other")
    assert [r.cosigned for r in again.records()] == [b]
    again.close()


def test_state_keeps_the_first_refusals(tmp_path: Path) -> None:
    state = State(str(tmp_path / "w.db"))
    for i in range(MAX_REFUSED + 3):
        assert state.keep_refused(ORIGIN, f"fork {i}", b"body", i) == (i < MAX_REFUSED)
    kept = state.refused()
    assert len(kept) == MAX_REFUSED and kept[0][2] == "fork 0"
    state.close()


def test_a_default_name_is_made(tmp_path: Path) -> None:
    state = State(str(tmp_path / "w.db"))
    assert re.fullmatch(r"witness-[0-9a-f]{8}", state.identity(None, 1).name)
    state.close()


def test_a_corrupt_state_file_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StateError, match="not a witness state file"):
        State(str(garbage))
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE x (y)")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="state version 0"):
        State(str(other))
    broken = tmp_path / "broken.db"
    State(str(broken)).close()
    conn = sqlite3.connect(broken)
    conn.execute("INSERT INTO checkpoints VALUES (?, 5, ?, 'n', 1)", (ORIGIN, b"short"))
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="checkpoint of 'odoledger.example.net/log' is corrupt"):
        State(str(broken))
    keyless = tmp_path / "keyless.db"
    State(str(keyless)).close()
    conn = sqlite3.connect(keyless)
    conn.execute("INSERT INTO checkpoints VALUES (?, 5, ?, 'n', 1)", (ORIGIN, bytes(32)))
    conn.commit()
    conn.close()
    state = State(str(keyless))
    with pytest.raises(StateError, match="holds cosigned checkpoints but no witness key"):
        state.identity()
    state.close()
    with pytest.raises(StateError, match="cannot create or open it"):
        State(str(tmp_path / "no" / "such" / "dir.db"))


# -- the odo-witness process -----------------------------------------------------------------

def odo_witness(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "witness", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


class WitnessProcess:
    """``odo-witness serve`` on a port the system chose, its log lines collected."""

    def __init__(self, state: Path, *args: str) -> None:
        self.state = state
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "witness", "serve", "--listen", "127.0.0.1:0", "--state", str(state),
             *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.port = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(TIMEOUT) or not self.port:
            self.stop()
            raise AssertionError("odo-witness did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found[1])
                self._ready.set()
        self._ready.set()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type", ""), resp.read()
        finally:
            conn.close()

    def add(self, body: bytes) -> tuple[int, str, bytes]:
        return self.request("POST", wire.PATH, body)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
            raise
        finally:
            self._reader.join(TIMEOUT)
            if self.proc.stderr is not None:
                self.proc.stderr.close()

    def log(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def log(tmp_path: Path) -> Log:
    made = Log()
    (tmp_path / "log.vkey").write_text(made.vkey + "\n")
    return made


@pytest.fixture
def served(tmp_path: Path, log: Log) -> Iterator[WitnessProcess]:
    w = WitnessProcess(tmp_path / "witness.db", "--log-key", str(tmp_path / "log.vkey"),
                       "--name", "witness.example/w1")
    yield w
    w.stop()
    assert left_running(tmp_path) == []


def witness_key(tmp_path: Path, state: Path) -> note.Verifier:
    out = tmp_path / "witness.vkey"
    res = odo_witness("key", "--state", str(state), "--out", str(out))
    assert res.returncode == 0, res.stderr
    return note.parse_vkey(out.read_text())


def cosigned(w: WitnessProcess, body: bytes) -> list[note.Signature]:
    status, ctype, answer = w.add(body)
    assert status == 200, answer
    return wire.parse_cosignatures(answer)


def expect(w: WitnessProcess, body: bytes, status: int, text: str) -> bytes:
    got, ctype, answer = w.add(body)
    assert got == status and text in answer.decode(), (got, answer)
    return answer


def test_the_first_checkpoint_is_cosigned(tmp_path: Path, log: Log, served: WitnessProcess) -> None:
    log.grow(5)
    before = int(time.time())
    sigs = cosigned(served, log.request(0))
    assert len(sigs) == 1
    key = witness_key(tmp_path, served.state)
    assert key.name == "witness.example/w1" and key.kind == note.COSIGNATURE_V1
    opened = cp.open_note(log.checkpoint().decode() + "".join(s.line for s in sigs),
                          cp.log_verifier(ORIGIN, log.key.public), [key], quorum=1)
    assert opened.size == 5 and opened.root == log.root
    [by_witness] = opened.cosignatures
    assert by_witness.timestamp is not None and before <= by_witness.timestamp <= int(time.time())
    assert "odoledger.example.net/log old 0 size 5: 200 cosigned" in served.log()


def test_a_growing_log_is_cosigned(tmp_path: Path, log: Log, served: WitnessProcess) -> None:
    key = witness_key(tmp_path, served.state)
    old = 0
    for n in (1, 1, 2, 0, 13, 111, 1):
        log.grow(n)
        sigs = cosigned(served, log.request(old))
        note.verify(note.parse(log.checkpoint() + sigs[0].line.encode()), [key])
        old = log.size
    status, ctype, text = served.request("GET", f"/{hashlib.sha256(ORIGIN.encode()).hexdigest()}/checkpoint")
    assert status == 200
    mine = cp.open_note(text, cp.log_verifier(ORIGIN, log.key.public), [key], quorum=1)
    assert mine.size == log.size == 129 and mine.root == log.root
    assert served.request("GET", f"/{'0' * 64}/checkpoint")[0] == 404


def test_a_wrong_old_size_is_a_conflict(log: Log, served: WitnessProcess) -> None:
    log.grow(3)
    status, ctype, body = served.add(log.request(2))
    assert (status, ctype, body) == (409, "text/x.tlog.size", b"0\n")
    cosigned(served, log.request(0))
    log.grow(4)
    for old in (0, 1, 5):
        status, ctype, body = served.add(log.request(old))
        assert (status, ctype, body) == (409, "text/x.tlog.size", b"3\n")
    cosigned(served, log.request(3))
    assert "old 5 size 7: 409 old size 5, but the last cosigned size is 3" in served.log()


def _state_of(w: WitnessProcess) -> core.Cosigned | None:
    state = State(str(w.state))
    try:
        record = state.last(ORIGIN)
        return record.cosigned if record else None
    finally:
        state.close()


def _refused_kept(w: WitnessProcess) -> list[tuple[str, int, str, bytes]]:
    state = State(str(w.state))
    try:
        return state.refused()
    finally:
        state.close()


def test_a_fork_at_the_same_size_is_refused(log: Log, served: WitnessProcess) -> None:
    log.grow(8)
    cosigned(served, log.request(0))
    cosigned(served, log.request(8))                       # the same checkpoint, again
    fork = log.fork(7).grow(1)
    expect(served, fork.request(8), 422, "size 8 was cosigned with root")
    assert _state_of(served) == core.Cosigned(ORIGIN, 8, log.root)
    [(origin, _, reason, body)] = _refused_kept(served)
    assert origin == ORIGIN and reason.startswith("size 8 was cosigned with root") and body == fork.request(8)
    assert "422 size 8 was cosigned with root" in served.log() and "kept in the state file" in served.log()
    log.grow(2)
    cosigned(served, log.request(8))                       # the true history goes on


def test_a_bigger_inconsistent_tree_is_refused(log: Log, served: WitnessProcess) -> None:
    log.grow(6)
    cosigned(served, log.request(0))
    fork = log.fork(5).grow(20)
    honest_looking = merkle.consistency_proof(6, fork.leaves)   # a proof from the fork's own size 6
    expect(served, fork.request(6, honest_looking), 422, "does not lead from the cosigned size 6")
    assert _state_of(served) == core.Cosigned(ORIGIN, 6, log.root)
    expect(served, fork.request(0), 409, "6")
    log.grow(1)
    cosigned(served, log.request(6))


def test_a_smaller_checkpoint_is_refused(log: Log, served: WitnessProcess) -> None:
    log.grow(10)
    cosigned(served, log.request(0))
    smaller = log.fork(5)
    assert served.add(smaller.request(5)) == (409, "text/x.tlog.size", b"10\n")
    expect(served, wire.encode_add_checkpoint(10, [], smaller.checkpoint()), 400,
           "old size 10 is above the checkpoint's size 5")
    assert _state_of(served) == core.Cosigned(ORIGIN, 10, log.root)


def test_a_bad_log_signature_is_forbidden(log: Log, served: WitnessProcess) -> None:
    log.grow(2)
    expect(served, b"old 0\n\n" + log.forged(), 403, "does not verify")
    expect(served, log.request(0, key=SigningKey.generate()), 403, "0 valid signature")
    text = cp.note_text(ORIGIN, 2, log.root)
    unknown_only = note.Note(text, (note.sign(text, "someone.example/log", log.key),)).encode().encode()
    expect(served, b"old 0\n\n" + unknown_only, 403, "0 valid signature")
    assert _state_of(served) is None


def test_an_unknown_origin_is_not_found(log: Log, served: WitnessProcess) -> None:
    other = Log("other.example/log", log.key).grow(2)
    expect(served, other.request(0), 404, "unknown log origin 'other.example/log'")


def test_a_bad_proof_is_unprocessable(log: Log, served: WitnessProcess) -> None:
    log.grow(9)
    cosigned(served, log.request(0))
    log.grow(9)
    proof = log.proof(9)
    bad = [proof[0], bytes(32), *proof[2:]]
    expect(served, log.request(9, bad), 422, "does not lead")
    expect(served, log.request(9, proof[:-1]), 422, "does not lead")
    expect(served, log.request(9, []), 422, "does not lead")
    expect(served, log.request(0, [bytes(32)]), 409, "9")
    assert _state_of(served) == core.Cosigned(ORIGIN, 9, log.fork(9).root)
    cosigned(served, log.request(9))


def test_an_old_size_zero_takes_no_proof(log: Log, served: WitnessProcess) -> None:
    log.grow(4)
    expect(served, log.request(0, [log.root]), 422, "empty consistency proof")
    assert _state_of(served) is None


def test_malformed_bodies_and_http_bounds(log: Log, served: WitnessProcess) -> None:
    expect(served, b"old 0\n", 400, "no empty line")
    expect(served, b"old 0\n\n" + log.checkpoint().replace(b"\n\n", b"\n"), 400, "no blank line")
    assert served.request("GET", wire.PATH)[0] == 405
    assert served.request("POST", "/elsewhere", b"x")[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=TIMEOUT)
    try:
        conn.putrequest("POST", wire.PATH)
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 411 and b"Content-Length" in resp.read()
    finally:
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=TIMEOUT)
    try:
        conn.putrequest("POST", wire.PATH)
        conn.putheader("Content-Length", str(wire.MAX_REQUEST_BYTES + 1))
        conn.endheaders()                                  # the body is never sent, nor read
        resp = conn.getresponse()
        assert resp.status == 413
    finally:
        conn.close()
    assert served.request("POST", wire.PATH, b"x", {"Content-Length": "01x"})[0] == 400


def test_keep_alive_serves_several_requests(log: Log, served: WitnessProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=TIMEOUT)
    try:
        for old, n in ((0, 3), (3, 4), (7, 0)):
            log.grow(n)
            conn.request("POST", wire.PATH, body=log.request(old))
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            assert resp.read().startswith("\u2014 witness.example/w1 ".encode())
    finally:
        conn.close()


def test_racing_requests_cosign_once(log: Log, served: WitnessProcess) -> None:
    log.grow(12)
    body = log.request(0)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(served.add(body)[0])) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert sorted(results) == [200] + [409] * 11


def test_a_restart_keeps_the_state(tmp_path: Path, log: Log) -> None:
    state = tmp_path / "witness.db"
    vkey = str(tmp_path / "log.vkey")
    w = WitnessProcess(state, "--log-key", vkey)
    log.grow(6)
    cosigned(w, log.request(0))
    assert w.stop() == 0 and "stopped" in w.log()
    key = witness_key(tmp_path, state)
    assert re.fullmatch(r"witness-[0-9a-f]{8}", key.name)
    again = WitnessProcess(state, "--log-key", vkey, "--name", key.name)
    try:
        assert again.add(log.request(0)) == (409, "text/x.tlog.size", b"6\n")
        expect(again, log.fork(5).grow(1).request(6), 422, "size 6 was cosigned with root")
        log.grow(3)
        sigs = cosigned(again, log.request(6))
        note.verify(note.parse(log.checkpoint() + sigs[0].line.encode()), [key])
    finally:
        assert again.stop(signal.SIGINT) == 0
    assert "stopped" in again.log()
    assert left_running(tmp_path) == []


def test_several_logs_are_witnessed(tmp_path: Path, log: Log) -> None:
    other = Log("odoledger.example.org/other")
    (tmp_path / "other.vkey").write_text(other.vkey)
    config = tmp_path / "witness.toml"
    config.write_text('listen = "127.0.0.1:1"\nstate = "w.db"\nlog_key = ["log.vkey", "other.vkey"]\n'
                      'name = "witness.example/w9"\n')
    w = WitnessProcess(tmp_path / "w.db", "--config", str(config))   # --listen and --state win
    try:
        cosigned(w, log.grow(2).request(0))
        cosigned(w, other.grow(5).request(0))
        assert w.add(log.grow(1).request(0)) == (409, "text/x.tlog.size", b"2\n")
        [sig] = cosigned(w, other.grow(1).request(5))
        assert sig.name == "witness.example/w9"
    finally:
        w.stop()


def test_the_key_command(tmp_path: Path) -> None:
    state = tmp_path / "new.db"
    res = odo_witness("key", "--state", str(state), "--out", "-", "--name", "witness.example/w2")
    assert res.returncode == 0, res.stderr
    key = note.parse_vkey(res.stdout)
    assert res.stdout == key.vkey + "\n"
    assert key.name == "witness.example/w2" and key.kind == note.COSIGNATURE_V1
    assert res.stdout.startswith(f"witness.example/w2+{note.key_id(key.name, 4, key.public).hex()}+")
    again = odo_witness("key", "--state", str(state), "--out", "-")
    assert again.stdout == res.stdout
    res = odo_witness("key", "--state", str(state), "--out", "-", "--name", "witness.example/w3")
    assert res.returncode == 78
    assert "--name: the witness in" in res.stderr and "witness.example/w2" in res.stderr
    res = odo_witness("key", "--state", str(state), "--out", str(tmp_path / "no" / "dir" / "k"))
    assert res.returncode == 1 and "--out" in res.stderr


@pytest.mark.parametrize(("setup", "args", "status", "message"), [
    (None, ["serve", "--state", "s.db", "--log-key", "log.vkey"], 2, "--listen HOST:PORT is required"),
    (None, ["serve", "--listen", "127.0.0.1:0", "--log-key", "log.vkey"], 2, "--state FILE is required"),
    (None, ["serve", "--listen", "127.0.0.1:0", "--state", "s.db"], 2, "--log-key FILE is required"),
    (None, ["serve", "--listen", "nowhere", "--state", "s.db", "--log-key", "log.vkey"], 2, "--listen: "),
    (None, ["serve", "--listen", "127.0.0.1:0", "--state", "s.db", "--log-key", "log.vkey", "--name", "a b"],
     2, "--name: witness name"),
    (None, ["serve", "--bogus"], 2, "unrecognized arguments"),
    (None, ["serve", "--listen", "127.0.0.1:0", "--state", "s.db", "--log-key", "missing.vkey"],
     78, "--log-key missing.vkey: cannot read it"),
    ({"bad.vkey": "odoledger.example.net/log+00000000+AQ==\n"},
     ["serve", "--listen", "127.0.0.1:0", "--state", "s.db", "--log-key", "bad.vkey"],
     78, "--log-key bad.vkey: verifier key"),
    ({"big.vkey": "x" * 5000},
     ["serve", "--listen", "127.0.0.1:0", "--state", "s.db", "--log-key", "big.vkey"],
     78, "larger than 4096 bytes"),
    ({"s.db": "garbage" * 200},
     ["serve", "--listen", "127.0.0.1:0", "--state", "s.db", "--log-key", "log.vkey"],
     78, "--state s.db: not a witness state file"),
    ({"c.toml": "listen = 5\n"}, ["serve", "--config", "c.toml"], 78, "listen must be a non-empty string"),
    ({"c.toml": "lisen = '127.0.0.1:1'\n"}, ["serve", "--config", "c.toml"], 78, "unknown keys lisen"),
    ({"c.toml": "listen = 'nowhere'\nstate = 's.db'\nlog_key = 'log.vkey'\n"},
     ["serve", "--config", "c.toml"], 78, "--config c.toml: listen: "),
    ({"c.toml": "[oops\n"}, ["serve", "--config", "c.toml"], 78, "not a TOML file"),
])
def test_bad_usage_and_configuration(tmp_path: Path, log: Log, setup: dict[str, str] | None,
                                     args: list[str], status: int, message: str) -> None:
    for name, text in (setup or {}).items():
        (tmp_path / name).write_text(text)
    res = subprocess.run([sys.executable, "-m", "witness", *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=TIMEOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == status, res.stderr
    assert message in res.stderr, res.stderr


def test_a_witness_key_is_not_a_log_key(tmp_path: Path) -> None:
    res = odo_witness("key", "--state", str(tmp_path / "w.db"), "--out", str(tmp_path / "w.vkey"))
    assert res.returncode == 0
    res = odo_witness("serve", "--listen", "127.0.0.1:0", "--state", str(tmp_path / "w2.db"),
                      "--log-key", str(tmp_path / "w.vkey"))
    assert res.returncode == 78 and "not type 0x04" in res.stderr


def test_a_name_other_than_the_stored_one_is_refused(tmp_path: Path, log: Log) -> None:
    state = str(tmp_path / "w.db")
    assert odo_witness("key", "--state", state, "--out", "-", "--name", "witness.example/a").returncode == 0
    res = odo_witness("serve", "--listen", "127.0.0.1:0", "--state", state, "--log-key",
                      str(tmp_path / "log.vkey"), "--name", "witness.example/b")
    assert res.returncode == 78
    assert "--name: the witness in" in res.stderr
    assert "'witness.example/a', not 'witness.example/b'" in res.stderr


def test_an_address_in_use_fails(tmp_path: Path, log: Log, served: WitnessProcess) -> None:
    res = odo_witness("serve", "--listen", f"127.0.0.1:{served.port}", "--state", str(tmp_path / "x.db"),
                      "--log-key", str(tmp_path / "log.vkey"))
    assert res.returncode == 1 and f"--listen 127.0.0.1:{served.port}: cannot listen there" in res.stderr


def test_the_documented_request_is_what_the_code_sends() -> None:
    """docs/witness.md's example: a real request of a log of `entry 0` … `entry 8`, cosigned up to 5."""
    text = (ROOT / "docs" / "witness.md").read_text(encoding="utf-8")
    block = re.search(r"Example \(a log of the 9 entries.*?\n```\n(.*?)```\n", text, flags=re.S)
    assert block, "docs/witness.md lost its example request"
    req = wire.parse_add_checkpoint(block[1].encode("utf-8"))
    leaves = [merkle.leaf_hash(b"entry %d" % i) for i in range(9)]
    origin, size, root = cp.parse_text(note.parse(req.note).text)
    assert (req.old_size, origin, size, root) == (5, ORIGIN, 9, merkle.root(leaves))
    assert list(req.proof) == merkle.consistency_proof(5, leaves)
    assert f"at most {wire.MAX_REQUEST_BYTES // 1000} {wire.MAX_REQUEST_BYTES % 1000:03d} bytes" in text
