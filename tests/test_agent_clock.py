"""Clock state, boot id, backoff and systemd notifications: the small parts."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent import clock, sdnotify
from agent.backoff import Backoff
from agent.errors import ClockError
from tests.fakes import Ticker

ROOT = Path(__file__).resolve().parent.parent

CHRONY = """Reference ID    : C0A80001 (gw)
Stratum         : 3
System time     : 0.000012 seconds fast of NTP time
Leap status     : {leap}
"""


def test_synchronised_by_timesyncd_timedatectl_or_chrony(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers: dict[str, str | None] = {"timedatectl": "no\n", "chronyc": None}
    monkeypatch.setattr(clock, "_run", lambda args: answers[args[0]])
    monkeypatch.setattr(clock, "TIMESYNC_FLAG", tmp_path / "synchronized")
    assert not clock.system_synchronised()
    (tmp_path / "synchronized").touch()
    assert clock.system_synchronised()
    (tmp_path / "synchronized").unlink()
    answers["timedatectl"] = "yes\n"
    assert clock.system_synchronised()
    answers["timedatectl"] = None
    answers["chronyc"] = CHRONY.format(leap="Not synchronised")
    assert not clock.system_synchronised()
    answers["chronyc"] = CHRONY.format(leap="Normal")
    assert clock.system_synchronised()


def test_clock_rechecks_while_unsynced_then_stays_synced() -> None:
    tick = Ticker()
    calls: list[float] = []
    synced = [False]

    def probe() -> bool:
        calls.append(tick())
        return synced[0]

    c = clock.Clock("auto", probe=probe, recheck_s=30, monotonic=tick)
    assert c.state() == "unsynced" and c.state() == "unsynced" and len(calls) == 1
    tick.advance(30)
    synced[0] = True
    assert c.state() == "synced" and len(calls) == 2
    synced[0] = False
    tick.advance(100)
    assert c.state() == "synced" and len(calls) == 2
    assert clock.Clock("unsynced", probe=lambda: True).state() == "unsynced"
    assert clock.Clock("synced", probe=lambda: False).state() == "synced"
    with pytest.raises(ValueError):
        clock.Clock("maybe")


def test_boot_id(tmp_path: Path) -> None:
    f = tmp_path / "boot_id"
    f.write_text("b48915f9-b4ee-4c46-96c9-40740dd76197\n")
    assert clock.boot_id(f) == "b48915f9b4ee4c4696c940740dd76197"
    assert len(clock.boot_id()) == 32  # this machine's


def test_an_unreadable_boot_id_fails_loudly(tmp_path: Path) -> None:
    """Never a made-up "unknown": the backend would compare monotonic times across reboots."""
    with pytest.raises(ClockError, match="missing"):
        clock.boot_id(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClockError, match="no boot id"):
        clock.boot_id(tmp_path / "empty")


def _unit_proc_options(unit: Path) -> list[str]:
    """The proc(5) mount options that the unit's ProcSubset= and ProtectProc= stand for."""
    settings = dict(line.split("=", 1) for line in unit.read_text().splitlines()
                    if line.startswith(("ProcSubset=", "ProtectProc=")))
    options = []
    if settings.get("ProcSubset") == "pid":
        options.append("subset=pid")
    if settings.get("ProtectProc") in ("invisible", "noaccess", "ptraceable"):
        options.append(f"hidepid={settings['ProtectProc']}")
    return options


def _boot_id_under(options: list[str]) -> subprocess.CompletedProcess[str]:
    mount = f"mount -t proc -o {','.join(options)} proc /proc" if options else "mount -t proc proc /proc"
    code = "from agent.clock import boot_id; print(boot_id())"
    return subprocess.run(["unshare", "--mount", "sh", "-c", f'{mount} && exec "$0" -c "$1"', sys.executable,
                           code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="mounting a private /proc needs root and unshare(1)")
@pytest.mark.parametrize("unit", ["odo-agent.service", "odo-agent-ui.service"])
def test_boot_id_under_the_units_own_proc_restrictions(unit: str) -> None:
    """The boot id is read as the shipped unit lets it: /proc mounted with the unit's options."""
    done = _boot_id_under(_unit_proc_options(ROOT / "systemd" / unit))
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"[0-9a-f]{32}", done.stdout.strip())
    # and under ProcSubset=pid, which hides /proc/sys, it refuses rather than makes one up
    hidden = _boot_id_under(["subset=pid"])
    assert hidden.returncode != 0 and "ClockError" in hidden.stderr and "ProcSubset" in hidden.stderr


def test_backoff_is_jittered_capped_and_resets() -> None:
    b = Backoff(1.0, 8.0, rand=lambda: 1.0)
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    b.reset()
    low = Backoff(1.0, 8.0, rand=lambda: 0.0)
    assert [low.next() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.next() == 1.0
    real = Backoff(2.0, 60.0)
    delays = [real.next() for _ in range(50)]
    assert all(0 < d <= 60 for d in delays) and len(set(delays)) > 40


def test_sdnotify_abstract_socket_and_watchdog_env(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0odo-agent-test-notify")
    sock.settimeout(2)
    try:
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "@odo-agent-test-notify"})
        assert sock.recv(64) == b"READY=1"
    finally:
        sock.close()
    assert not sdnotify.notify("READY=1", {})
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "120000000"}) == 120.0
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval_s({}) is None
