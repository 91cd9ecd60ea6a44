"""README.md keeps every command form that operators' scripts rely on (docs/DESIGN.md §7), and what it
points at (make targets, scripts, files) exists."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cli as agent_cli
from agent import config as agent_config
from agent.power import PowerConfig
from agent.vehicle import VehicleConfig
from backend import cli as backend_cli
from backend import config as backend_config
from backend import errors as backend_errors
from common.transport import BrokerConfig
from verifier import cli as verifier_cli
from witness import cli as witness_cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PROGRAMS = ("odo-agent", "odo-backend", "odo-verify", "odo-witness")

#: Each command form: the words that name it, then every option its documented form shows.
FORMS: dict[str, tuple[str, ...]] = {
    "odo-agent init": ("--state-dir", "--obd-port", "--broker", "--fleet-token"),
    "odo-agent enroll": ("--state-dir", "--wait"),
    "odo-agent run": ("--state-dir",),
    "odo-agent confirm": ("--state-dir", "--km", "--yes"),
    "odo-agent status": ("--state-dir", "--json"),
    "odo-agent ui": ("--state-dir", "--listen"),
    "odo-backend run": ("--db", "--broker", "--http", "--rules", "--fleet-token", "--api-token",
                        "--log-origin", "--witness"),
    "odo-backend devices list": ("--db", "--json"),
    "odo-backend devices show": ("--db",),
    "odo-backend devices approve": ("--db",),
    "odo-backend devices revoke": ("--db",),
    "odo-backend drivers add": ("--db",),
    "odo-backend drivers assign": ("--vin", "--from", "--db"),
    "odo-backend rewards audit": ("--db", "--rules"),
    "odo-backend certificate": ("--db", "--out"),
    "odo-backend log-key": ("--db", "--out"),
    "odo-verify": ("--log-key", "--witness-key", "--quorum", "--log"),
    "odo-witness serve": ("--listen", "--state", "--log-key"),
    "odo-witness key": ("--state", "--out"),
}


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def command_lines(text: str) -> list[list[str]]:
    """Every command in the README's code blocks, as words: continuation lines joined (a
    trailing backslash, or an indented line of options), brackets and comments dropped, a
    leading ``sudo -u USER`` and a venv path removed, ``a|b`` alternatives split into one
    command per alternative."""
    commands: list[list[str]] = []
    for block in code_blocks(text):
        joined: list[str] = []
        for line in block.splitlines():
            line = line.split("  #")[0].split(" # ")[0].rstrip()
            if joined and (joined[-1].endswith("\\") or re.match(r"\s+[\[-]", line)):
                joined[-1] = joined[-1].rstrip("\\") + " " + line.strip()
            else:
                joined.append(line)
        for line in joined:
            words = line.replace("[", " ").replace("]", " ").split()
            if words[:2] == ["sudo", "-u"]:
                words = words[3:]
            if not words or Path(words[0]).name not in PROGRAMS:
                continue
            words[0] = Path(words[0]).name
            commands.extend(_alternatives(words))
    return commands


def _alternatives(words: list[str]) -> list[list[str]]:
    """``devices list|show DEV|approve DEV --db URL`` → one command per subcommand, each with
    the options that follow the alternatives."""
    first_option = next((i for i, w in enumerate(words) if w.startswith("--")), len(words))
    head, tail = words[:first_option], words[first_option:]
    if len(head) < 3 or not any("|" in w for w in head):
        return [words]
    rest = " ".join(head[2:])
    return [[head[0], head[1], *alt.split(), *tail] for alt in rest.split("|")]


def _matches(command: list[str], form: str, options: tuple[str, ...]) -> bool:
    name = form.split()
    return command[: len(name)] == name and set(options) <= set(command)


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


@pytest.mark.parametrize("form", list(FORMS))
def test_every_command_form_is_in_the_readme(readme: str, form: str) -> None:
    commands = command_lines(readme)
    assert any(_matches(c, form, FORMS[form]) for c in commands), (
        f"README.md shows no `{form}` with {' '.join(FORMS[form])}")


def test_the_command_parser_sees_what_it_should() -> None:
    """The checker itself: a form missing an option, or absent, is not found."""
    text = "```\nodo-agent status --state-dir DIR\nsudo -u odo /opt/x/bin/odo-agent ui --state-dir D \\\n" \
           "    --listen H:P\nodo-backend run --db U\n    [--broker B]\n```\n"
    commands = command_lines(text)
    assert not _matches(commands[0], "odo-agent status", FORMS["odo-agent status"])  # no --json
    assert _matches(commands[1], "odo-agent ui", FORMS["odo-agent ui"])
    assert commands[2] == ["odo-backend", "run", "--db", "U", "--broker", "B"]
    assert not any(_matches(c, "odo-verify", FORMS["odo-verify"]) for c in commands)
    alts = command_lines("```\nodo-backend devices list|show DEV|approve DEV --db URL [--json]\n"
                         "odo-backend drivers add ID | assign ID --vin VIN --db URL\n```\n")
    assert [c[:3] for c in alts] == [["odo-backend", "devices", "list"], ["odo-backend", "devices", "show"],
                                     ["odo-backend", "devices", "approve"], ["odo-backend", "drivers", "add"],
                                     ["odo-backend", "drivers", "assign"]]
    assert all(c[-3:] == ["--db", "URL", "--json"] for c in alts[:3])


def test_make_targets_in_the_readme_exist(readme: str) -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    used = set(re.findall(r"\bmake ([a-z][\w-]*)", readme))
    assert used, "the README shows no make command"
    assert used <= targets, f"README uses make targets the Makefile lacks: {sorted(used - targets)}"
    assert {"demo", "test"} <= used


def test_repository_paths_in_the_readme_exist(readme: str) -> None:
    """Paths into the parts this README describes: scripts, deploy files, bench, CI."""
    paths = set(re.findall(r"(?<![\w/])((?:scripts|deploy|bench|\.ci)/[\w./-]*\w)", readme))
    assert "scripts/deps.sh" in paths and "deploy/mosquitto/README.md" in paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README.md names files that do not exist: {missing}"


def test_the_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, flags=re.M), ".ci/run must run `make test`"


def test_make_test_runs_deps_venv_check_then_pytest_with_args() -> None:
    res = subprocess.run(["make", "-n", "-W", "pyproject.toml", "test", "PYTEST_ARGS=-x -k thing"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    order = [next(i for i, ln in enumerate(lines) if needle in ln)
             for needle in ("scripts/deps.sh", "pip install", "bin/ruff check", "bin/mypy",
                            "bin/pytest -x -k thing")]
    assert order == sorted(order), lines


def test_mypy_is_strict_on_every_package() -> None:
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert mypy["strict"] is True
    assert set(mypy["packages"]) == {"protocol", "common", "verifier", "agent", "backend", "witness"}


def test_shell_snippets_are_valid_shell(readme: str) -> None:
    for block in re.findall(r"^```sh\n(.*?)^```", readme, flags=re.S | re.M):
        res = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True, timeout=10)
        assert res.returncode == 0, f"{res.stderr}\n{block}"


# -- what the CLIs register and the settings they read are all documented ------------------------

def leaf_commands(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable (sub)command of ``parser``, as its words and its own parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield words, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaf_commands(sub, (*words, name))


def registered() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    return [*leaf_commands(agent_cli.parser(), ("odo-agent",)),
            *leaf_commands(backend_cli.build_parser(), ("odo-backend",)),
            *leaf_commands(witness_cli.build_parser(), ("odo-witness",)),
            *leaf_commands(verifier_cli.build_parser(), ("odo-verify",))]


def test_the_parser_walk_finds_nested_commands() -> None:
    names = {" ".join(words) for words, _ in registered()}
    assert {"odo-agent init", "odo-agent remind", "odo-backend devices approve",
            "odo-backend tokens add", "odo-backend operators passwd"} <= names
    assert "odo-backend devices" not in names         # a group, not a command


@pytest.mark.parametrize("words", [" ".join(w) for w, _ in registered()])
def test_every_registered_command_is_shown_in_the_readme(readme: str, words: str) -> None:
    name = words.split()
    assert any(c[: len(name)] == name for c in command_lines(readme)), (
        f"README.md shows no `{words}` command in a code block")


@pytest.mark.parametrize("words", [" ".join(w) for w, _ in registered()])
def test_every_option_of_every_command_is_named_in_the_readme(readme: str, words: str) -> None:
    parser = dict((" ".join(w), p) for w, p in registered())[words]
    options = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    missing = sorted(o for o in options if not re.search(re.escape(o) + r"(?![\w-])", readme))
    assert not missing, f"`{words}` options missing from README.md: {missing}"


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows whose first cell is a backticked key: key -> the other cells."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*`([a-z_]+)`\s*\|(.*)\|\s*$", line)
        if m:
            rows.setdefault(m.group(1), [c.strip() for c in m.group(2).split("|")])
    return rows


def _documented(value: object) -> str:
    """A default as the README writes it: TOML-like, in backticks."""
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return f"`{text}`"


AGENT_KEYS = sorted({*agent_config.KEYS, *(f.name for f in dataclasses.fields(agent_config.AgentConfig))})
BACKEND_KEYS = sorted(backend_config.KEYS)


def _section(readme: str, title: str, end: str) -> str:
    return readme.split(title, 1)[1].split(end, 1)[0]


@pytest.mark.parametrize("key", AGENT_KEYS)
def test_every_agent_setting_has_a_row(readme: str, key: str) -> None:
    rows = table_rows(_section(readme, "### Agent", "### Backend"))
    assert key in rows, f"README.md's agent table has no row for `{key}`"


AGENT_CLASSES = [agent_config.AgentConfig, BrokerConfig, VehicleConfig, PowerConfig]


@pytest.mark.parametrize("cls", AGENT_CLASSES, ids=lambda c: c.__name__)
def test_documented_agent_defaults_are_the_code_defaults(readme: str, cls: type) -> None:
    rows = table_rows(_section(readme, "### Agent", "### Backend"))
    checked = 0
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING or f.default is None or f.default == () or f.name in ("tls",):
            continue
        if f.name in ("host", "port"):
            continue
        if cls is BrokerConfig and f.name not in AGENT_KEYS:
            continue  # shared with the backend: only what the agent reads is an agent setting
        assert f.name in rows, f"no row for `{f.name}` ({cls.__name__})"
        assert rows[f.name][0] == _documented(f.default), (
            f"`{f.name}`: README says {rows[f.name][0]}, the code {_documented(f.default)}")
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("key", BACKEND_KEYS)
def test_every_backend_setting_has_a_row(readme: str, key: str) -> None:
    rows = table_rows(_section(readme, "### Backend", "### The rules file"))
    assert key in rows, f"README.md's backend table has no row for `{key}`"
    if key in ("session_expiry",):
        assert rows[key][1] == f"`{backend_config.DEFAULT_SESSION_EXPIRY_S}`"


def test_env_names_precedence_and_exit_statuses_are_stated(readme: str) -> None:
    config = " ".join(_section(readme, "## Configuration", "### Agent").split())
    assert "flag > the `ODO_*` environment variable > the TOML config file" in config
    assert "ODO_FLEET_TOKEN" in config and agent_config.ENV_PREFIX == "ODO_"
    assert "**2 bad flags**" in readme and "**78 bad configuration**" in readme
    assert backend_errors.EX_USAGE == 2 and backend_errors.EX_CONFIG == 78


def test_every_rejection_reason_and_metric_is_documented(readme: str) -> None:
    from backend.metrics import FleetFigures, Registry
    from protocol.messages import REASONS

    rows = table_rows(_section(readme, "### Reading rejection reasons", "### Drivers"))
    assert set(REASONS) <= set(rows), sorted(set(REASONS) - set(rows))
    # every metric the backend exposes, the fleet gauges included, by its exposed name
    exposed = Registry(fleet=lambda: FleetFigures(0, 0)).exposition().decode()
    names = set(re.findall(r"^# TYPE (odo_[a-z_]+) ", exposed, re.MULTILINE))
    assert names
    missing = sorted(n for n in names if f"`{n}" not in readme)
    assert not missing, f"metrics missing from README.md: {missing}"


def test_the_rules_example_in_the_readme_is_rules_example_toml(readme: str) -> None:
    example = (ROOT / "rules" / "example.toml").read_text()
    body = "\n".join(example.splitlines()[2:])        # the file's two comment lines at the top
    assert body.strip() in readme
