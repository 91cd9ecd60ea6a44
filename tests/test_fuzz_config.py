"""Config and rules files, fuzzed: ``odo-backend run --config FILE`` (:mod:`backend.config`), rules
files (:func:`backend.ledger.rules.load_rules`, ``odo-backend rules publish FILE``) and the agent's
``agent.toml`` (:mod:`agent.config`), holding random TOML-ish text, wrong types, huge numbers,
deep nesting, characters beyond the BMP and invalid UTF-8. Each is read or refused with an error
that names the file (and the key, where there is one): exit status 78, never a traceback.

The agent writes ``agent.toml`` itself (``odo-agent init``): whatever text it is given, what it
writes reads back as the same text. The counts are printed at the end; ``ODO_FUZZ_LONG=1`` runs
twenty times as many.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent import cli as agent_cli
from agent.config import CONFIG_FILE, build_table, load, write_file
from agent.errors import ConfigError as AgentConfigError
from agent.power import PowerConfig
from agent.vehicle import VehicleConfig
from backend import config as backend_config
from backend.cli import build_parser
from backend.cli import main as backend_main
from backend.errors import EX_CONFIG, ConfigError, RulesError
from backend.ledger.rules import load_rules
from sim.devices import RULES
from tests import fuzz_support
from tests.fuzz_support import LONG, count

SCALE = 20 if LONG else 1
FUZZ = settings(deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _cases(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from fuzz_support.report(request, "config ")


# -- TOML-ish text ---------------------------------------------------------------------------

def _quoted(text: str) -> str:
    out = "".join(f"\\u{ord(c):04x}" if c < " " or c in '"\\\x7f' else c for c in text)
    return f'"{out}"'


_ODD_VALUES = [
    "9" * 4301, "1" * 5000, "-" + "9" * 40, str(2**64), str(2**63), "0x7fffffff", "1_000", "+1", "-0", "nan",
    "inf", "-inf", "1.5", "1e999", "true", "false", '"\\ud83d"', '"\\ud83d\\ude00"', '"\\U0001F600"',
    '"\U0001f600"', '"\\u0000"', "'literal'", '"""multi\nline"""', "1979-05-27T07:32:00Z", "1979-05-27",
    "07:32:00", "2027-01-01T00:00:00+01:00", "9999-12-31T23:59:59.999999+14:00", "1979-05-27T07:32:00",
    "[" * 3000 + "]" * 3000, "{a = " * 2000 + "1" + "}" * 2000, "{a = 1}", "[1, 'a']",
    '"' + "x" * 20000 + '"', "[[]]", "[{}]", '"\\x41"', '"\\q"', "", "=", '"\U0010ffff"']
scalars = st.one_of(st.integers(-(10**30), 10**30).map(str), st.sampled_from(_ODD_VALUES),
                    st.text(max_size=20).map(_quoted), st.booleans().map(lambda b: "true" if b else "false"))


def _nested(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """TOML arrays and inline tables of ``inner``'s values."""
    arrays = st.lists(inner, max_size=3).map(lambda v: f"[{', '.join(v)}]")
    tables = st.dictionaries(st.from_regex(r"[a-z_]{1,6}", fullmatch=True), inner, max_size=3).map(
        lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}")
    return arrays | tables


values = st.recursive(scalars, _nested, max_leaves=6)


_OVERLONG = [b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xff"]


def _key(names: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(names), st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True),
                     st.text(min_size=1, max_size=8).map(_quoted),
                     st.sampled_from(["\U0001f600", "a.b", "é"]))


@st.composite
def toml_text(draw: st.DrawFn, names: list[str], good: dict[str, list[str]], tables: list[str]) -> bytes:
    """A file of lines ``key = value`` (known keys with values good, nearly good or of any kind),
    tables and junk, sometimes not UTF-8 at all."""
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["pair", "pair", "pair", "good", "table", "junk"]))
        if kind == "good" and good:
            key = draw(st.sampled_from(sorted(good)))
            lines.append(f"{key} = {draw(st.sampled_from(good[key]))}")
        elif kind == "table":
            name = draw(st.one_of(st.sampled_from(tables or ["t"]), _key(names)))
            lines.append(draw(st.sampled_from([f"[{name}]", f"[[{name}]]"])))
        elif kind == "junk":
            lines.append(draw(st.text(max_size=30)))
        else:
            lines.append(f"{draw(_key(names))} = {draw(values)}")
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["as is"] * 5 + ["bom", "bytes", "overlong", "nul", "random"]))
    at = draw(st.integers(0, len(data)))
    if how == "bom":
        return b"\xef\xbb\xbf" + data
    if how == "bytes":
        return data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    if how == "overlong":
        return data[:at] + draw(st.sampled_from(_OVERLONG)) + data[at:]
    if how == "nul":
        return data[:at] + b"\x00" + data[at:]
    if how == "random":
        return draw(st.binary(max_size=200))
    return data


