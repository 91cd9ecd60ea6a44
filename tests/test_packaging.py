"""The shape of the distribution: which package may import what, and what pyproject declares.

Every import statement of every module is read from its AST, including those inside functions
and ``if TYPE_CHECKING:`` blocks, so that a lazy import cannot slip a dependency past the rule.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "common", "verifier", "agent", "backend", "witness")

#: What protocol/ may never import: the other packages, and anything that does I/O.
PROTOCOL_FORBIDDEN = {
    "agent", "backend", "socket", "sqlite3", "paho", "obd", "os", "pathlib", "subprocess", "time",
    "psycopg", "serial", "ssl", "select", "selectors", "asyncio", "threading", "multiprocessing",
    "shutil", "tempfile", "io", "urllib", "http", "requests", "httpx", "importlib", "logging.handlers",
}

#: Third-party I/O libraries and the only modules allowed to import each.
ONLY_IN = {
    "obd": {"agent/obd_source.py"},
    "serial": {"agent/obd_source.py"},
    "paho": {"agent/sync.py", "backend/records/ingest.py"},
    "psycopg": {"backend/db.py"},
    "sqlite3": {"backend/db.py", "agent/buffer.py", "witness/state.py"},
}


def modules(package: str, root: Path = ROOT) -> Iterator[Path]:
    yield from sorted((root / package).rglob("*.py"))


def imports(path: Path, root: Path = ROOT) -> Iterator[tuple[str, int]]:
    """(dotted module name, line) for every import in the file; relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = list(path.relative_to(root).parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield name, node.lineno
            for alias in node.names:  # `from os import path` names os.path; `from . import x`, pkg.x
                yield f"{name}.{alias.name}", node.lineno
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            yield "__import__", node.lineno


def top(name: str) -> str:
    return name.split(".")[0]


def rel(path: Path, root: Path = ROOT) -> str:
    return path.relative_to(root).as_posix()


def offenders(package: str, forbidden: set[str], root: Path = ROOT) -> list[str]:
    found = []
    for path in modules(package, root):
        for name, line in imports(path, root):
            if top(name) in forbidden or name in forbidden or name == "__import__":
                found.append(f"{rel(path, root)}:{line} imports {name}")
    return sorted(set(found))


def test_the_packages_exist_and_parse() -> None:
    for package in PACKAGES:
        files = list(modules(package))
        assert (ROOT / package / "__init__.py") in files
        for path in files:
            list(imports(path))  # a syntax error fails here, naming the file


def test_protocol_is_pure() -> None:
    assert offenders("protocol", PROTOCOL_FORBIDDEN) == []


def test_agent_and_backend_never_import_each_other() -> None:
    assert offenders("agent", {"backend", "verifier", "witness"}) == []
    assert offenders("backend", {"agent", "verifier", "witness"}) == []


def test_the_witness_stands_apart_from_the_log_it_watches() -> None:
    """odo-witness is run by someone else than the log's operator: it shares the formats only."""
    assert offenders("witness", {"agent", "backend", "verifier", "paho", "psycopg", "starlette"}) == []


def test_common_and_the_verifier_stand_on_their_own() -> None:
    """common/ is shared by agent and backend, so it imports neither; odo-verify needs protocol only."""
    assert offenders("common", {"agent", "backend", "verifier", "protocol"}) == []
    forbidden = {"agent", "backend", "common", "paho", "psycopg", "sqlite3", "starlette"}
    assert offenders("verifier", forbidden) == []


def test_odo_verify_loads_no_backend_or_agent_library() -> None:
    """What a buyer installs: the base distribution (cryptography) is all odo-verify loads."""
    code = ("import sys, verifier.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'agent', 'backend', 'paho', 'obd', "
            "'psycopg', 'starlette', 'uvicorn', 'jinja2', 'serial', 'sqlite3', 'prometheus_client'}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    res = subprocess.run([sys.executable, "-I", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


@pytest.mark.parametrize("library", sorted(ONLY_IN))
def test_each_io_library_is_imported_in_its_one_module(library: str) -> None:
    allowed = ONLY_IN[library]
    found = [
        f"{rel(path)}:{line}"
        for package in PACKAGES
        for path in modules(package)
        for name, line in imports(path)
        if top(name) == library and rel(path) not in allowed
    ]
    assert found == [], f"{library} may be imported only in {sorted(allowed)}"


def test_the_import_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    (tmp_path / "protocol").mkdir()
    (tmp_path / "protocol" / "__init__.py").write_text("")
    probe = tmp_path / "protocol" / "probe.py"
    probe.write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    import backend.db\n"
                     "def f() -> None:\n    from os import path\n    import paho.mqtt.client\n"
                     "from . import records\nfrom .jws import encode\n")
    names = {name for name, _ in imports(probe, tmp_path)}
    assert {"backend.db", "os", "os.path", "paho.mqtt.client", "protocol.records", "protocol.jws"} <= names
    found = offenders("protocol", PROTOCOL_FORBIDDEN, tmp_path)
    assert [f.split(" imports ")[1] for f in found] == ["backend.db", "os", "os.path", "paho.mqtt.client"]


def test_protocol_alone_loads_no_io_or_other_package() -> None:
    """What an offline verifier gets: importing every protocol module pulls in none of them."""
    names = sorted(p.stem for p in modules("protocol") if p.stem != "__init__")
    code = (
        "import sys\n"
        f"for m in {names!r}: __import__('protocol.' + m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'agent', 'backend', 'paho', 'obd', 'psycopg', 'sqlite3', '_sqlite3', 'serial'})\n"
        "print(bad)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    res = subprocess.run([sys.executable, "-I", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env=env)
    # -I ignores the current directory: it finds protocol through the editable install.
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def project() -> dict[str, object]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data["project"])


def test_console_scripts_are_declared(project: dict[str, object]) -> None:
    scripts = project["scripts"]
    assert isinstance(scripts, dict)
    assert set(scripts) >= {"odo-agent", "odo-backend", "odo-verify"}
    assert scripts["odo-agent"].startswith("agent.")
    assert scripts["odo-backend"].startswith("backend.")
    assert scripts["odo-verify"].startswith("verifier.")
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert func, f"{name}: entry point {target!r} names no function"
        assert top(module) in PACKAGES, f"{name}: {module} is not in {PACKAGES}"


def test_licence_is_declared(project: dict[str, object]) -> None:
    assert project["license"] == "GPL-2.0-or-later"
    assert project.get("license-files") == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 2, June 1991" in text


def test_extras_keep_the_dongle_small(project: dict[str, object]) -> None:
    """protocol needs only cryptography; the dongle's extra carries no server or test libraries."""

    def names(reqs: object) -> set[str]:
        assert isinstance(reqs, list)
        return {r.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower()
                for r in reqs}

    extras = project["optional-dependencies"]
    assert isinstance(extras, dict) and set(extras) >= {"agent", "backend", "dev"}
    assert names(project["dependencies"]) == {"cryptography"}
    agent = names(extras["agent"])
    assert {"obd", "paho-mqtt"} <= agent
    assert not agent & {"psycopg", "starlette", "uvicorn", "jinja2", "pytest", "elm327-emulator"}
    backend = names(extras["backend"])
    assert {"paho-mqtt", "psycopg"} <= backend and "obd" not in backend
    # The ELM327 emulator is CC-BY-NC-SA: a test tool, never a runtime dependency.
    assert "elm327-emulator" in names(extras["dev"])


def test_only_the_project_packages_are_distributed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert set(config["include"]) == {f"{p}*" for p in PACKAGES}  # never tests/, sim/, bench/


def test_scripts_are_executable_and_parse() -> None:
    scripts = [ROOT / ".ci" / "run", ROOT / "deploy" / "mosquitto" / "fleet-ca",
               *sorted(p for p in (ROOT / "scripts").iterdir() if p.is_file())]
    for script in scripts:
        assert os.access(script, os.X_OK), f"{rel(script)} is not executable"
        head = script.read_text().splitlines()[0]
        if "bash" in head:
            assert "set -euo pipefail" in script.read_text(), rel(script)
            res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=10)
            assert res.returncode == 0, f"{rel(script)}: {res.stderr}"
