"""Processes for the simulation: each started in a session (process group) of its own, with its
log in a file, and stopped as a group, so that nothing it started is left running.

:class:`ProcessGroup` starts and stops a set of them (the parts of :class:`sim.stack.Stack`);
the functions below wait on one: for a port to listen, for its first line on stdout, for it to
hold a lock.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class StackError(RuntimeError):
    """A part of the stack did not start or did not answer."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(script: str, module: str) -> list[str]:
    """The venv's console script when it is there (so `ps` shows odo-agent), else ``-m``."""
    path = BIN / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def child_env() -> dict[str, str]:
    """This environment without ``ODO_*`` settings, with the repository on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODO_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class Proc:
    """One started process, the leader of its own process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM to the group, SIGKILL after ``timeout``; then reap what is left of the group."""
        if self.running():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop on SIGTERM within %.0f s: killing it", self.name, timeout)
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        self.signal(signal.SIGKILL)   # children left in the group (e.g. an emulator host)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return int(self.popen.returncode)

    def kill(self) -> None:
        """SIGKILL to the group, at once (a power cut)."""
        self.signal(signal.SIGKILL)
        self.popen.wait(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


class ProcessGroup:
    """The processes started for one stack, each logging to ``logs/<name>.log``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[Proc] = []

    def spawn(self, name: str, argv: list[str], *, stdout_pipe: bool = False) -> Proc:
        """Start ``argv`` in the repository, in a new session; stdout to a pipe with ``stdout_pipe``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        logfile = self.logs / f"{name}.log"
        with open(logfile, "ab") as out:
            popen = subprocess.Popen(
                argv, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else out,
                stderr=out, start_new_session=True,
            )
        proc = Proc(name, popen, logfile)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, *, timeout: float = 10.0, kill: bool = False) -> None:
        """Stop one process (``kill``: SIGKILL at once) and forget it."""
        if kill:
            proc.kill()
        else:
            proc.stop(timeout)
        self.procs.remove(proc)

    def close(self, order: Callable[[Proc], int] = lambda proc: 0) -> None:
        """Stop every process still running, lowest ``order`` first (stable otherwise)."""
        for proc in sorted(self.procs, key=order):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - go on stopping the rest
                log.exception("stopping %s", proc.name)
        self.procs.clear()


def wait_port(proc: Proc, port: int, timeout: float = 10) -> None:
    """Return once something listens on 127.0.0.1:``port``; StackError if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise StackError(f"{proc.name} exited: {proc.log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"{proc.name} did not listen on port {port} within {timeout:.0f} s")


def first_line(proc: Proc, timeout: float) -> str:
    """The first line a process prints on stdout (e.g. the simulated car's port)."""
    out: IO[bytes] | None = proc.popen.stdout
    assert out is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(out, selectors.EVENT_READ)
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                raise StackError(f"{proc.name} printed no line within {timeout:.0f} s; see {proc.log}")
            chunk = os.read(out.fileno(), 4096)
            if not chunk:
                raise StackError(f"{proc.name} exited; see {proc.log}")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode().strip()


def holds_lock(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds a flock on ``path`` (from /proc/locks)."""
    try:
        inode = os.stat(path).st_ino
        table = Path("/proc/locks").read_text()
    except OSError:
        return False
    for row in table.splitlines():
        fields = row.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[4] == str(pid) \
                and fields[5].rsplit(":", 1)[-1] == str(inode):
            return True
    return False


def descendants(pid: int) -> list[int]:
    """The processes that ``pid`` started, and theirs (from ``/proc``)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
        for kid in kids:
            out += [kid, *descendants(kid)]
    return out