# -- odo-backend run --config FILE ---------------------------------------------------------------

def _backend_good(tmp: Path) -> dict[str, list[str]]:
    db = _quoted(f"sqlite:///{tmp}/backend.db")
    return {"db": [db, db, '"postgresql://["', '"postgresql://u:p@[::1]:99999/x?schema=A"', '"sqlite:///"',
                   '"sqlite://x"', '"mysql://h/x"', '"postgresql://h/x?schema=a&schema=b"'],
            "broker": ['"mqtt://127.0.0.1:1883"', '"mqtt://[::1"', '"mqtts://u:@h:0"', '"mqtt://h:99999"',
                       '"mqtt://"', '"http://h:1"', '"mqtt://u:p%zz@h:1"'],
            "http": ['"127.0.0.1:0"', '"[::1"', '"h:99999"', '":"', '"[::1]:80"', '"127.0.0.1:-1"'],
            "workers": ["2", "0", "33", "-1"], "session_expiry": ["60", "604801"], "secure_cookies": ["true"],
            "display_unit": ['"mi"', '"MI"', '"miles"'], "log_level": ['"info"', '"loud"'],
            "witness": ['["https://witness.example.org"]', '["ftp://w"]', '["https://w", "https://w"]'],
            "client_id": ['"odo-1"', '"\\u0000"', '"' + "x" * 200 + '"'],
            "log_origin": ['"example.org/log"', '"\\n"'],
            "tls_ca": ['"/nonexistent/ca.pem"'], "evidence_unknown": ["1", str(2**41)],
            "silent_hours": ["24", "0", str(10**6)],
            "webhook": ['[{url = "http://["}]', '[{url = 1}]', "[1]"]}


def check_backend_file(path: Path) -> None:
    """``odo-backend run --config path`` as far as its settings go: a run config, or a
    :class:`ConfigError` for exit status 78 that names the file."""
    args = build_parser().parse_args(["run", "--config", str(path)])
    try:
        cfg = backend_config.run_config(backend_config.settings(args, environ={}))
    except ConfigError as exc:
        assert exc.status == EX_CONFIG, exc
        assert str(path) in str(exc), exc
        return
    cfg.db.close()


