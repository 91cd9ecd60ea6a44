"""What the agent costs to start: which libraries each command imports, and poll intervals in
fractions of a second (how ``bench.agent`` runs a day faster than the clock)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import build_table, load
from agent.errors import ConfigError
from agent.power import PowerConfig, PowerPolicy

ROOT = Path(__file__).resolve().parent.parent


def imported_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported after running ``code``."""
    script = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    return set(done.stdout.split())


def test_the_other_commands_import_neither_obd_nor_mqtt() -> None:
    """status, confirm, remind, ui; and enroll beside a running daemon, which asks it to send."""
    loaded = imported_after("from agent import cli, daemon, summary, ui")
    assert not {"obd", "serial", "pint", "paho"} & loaded


def test_help_imports_neither_obd_nor_mqtt() -> None:
    loaded = imported_after("import sys\nfrom agent import cli\ntry:\n    cli.main(['--help'])\n"
                            "except SystemExit:\n    pass")
    assert not {"obd", "serial", "pint", "paho"} & loaded


def test_python_obd_imported_first_is_used_as_it_is() -> None:
    code = """
import logging
import obd
from agent import obd_source
assert obd_source.ELM327 is obd.elm327.ELM327
assert obd.console_handler not in logging.getLogger("obd").handlers
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60, check=True)


def test_poll_intervals_take_fractions_of_a_second(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text("[power]\non_poll_s = 0.004\noff_poll_s = 0.0025\n")
    cfg = load({"state_dir": str(tmp_path)}, {})
    policy = PowerPolicy(build_table(PowerConfig, "power", cfg.power))
    assert policy.poll_interval_s(True) == 0.004
    assert policy.poll_interval_s(False) == 0.0025
    assert PowerPolicy(build_table(PowerConfig, "power", {"off_poll_s": 30})).poll_interval_s(False) == 30.0


@pytest.mark.parametrize("values", [{"off_poll_s": 0}, {"on_poll_s": 0.0}, {"off_poll_s": 3601},
                                    {"on_poll_s": float("inf")}, {"off_poll_s": float("nan")},
                                    {"off_poll_s": True}, {"on_poll_s": "1"}])
def test_poll_intervals_are_bounded(values: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as err:
        build_table(PowerConfig, "power", values)
    assert err.value.key.startswith("power")
    assert str(next(iter(values))) in str(err.value)
