"""``odo-backend`` commands in-process, and the settings they read (flags, ODO_*, --config)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend import config
from backend.cli import main
from backend.db import Database
from common.transport import BrokerURL, parse_broker_url, parse_listen
from sim.devices import FLEET_TOKEN, VIN, Dongle, enroll, write_rules


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ODO_DB", "ODO_CONFIG", "ODO_BROKER", "ODO_HTTP", "ODO_RULES", "ODO_API_TOKEN",
                 "ODO_FLEET_TOKEN", "ODO_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def db_file(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path}/backend.db"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as exc:                 # argparse
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_devices_commands(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "devices", "list", "--db", db_url)[1].startswith("no devices")
    db = Database.open(db_url)
    d, p = Dongle(vin=VIN), Dongle()
    enroll(db, d)
    enroll(db, p, approved=False)
    db.close()
    status, out, _ = run(capsys, "devices", "list", "--db", db_url, "--json")
    statuses = {x["dev"]: x["status"] for x in json.loads(out)}
    assert status == 0 and statuses == {d.dev: "approved", p.dev: "pending"}
    status, out, _ = run(capsys, "devices", "show", p.dev, "--db", db_url)
    assert status == 0 and p.dev in out and "pending" in out and "pub " in out
    status, out, _ = run(capsys, "devices", "approve", p.dev, "--vin", "WBA12345678901234", "--db", db_url,
                         "--json")
    approved = json.loads(out)
    assert status == 0 and approved["status"] == "approved" and approved["vin"] == "WBA12345678901234"
    assert approved["enrollment"]["decided_by"].startswith("cli:")
    status, out, _ = run(capsys, "devices", "revoke", d.dev, "--db", db_url)
    assert status == 0 and "revoked" in out
    status, _, err = run(capsys, "devices", "show", "0" * 32, "--db", db_url)
    assert status == 2 and "no device" in err
    status, _, err = run(capsys, "devices", "approve", d.dev, "--vin", "bad vin!", "--db", db_url)
    assert status == 2 and "--vin" in err
    status, out, _ = run(capsys, "devices", "show", d.dev, "--db", db_url, "--json")
    assert json.loads(out)["status"] == "revoked" and json.loads(out)["vin"] == VIN     # unchanged


def test_tokens_commands(db_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "tokens", "add", "--label", "workshop", "--max-uses", "3",
                           "--expires", "2099-01-01", "--db", db_file)
    token = out.strip()
    assert status == 0 and token.startswith("odo-ft-") and len(out.splitlines()) == 1 and "once" in err
    status, out, _ = run(capsys, "tokens", "list", "--db", db_file, "--json")
    listed = json.loads(out)
    assert status == 0 and listed[0]["label"] == "workshop" and listed[0]["max_uses"] == 3
    assert listed[0]["usable"] is True and token not in out
    assert token not in run(capsys, "tokens", "list", "--db", db_file)[1]
    assert run(capsys, "tokens", "add", "--label", "x", "--expires", "soon", "--db", db_file)[0] == 2
    assert run(capsys, "tokens", "add", "--label", "x", "--expires", "2001-01-01", "--db", db_file)[0] == 2
    assert run(capsys, "tokens", "add", "--label", "x", "--max-uses", "0", "--db", db_file)[0] == 2
    assert len(json.loads(run(capsys, "tokens", "list", "--db", db_file, "--json")[1])) == 1


def test_bad_flags_exit_2(db_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "devices", "list", "--no-such-flag")[0] == 2
    assert run(capsys, "devices", "frobnicate", "--db", db_file)[0] == 2
    status, _, err = run(capsys, "devices", "list")
    assert status == 2 and "--db" in err and "ODO_DB" in err
    status, _, err = run(capsys, "devices", "list", "--db", "mysql://x")
    assert status == 2 and "--db" in err and "mysql" in err


def test_config_file_and_environment(tmp_path: Path, db_file: str, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "backend.toml"
    cfg.write_text(f'db = "{db_file}"\n')
    assert run(capsys, "devices", "list", "--config", str(cfg))[0] == 0
    monkeypatch.setenv("ODO_CONFIG", str(cfg))
    assert run(capsys, "devices", "list")[0] == 0
    # the environment wins over the file, and a flag over both
    monkeypatch.setenv("ODO_DB", "mysql://from-env")
    status, _, err = run(capsys, "devices", "list")
    assert status == 78 and "ODO_DB" in err
    assert run(capsys, "devices", "list", "--db", db_file)[0] == 0
    monkeypatch.delenv("ODO_DB")
    for text, key in (('db = "x"\nfleet_tokn = "a"\n', "fleet_tokn"), ("db = 5\n", "db"), ("db = [", "TOML"),
                      ('session_expiry = "soon"\n', "session_expiry")):
        cfg.write_text(text)
        status, _, err = run(capsys, "devices", "list")
        assert status == 78 and key in err, (text, err)
    cfg.write_text("")
    status, _, err = run(capsys, "devices", "list")
    assert status == 78 and "db" in err and str(cfg) in err
    assert run(capsys, "devices", "list", "--config", str(tmp_path / "missing.toml"))[0] == 78


def _run_args(tmp_path: Path, db_file: str, **overrides: str) -> list[str]:
    values = {"--db": db_file, "--broker": "mqtt://127.0.0.1:1", "--http": "127.0.0.1:9",
              "--rules": str(write_rules(tmp_path)), **overrides}
    return ["run", *[x for k, v in values.items() if v for x in (k, v)]]


def test_run_refuses_bad_settings_before_starting(tmp_path: Path, db_file: str,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for flag, value, status in (("--broker", "ftp://host", 2), ("--broker", "mqtt://host:99999", 2),
                                ("--http", "8080", 2), ("--rules", str(tmp_path / "none.toml"), 78),
                                ("--tls-ca", str(tmp_path / "none.pem"), 2), ("--fleet-token", "   ", 2),
                                ("--client-id", "has space", 2)):
        got, _, err = run(capsys, *_run_args(tmp_path, db_file, **{flag: value}))
        assert got == status and (flag in err or "rules" in err), (flag, value, err)
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    got, _, err = run(capsys, *_run_args(tmp_path, db_file, **{"--tls-ca": str(ca)}))
    assert got == 2 and "mqtts" in err
    bad_rules = tmp_path / "bad.toml"
    bad_rules.write_text('version = "v"\nmax_speed_kph = 1.5\n')
    got, _, err = run(capsys, *_run_args(tmp_path, db_file, **{"--rules": str(bad_rules)}))
    assert got == 78 and "max_speed_kph" in err
    monkeypatch.setenv("ODO_HTTP", "nowhere")
    got, _, err = run(capsys, *_run_args(tmp_path, db_file, **{"--http": ""}))
    assert got == 78 and "ODO_HTTP" in err
    assert Database.open(db_file).query("SELECT name FROM sqlite_master WHERE name = 'devices'") == []


def test_settings_objects() -> None:
    expected = BrokerURL("mq.example", 8883, True, "be@x", "p:ss")
    assert parse_broker_url("mqtts://be%40x:p%3Ass@mq.example") == expected
    assert parse_broker_url("mqtt://h:1884") == BrokerURL("h", 1884, False, None, None)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    args = argparse.Namespace(db="sqlite:///tmp/x.db", broker="mqtt://u:secret-pass@h:1883",
                              http="127.0.0.1:8", rules="r.toml", fleet_token=FLEET_TOKEN,
                              api_token="api-secret-123", config=None)
    cfg = config.run_config(config.settings(args, environ={}))
    assert cfg.broker.password == "secret-pass" and cfg.broker.client_id.startswith("odo-backend-")
    shown = repr(cfg)
    assert "secret-pass" not in shown and FLEET_TOKEN not in shown and "api-secret-123" not in shown
    assert cfg.broker.display == "mqtt://u@h:1883"


def test_log_level_comes_from_the_config_file_too(tmp_path: Path, db_file: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "backend.toml"
    cfg.write_text(f'db = "{db_file}"\nlog_level = "loud"\n')
    status, _, err = run(capsys, "devices", "list", "--config", str(cfg))
    assert status == 78 and "log_level" in err
    cfg.write_text(f'db = "{db_file}"\nlog_level = "warning"\n')
    assert run(capsys, "devices", "list", "--config", str(cfg))[0] == 0