@given(data=st.data())
@settings(FUZZ, max_examples=800 * SCALE)
def test_backend_config_files(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "backend.toml"
    text = data.draw(toml_text(sorted(backend_config.KEYS), _backend_good(tmp_path), ["webhook"]))
    path.write_bytes(text)
    count("config backend --config files")
    check_backend_file(path)


# -- rules files -------------------------------------------------------------------------------

_RULES_KEYS = ["version", "effective_from", "max_speed_kph", "max_clock_ahead_ms", "reward_backfill_days",
               "rollback_tolerance_m", "id", "on", "per", "milli_tokens", "tolerance_m",
               "milli_tokens_per_km", "cap_milli_tokens_per_week", "every_weeks", "weekly", "item"]


@st.composite
def rules_text(draw: st.DrawFn) -> bytes:
    """The tests' rules file with lines changed, dropped or added, or TOML-ish text of its keys."""
    if draw(st.booleans()):
        return draw(toml_text(_RULES_KEYS, {"version": ['"v1"'], "max_speed_kph": ["250", "0", str(10**16)],
                                            "effective_from": ["2027-01-01T00:00:00Z", "1969-12-31T23:59:59Z",
                                                               "2027-01-01T00:00:00.0001Z", "2027-01-01"]},
                              ["rule", "catalogue"]))
    lines = RULES.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(lines)))
        how = draw(st.sampled_from(["replace", "drop", "add"]))
        line = f"{draw(_key(_RULES_KEYS))} = {draw(values)}"
        if how == "replace" and at < len(lines) and "=" in lines[at]:
            line = lines[at].split("=", 1)[0] + "= " + draw(values)
        if how == "drop" and at < len(lines):
            del lines[at]
        else:
            lines.insert(at, line)
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@given(data=st.data())
@settings(FUZZ, max_examples=800 * SCALE)
def test_rules_files(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "rules.toml"
    path.write_bytes(data.draw(rules_text()))
    count("config rules files (load_rules)")
    try:
        load_rules(path)
    except RulesError as exc:
        assert str(exc).startswith(f"{path}: "), exc


@given(data=st.data())
@settings(FUZZ, max_examples=60 * SCALE)
def test_rules_publish_exits_78_naming_the_file(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "rules.toml"
    text = data.draw(rules_text())
    path.write_bytes(text)
    count("config rules files (odo-backend rules publish)")
    code, err = _backend_cli(["rules", "publish", str(path), "--db", f"sqlite:///{tmp_path}/publish.db"])
    assert code in (0, EX_CONFIG), err
    assert code == 0 or str(path) in err, err


def _backend_cli(argv: list[str]) -> tuple[int, str]:
    """``odo-backend ARGV`` in this process, without the test's ``ODO_*`` variables."""
    err = io.StringIO()
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("ODO_")}
    try:
        with contextlib.redirect_stderr(err):
            code = backend_main(argv)
    finally:
        os.environ.update(saved)
    return code, err.getvalue()


# -- the agent's agent.toml ------------------------------------------------------------------------

_AGENT_KEYS = ["state_dir", "obd_port", "obd_baudrate", "broker", "tls_ca", "tls_cert", "tls_key",
               "mqtt_version", "keepalive_s", "fleet_token", "tolerance_m", "display_unit", "clock",
               "max_records", "retention_days", "shutdown_command", "ui_listen", "resend_after_s",
               "log_level", "record_every_m", "off_poll_s", "on_poll_s"]
_AGENT_GOOD = {"obd_port": ['"/dev/rfcomm0"', '"socket://[::1"'], "off_poll_s": ["10", "nan", "inf", "1e400"],
               "record_every_m": ["1000", "9" * 400, "-1", "1.5"],
               "broker": ['"mqtt://127.0.0.1:1883"', '"mqtt://[::1"', '"mqtts://u:p@h:99999"'],
               "tolerance_m": ["2000", str(2**31)], "clock": ['"auto"'], "display_unit": ['"km"', '"mi"'],
               "max_records": ["50000", "99"], "fleet_token": ['"tok-\U0001f697"', '"\\u0000"'],
               "keepalive_s": ["30", "65536"], "resend_after_s": ["10", "nan", "inf", "86400"],
               "ui_listen": ['"0.0.0.0:8080"', '"[::1"', '"h:99999"'],
               "shutdown_command": ['["a", ""]', '"\\"x"'],
               "tls_ca": ['"/nonexistent"'], "mqtt_version": ['"3.1.1"', '"4"']}


def check_agent_dir(state: Path) -> None:
    """The agent's settings from ``state/agent.toml``: read, or a :class:`ConfigError` naming the
    file and exit status 78; its tables built, or refused naming the key."""
    path = state / CONFIG_FILE
    try:
        cfg = load({"state_dir": str(state)}, {})
    except AgentConfigError as exc:
        assert exc.source == "file" and exc.exit_code == 78, exc
        assert str(path) in str(exc), exc
        return
    for cls, table in ((VehicleConfig, "vehicle"), (PowerConfig, "power")):
        try:
            build_table(cls, table, getattr(cfg, table))
        except AgentConfigError as exc:
            assert exc.key.startswith(table) and exc.exit_code == 78, exc


@given(data=st.data())
@settings(FUZZ, max_examples=800 * SCALE)
def test_agent_config_files(tmp_path: Path, data: st.DataObject) -> None:
    (tmp_path / CONFIG_FILE).write_bytes(data.draw(toml_text(_AGENT_KEYS, _AGENT_GOOD, ["vehicle", "power"])))
    count("config agent.toml files")
    check_agent_dir(tmp_path)


_WRITTEN = ("obd_port", "broker", "fleet_token", "tls_ca", "mqtt_version")


@given(key=st.sampled_from(_WRITTEN), text=st.text(min_size=1))
@example(key="fleet_token", text="fleet-\U0001f697-token")
@example(key="obd_port", text="/dev/\U0001f600\x7f\"\\\u2028\ud7ff\ue000\U0010ffff")
@settings(FUZZ, max_examples=500 * SCALE)
def test_what_the_agent_writes_reads_back_the_same(tmp_path: Path, key: str, text: str) -> None:
    count("config agent.toml values written and read back")
    path = tmp_path / CONFIG_FILE
    path.unlink(missing_ok=True)
    write_file(path, {key: text, "obd_baudrate": 38400})
    assert tomllib.loads(path.read_text(encoding="utf-8")) == {key: text, "obd_baudrate": 38400}
    check_agent_dir(tmp_path)


def test_an_agent_initialised_with_an_emoji_reads_its_config(tmp_path: Path) -> None:
    state = tmp_path / "state"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = agent_cli.main(["init", "--state-dir", str(state), "--obd-port", "/dev/rfcomm0", "--broker",
                               "mqtt://127.0.0.1:1883", "--fleet-token", "fleet-\U0001f697-token"])
    assert code == 0, err.getvalue()
    assert "fleet-\U0001f697-token" in (state / CONFIG_FILE).read_text(encoding="utf-8")
    cfg = load({"state_dir": str(state)}, {})
    assert cfg.fleet_token == "fleet-\U0001f697-token" and cfg.obd_port == "/dev/rfcomm0"


def test_a_value_that_is_not_unicode_is_refused_before_it_is_written(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError) as err:
        load({"state_dir": str(tmp_path), "obd_port": "/dev/tty\udcff"}, {})
    assert err.value.key == "obd_port" and err.value.exit_code == 2


# -- the commands, as processes ------------------------------------------------------------------

_BAD_FILES: dict[str, bytes] = {
    "nested too deeply": b"a = " + b"[" * 5000 + b"]" * 5000,
    "an integer of 5000 digits": b"workers = " + b"9" * 5000,
    "invalid UTF-8": b'db = "sqlite:///x\xff.db"',
    "an overlong sequence": b'broker = "\xc0\xaf"',
    "a surrogate escape": b'fleet_token = "\\ud83d\\ude00"',
    "an emoji key": '"\U0001f600" = 1'.encode(),
    "a huge integer": b"session_expiry = 99999999999999999999",
    "a float": b"workers = 2.5",
    "a BOM": b'\xef\xbb\xbfdb = "sqlite:///x.db"',
}


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    """``odo-backend ARGV`` as a process of its own (the entry point, without ``ODO_*`` variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODO_")}
    return subprocess.run([sys.executable, "-c", "import sys; from backend.cli import main; sys.exit(main())",
                           *argv], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


@pytest.mark.parametrize("what", sorted(_BAD_FILES))
def test_odo_backend_run_exits_78_naming_the_file(tmp_path: Path, what: str) -> None:
    path = tmp_path / "backend.toml"
    path.write_bytes(_BAD_FILES[what])
    result = _run("run", "--config", str(path))
    assert result.returncode == EX_CONFIG, result.stderr
    assert "Traceback" not in result.stderr and str(path) in result.stderr, result.stderr
    count("config odo-backend run processes")


@pytest.mark.parametrize("what", ["nested too deeply", "an integer of 5000 digits", "invalid UTF-8",
                                  "a surrogate escape"])
def test_odo_backend_rules_publish_and_odo_agent_exit_78_naming_the_file(tmp_path: Path, what: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_bytes(_BAD_FILES[what])
    result = _run("rules", "publish", str(path), "--db", f"sqlite:///{tmp_path}/b.db")
    assert result.returncode == EX_CONFIG, result.stderr
    assert "Traceback" not in result.stderr and str(path) in result.stderr, result.stderr
    (tmp_path / CONFIG_FILE).write_bytes(_BAD_FILES[what])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = agent_cli.main(["status", "--state-dir", str(tmp_path)])
    assert code == 78 and str(tmp_path / CONFIG_FILE) in err.getvalue(), err.getvalue()
    count("config odo-backend rules publish processes and odo-agent runs", 2)
