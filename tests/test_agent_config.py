from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import cli, identity
from agent.config import build_table, load
from agent.errors import ConfigError


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_flags_win_over_environment_over_file(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(
        'obd_port = "/dev/file"\nbroker = "mqtt://file:1"\ntolerance_m = 5\n'
    )
    env = {"ODO_OBD_PORT": "/dev/env", "ODO_BROKER": "mqtt://env:2", "ODO_TEST_PG": "ignored"}
    cfg = load({"state_dir": str(tmp_path), "obd_port": "/dev/flag"}, env)
    assert cfg.obd_port == "/dev/flag"
    assert cfg.broker is not None and (cfg.broker.host, cfg.broker.port) == ("env", 2)
    assert cfg.tolerance_m == 5
    other = tmp_path / "other.toml"
    other.write_text(f'state_dir = "{tmp_path}"\nclock = "synced"\n')
    cfg = load({"config": str(other)}, {})
    assert cfg.state_dir == tmp_path and cfg.clock == "synced" and cfg.obd_port is None


def test_secrets_never_show_in_repr(tmp_path: Path) -> None:
    cfg = load({"state_dir": str(tmp_path), "broker": "mqtts://dongle:s3cr%40t@mqtt.example.org",
                "fleet_token": "fleet-secret-token"}, {})
    assert cfg.broker is not None
    assert cfg.broker.password == "s3cr@t" and cfg.broker.username == "dongle"
    assert cfg.broker.tls and cfg.broker.port == 8883
    assert "s3cr" not in repr(cfg) and "fleet-secret-token" not in repr(cfg)
    assert cfg.broker.display == "mqtts://dongle@mqtt.example.org:8883"


@pytest.mark.parametrize(("toml", "key"), [
    ("tolerance_m = -3", "tolerance_m"),
    ('tolerance_m = "far"', "tolerance_m"),
    ('clock = "maybe"', "clock"),
    ('brokr = "mqtt://x:1"', "brokr"),
    ('broker = "http://x:1"', "broker"),
    ('broker = "mqtt://x:1"\ntls_ca = "/nonexistent/ca.pem"', "tls_ca"),
    ("max_records = 5", "max_records"),
    ("this is not toml", "config"),
])
def test_bad_config_names_the_key_and_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, key: str
) -> None:
    identity.create(tmp_path)
    (tmp_path / "agent.toml").write_text(toml + "\n")
    code, _, err = _run(capsys, "status", "--state-dir", str(tmp_path))
    assert code == 78
    assert key in err


def test_bad_environment_value_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    identity.create(tmp_path)
    monkeypatch.setenv("ODO_RETENTION_DAYS", "a month")
    code, _, err = _run(capsys, "status", "--state-dir", str(tmp_path))
    assert code == 78 and "retention_days" in err and "environment" in err


@pytest.mark.parametrize(("argv", "needle"), [
    (["init", "--obd-port", "/dev/x", "--broker", "ftp://h:1"], "broker"),
    (["init", "--obd-port", "/dev/x"], "broker"),
    (["confirm", "--km", "12345.67", "--yes"], "--km"),
    (["confirm", "--km", "-5", "--yes"], "--km"),
    (["enroll", "--wait", "soon"], "--wait"),
    (["status", "--jsn"], "--jsn"),
    (["launch"], "launch"),
])
def test_bad_flags_exit_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, _, err = _run(capsys, *argv[:1], "--state-dir", str(tmp_path), *argv[1:])
    assert code == 2
    assert needle in err
    assert not identity.key_path(tmp_path).exists()


def test_missing_state_dir_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ODO_STATE_DIR", raising=False)
    code, _, err = _run(capsys, "status")
    assert code == 2 and "--state-dir" in err


def test_init_makes_a_private_key_and_config_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    code, out, _ = _run(capsys, "init", "--state-dir", str(state), "--obd-port", "socket://127.0.0.1:35000",
                        "--broker", "mqtt://dongle:pw@127.0.0.1:1883", "--fleet-token", "tok")
    assert code == 0
    key_file = identity.key_path(state)
    pem = key_file.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert out.strip() == identity.load(state).public.id
    conf = state / "agent.toml"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    cfg = load({"state_dir": str(state)}, {})
    assert cfg.obd_port == "socket://127.0.0.1:35000" and cfg.fleet_token == "tok"
    assert cfg.broker is not None and cfg.broker.password == "pw"
    code, out, err = _run(capsys, "init", "--state-dir", str(state), "--obd-port", "/dev/y",
                          "--broker", "mqtt://other:1")
    assert code == 1 and "refusing" in err and out == ""
    assert key_file.read_bytes() == pem and "other" not in conf.read_text()


def test_commands_without_a_key_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "status", "--state-dir", str(tmp_path))
    assert code == 78 and "odo-agent init" in err


def test_run_needs_a_broker_and_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    identity.create(tmp_path)
    (tmp_path / "agent.toml").write_text('obd_port = "/dev/x"\n')
    monkeypatch.delenv("ODO_BROKER", raising=False)
    code, _, err = _run(capsys, "run", "--state-dir", str(tmp_path))
    assert code == 78 and "broker" in err


@dataclass(frozen=True)
class _Cfg:
    off_poll_s: int = 10
    on_poll_s: float = 1.0
    enabled: bool = True


def test_tables_are_validated_against_the_dataclass() -> None:
    assert build_table(_Cfg, "power", {"off_poll_s": 30, "on_poll_s": 2}) == _Cfg(30, 2)
    for values, key in [({"off_poll": 1}, "power.off_poll"), ({"off_poll_s": "x"}, "power.off_poll_s"),
                        ({"on_poll_s": -1.0}, "power.on_poll_s"), ({"enabled": 1}, "power.enabled")]:
        with pytest.raises(ConfigError) as err:
            build_table(_Cfg, "power", values)
        assert err.value.key == key and err.value.exit_code == 78


def test_km_figures() -> None:
    from agent.summary import km, parse_km

    assert parse_km("12345.6") == 12_345_600
    assert parse_km("12345") == 12_345_000
    assert parse_km(" 0.1 ") == 100
    for bad in ("12,345", "1e5", "12345.67", "", "-1", "12345."):
        with pytest.raises(ValueError):
            parse_km(bad)
    assert km(12_345_650) == "12,345.7 km" and km(None) == "unknown"


def test_init_writes_what_came_from_the_environment_too(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ODO_BROKER", "mqtt://env-broker:1883")
    monkeypatch.setenv("ODO_OBD_BAUDRATE", "38400")
    code, _, err = _run(capsys, "init", "--state-dir", str(tmp_path), "--obd-port", "socket://10.0.0.1:35000")
    assert code == 0, err
    monkeypatch.delenv("ODO_BROKER")
    monkeypatch.delenv("ODO_OBD_BAUDRATE")
    cfg = load({"state_dir": str(tmp_path)}, {})
    assert cfg.broker is not None and cfg.broker.host == "env-broker" and cfg.obd_baudrate == 38400
