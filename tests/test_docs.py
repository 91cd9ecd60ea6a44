"""README.md keeps every command form that operators' scripts rely on (DESIGN §7), and what it
points at (make targets, scripts, files) exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PROGRAMS = ("odo-agent", "odo-backend", "odo-verify")

#: Each command form: the words that name it, then every option its documented form shows.
FORMS: dict[str, tuple[str, ...]] = {
    "odo-agent init": ("--state-dir", "--obd-port", "--broker", "--fleet-token"),
    "odo-agent enroll": ("--state-dir", "--wait"),
    "odo-agent run": ("--state-dir",),
    "odo-agent confirm": ("--state-dir", "--km", "--yes"),
    "odo-agent status": ("--state-dir", "--json"),
    "odo-agent ui": ("--state-dir", "--listen"),
    "odo-backend run": ("--db", "--broker", "--http", "--rules", "--fleet-token", "--api-token"),
    "odo-backend devices list": ("--db", "--json"),
    "odo-backend devices show": ("--db",),
    "odo-backend devices approve": ("--db",),
    "odo-backend devices revoke": ("--db",),
    "odo-backend drivers add": ("--db",),
    "odo-backend drivers assign": ("--vin", "--from", "--db"),
    "odo-backend rewards audit": ("--db", "--rules"),
    "odo-backend certificate": ("--db", "--out"),
    "odo-backend log-key": ("--db", "--out"),
    "odo-verify": ("--log-key",),
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


def test_make_test_runs_deps_venv_pytest_with_args_then_ruff() -> None:
    res = subprocess.run(["make", "-n", "-W", "pyproject.toml", "test", "PYTEST_ARGS=-x -k thing"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    order = [next(i for i, ln in enumerate(lines) if needle in ln)
             for needle in ("scripts/deps.sh", "pip install", "bin/pytest -x -k thing", "bin/ruff check")]
    assert order == sorted(order), lines


def test_shell_snippets_are_valid_shell(readme: str) -> None:
    for block in re.findall(r"^```sh\n(.*?)^```", readme, flags=re.S | re.M):
        res = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True, timeout=10)
        assert res.returncode == 0, f"{res.stderr}\n{block}"
