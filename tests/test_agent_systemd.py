"""The unit files in systemd/, checked by systemd itself (``systemd-analyze verify``)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
INSTALL = "sudo apt-get update && sudo apt-get install -y systemd"
ODO_AGENT = Path(sys.executable).parent / "odo-agent"


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail(f"systemd-analyze is missing; install it with: {INSTALL}")
    return found


def staged(tmp_path: Path, edit: tuple[str, str] | None = None) -> list[Path]:
    """Copies of the units whose ExecStart= names this checkout's odo-agent: `verify`
    rejects a unit whose executable does not exist, and /usr/bin/odo-agent need not."""
    out = []
    for unit in sorted(UNITS.glob("odo-agent*")):
        text = unit.read_text().replace("/usr/bin/odo-agent", str(ODO_AGENT))
        if edit and unit.name == "odo-agent.service":
            text = text.replace(*edit)
        (tmp_path / unit.name).write_text(text)
        out.append(tmp_path / unit.name)
    return out


def verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze(), "verify", *map(str, units)], capture_output=True, text=True, timeout=60,
                          check=False)


def test_units_verify_cleanly(tmp_path: Path) -> None:
    units = staged(tmp_path)
    assert {u.name for u in units} == {"odo-agent.service", "odo-agent-reminder.service",
                                       "odo-agent-reminder.timer", "odo-agent-ui.service"}
    res = verify(units)
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_a_broken_unit_is_caught(tmp_path: Path) -> None:
    res = verify(staged(tmp_path, ("WatchdogSec=", "WatchdogSecs=")))
    assert "Unknown key" in res.stderr


def test_the_agent_service_is_supervised_and_hardened(tmp_path: Path) -> None:
    text = (UNITS / "odo-agent.service").read_text()
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    service = unit["Service"]
    expected = {
        "Type": "notify", "Restart": "on-failure", "RestartPreventExitStatus": "78", "User": "odoledger",
        "Group": "odoledger", "SupplementaryGroups": "dialout", "StateDirectory": "odoledger",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert int(service["WatchdogSec"]) > 0
    staged(tmp_path)
    deps = " ".join(unit["Unit"].get(k, "") for k in ("After", "Wants", "Requires", "BindsTo"))
    assert "network-online" not in deps
    assert "PrivateDevices" not in service  # would hide /dev/ttyUSB0 and /dev/rfcomm0
    cmd = [analyze(), "security", "--offline=yes", "--threshold=25", str(tmp_path / "odo-agent.service")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout[-400:]
