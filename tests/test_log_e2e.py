"""The log as a buyer and its witnesses see it, on real parts: mosquitto, ``odo-backend run``
with two ``odo-witness`` processes, a car with its agent, ``odo-verify`` and the Go check."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from backend.db import Database
from backend.transparency import translog, witnesses
from protocol import note
from protocol.checkpoint import NoteCheckpoint, open_note
from sim.stack import CarSpec, Stack, Witness
from tests.e2e_support import wait_until
from tests.interop import gocheck
from tests.test_e2e import accepted_chain, enrolled, start_car

VIN = "WP0ZZZ99ZTS390021"
ORIGIN = "odoledger.test/log"
ODO_VERIFY = str(Path(sys.executable).parent / "odo-verify")


@pytest.fixture(scope="module")
def tlogcheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return gocheck.build(tmp_path_factory.mktemp("tlogcheck"))
    except gocheck.Missing as exc:
        pytest.fail(str(exc))


def _verifier(path: Path) -> note.Verifier:
    return note.parse_vkey(path.read_text())


def _checkpoint(stack: Stack, log_key: Path, cosigners: list[Witness], quorum: int) -> NoteCheckpoint:
    with urllib.request.urlopen(stack.api_url + "/log/checkpoint", timeout=5) as r:
        return open_note(r.read(), _verifier(log_key), [_verifier(w.vkey) for w in cosigners], quorum)


def _cosigned(stack: Stack, log_key: Path, cosigners: list[Witness], at_least: int) -> NoteCheckpoint | None:
    try:
        cp = _checkpoint(stack, log_key, cosigners, len(cosigners))
    except Exception:  # noqa: BLE001 - not yet cosigned by all
        return None
    return cp if cp.size >= at_least else None


def _odo_verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ODO_VERIFY, *args], capture_output=True, text=True, timeout=120, check=False)


def test_a_cosigned_certificate_the_log_now_and_a_fork_refused(tmp_path: Path, tlogcheck: Path) -> None:
    fast = ('clock = "synced"\nresend_after_s = 2.0\n\n[vehicle]\nrecord_every_ms = 1000\n\n'
            "[power]\non_poll_s = 1.0\n")
    with Stack(tmp_path, log_origin=ORIGIN, agent_settings=fast) as stack:
        stack.start_broker()
        a, b = stack.start_witness("a"), stack.start_witness("b")
        stack.start_backend()
        log_key = stack.log_key()
        assert log_key.read_text().startswith(ORIGIN + "+")
        car = enrolled(stack, start_car(stack, CarSpec(VIN, 30_000.0)))
        accepted_chain(stack, car, 3)
        with urllib.request.urlopen(stack.api_url + "/log/checkpoint", timeout=5) as r:
            size_now = int(r.read().decode().split("\n")[1])
        cp = wait_until("a checkpoint cosigned by both witnesses",
                        lambda: _cosigned(stack, log_key, [a, b], size_now), timeout=30)
        assert len(cp.cosignatures) == 2

        cert = tmp_path / "cert.json"
        done = stack.backend_cli("certificate", VIN, "--out", str(cert))
        assert done.returncode == 0, done.stderr
        keys = ["--log-key", str(log_key), "--witness-key", str(a.vkey), "--witness-key", str(b.vkey)]
        done = _odo_verify(str(cert), VIN, *keys, "--quorum", "2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "cosigned by 2 witness(es)" in done.stdout
        assert f"device {car.dev}: enrolled (signed by its own key)" in done.stdout, done.stdout
        assert "approve" in done.stdout and "by fleet-token" in done.stdout, done.stdout
        # a witness key the certificate was not cosigned by does not count
        stranger = tmp_path / "stranger.vkey"
        stranger.write_text(_stranger_vkey())
        done = _odo_verify(str(cert), "--log-key", str(log_key), "--witness-key", str(stranger))
        assert done.returncode == 1 and "cosigned by 0 of the known witnesses, 1 needed" in done.stdout

        # a copy of the database now, with the log's key: it will tell another story from here
        fork_path = tmp_path / "fork.db"
        src = sqlite3.connect(tmp_path / "backend.db")
        dst = sqlite3.connect(fork_path)
        src.backup(dst)
        src.close()
        copied = sum(int(dst.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])   # in the tree or not
                     for t in ("translog", "translog_queue"))
        dst.close()

        # the car drives on: a buyer with the certificate asks the log as it is now
        recs = accepted_chain(stack, car, 6)
        later = wait_until("a newer cosigned checkpoint",
                           lambda: _cosigned(stack, log_key, [a, b], max(cp.size + 3, copied + 1)),
                           timeout=30)
        done = _odo_verify(str(cert), VIN, *keys, "--log", stack.api_url + "/log")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "is consistent with the certificate's" in done.stdout
        assert "newer record(s)" in done.stdout and f"of device {car.dev}" in done.stdout
        assert len(recs) >= 6

        # the log's formats, checked by an implementation that is not ours
        outcome = gocheck.run(tlogcheck, stack.api_url + "/log", log_key, [a.vkey, b.vkey], quorum=2,
                              old=(cp.size, cp.root_b64))
        assert outcome.ok, (outcome.report, outcome.stderr)
        assert outcome.report["size"] >= later.size and outcome.report["cosignatures"] >= 2

        # the fork: entries the real log never had, after the copy, signed with the same key; the
        # witness has cosigned the real log beyond the copy, so no proof can join the two
        fork = Database.open(f"sqlite:///{fork_path}")
        with fork.write() as tx:
            for i in range(400):
                translog.append(tx, "record", f"forged-{i}", b"a history that never happened %d" % i)
        translog.checkpoint_now(fork, 1)
        with pytest.raises(witnesses.WitnessError, match="HTTP 4(09|22)|409 twice"):
            witnesses.push(fork, a.url, 2)
        fork.close()
        # the witness goes on cosigning the real log
        accepted_chain(stack, car, 8)
        wait_until("the real log cosigned after the fork was refused",
                   lambda: _cosigned(stack, log_key, [a, b], later.size + 1), timeout=30)
        metrics = _metrics(stack)
        assert "odo_log_witnesses_failing 0.0" in metrics and "odo_log_entries " in metrics

        # a witness that is down: the backend says so, and carries on
        stack.stop_witness("b")
        accepted_chain(stack, car, 9)
        wait_until("a failing witness counted",
                   lambda: "odo_log_witnesses_failing 1.0" in _metrics(stack), timeout=30)


def _metrics(stack: Stack) -> str:
    with urllib.request.urlopen(stack.api_url + "/metrics", timeout=5) as r:
        text: str = r.read().decode()
    return text


def _stranger_vkey() -> str:
    from protocol.identity import SigningKey

    return note.Verifier("stranger.example", note.COSIGNATURE_V1, SigningKey.generate().public).vkey + "\n"
