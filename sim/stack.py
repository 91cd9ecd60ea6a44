"""The whole system on one machine, as real processes: a private mosquitto on a free
loopback port, ``odo-backend run`` (SQLite or PostgreSQL), and simulated cars, each
an ELM327 emulator (``python -m sim.car``) with its own ``odo-agent``.

    with Stack(Path("demo-data")) as stack:
        stack.start_broker()
        stack.start_backend()
        car = stack.add_car(CarSpec("WP0ZZZ99ZTS390001", 12_345.6))
        stack.start_agent(car)
        stack.api("/api/devices")

Every process runs in a session (process group) of its own and writes its log to
``workdir/logs/<name>.log``; :meth:`Stack.close` stops every group it started, so
nothing is left running. Used by ``python -m sim.demo`` and the end-to-end tests.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_RULES = ROOT / "rules" / "example.toml"
FLEET_TOKEN = "demo-fleet-token"
API_TOKEN = "demo-api-token"
BIN = Path(sys.executable).parent


class StackError(RuntimeError):
    """A part of the stack did not start or did not answer."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(script: str, module: str) -> list[str]:
    """The venv's console script when it is there (so `ps` shows odo-agent), else ``-m``."""
    path = BIN / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def _env() -> dict[str, str]:
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


@dataclass(frozen=True)
class CarSpec:
    """One simulated car: its VIN, starting odometer, whether it answers PID A6, how it drives."""

    vin: str
    start_km: float
    has_a6: bool = True
    drive_s: float = 600.0
    park_s: float = 40.0
    transport: str = "tcp"          # "tcp" (a Wi-Fi adapter) or "pty" (a serial one)


@dataclass
class Car:
    name: str
    spec: CarSpec
    state_dir: Path
    port: str = ""
    dev: str = ""
    sim: Proc | None = None
    agent: Proc | None = None
    agent_runs: int = 0


@dataclass
class Stack:
    """Starts and stops the parts; see the module docstring."""

    workdir: Path
    db_url: str | None = None                  # default: sqlite under workdir
    rules: Path = EXAMPLE_RULES
    fleet_token: str | None = FLEET_TOKEN      # the backend approves devices enrolling with it
    api_token: str = API_TOKEN
    #: agent settings written to each agent.toml after `odo-agent init`
    agent_settings: str = ('clock = "synced"\nresend_after_s = 2.0\n\n'
                           "[vehicle]\nrecord_every_ms = 10000\n\n[power]\non_poll_s = 1.0\n")
    broker_port: int = 0
    http_port: int = 0
    broker: Proc | None = None
    backend: Proc | None = None
    cars: list[Car] = field(default_factory=list)
    _procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.db_url is None:
            self.db_url = f"sqlite:///{self.workdir / 'backend.db'}"
        self.broker_port = self.broker_port or free_port()
        self.http_port = self.http_port or free_port()

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def broker_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.broker_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], *, stdout_pipe: bool = False) -> Proc:
        logfile = self.logs / f"{name}.log"
        with open(logfile, "ab") as out:
            popen = subprocess.Popen(
                argv, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else out,
                stderr=out, start_new_session=True,
            )
        proc = Proc(name, popen, logfile)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop every process started, agents first, then cars, backend, broker."""
        order = {"agent": 0, "car": 1, "backend": 2, "mosquitto": 3}
        for proc in sorted(self._procs, key=lambda p: order.get(p.name.split("-")[0], 0)):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - go on stopping the rest
                log.exception("stopping %s", proc.name)
        self._procs.clear()

    # -- broker ------------------------------------------------------------------------------

    def start_broker(self) -> None:
        """mosquitto on 127.0.0.1:broker_port (the same port again after stop_broker)."""
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.broker_port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n")
        self.broker = self._spawn("mosquitto", [_mosquitto(), "-c", str(conf)])
        _wait_port(self.broker, self.broker_port)

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            self._procs.remove(self.broker)
            self.broker = None

    # -- backend -----------------------------------------------------------------------------

    def backend_cli(self, *args: str, stdin: str | None = None,
                    timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``odo-backend ARGS --db DB_URL``."""
        assert self.db_url is not None
        argv = [*_command("odo-backend", "backend.cli"), *args, "--db", self.db_url]
        return subprocess.run(argv, cwd=ROOT, env=_env(), input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start_backend(self, timeout: float = 30) -> None:
        assert self.db_url is not None
        argv = [*_command("odo-backend", "backend.cli"), "--log-level", "info", "run", "--db", self.db_url,
                "--broker", self.broker_url, "--http", f"127.0.0.1:{self.http_port}",
                "--rules", str(self.rules), "--api-token", self.api_token]
        if self.fleet_token:
            argv += ["--fleet-token", self.fleet_token]
        self.backend = self._spawn("backend", argv)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.backend.running():
                raise StackError(f"odo-backend exited with {self.backend.popen.returncode}; "
                                 f"see {self.backend.log}")
            try:
                with urllib.request.urlopen(self.api_url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise StackError(f"odo-backend did not answer /healthz within {timeout:.0f} s; "
                         f"see {self.backend.log}")

    def stop_backend(self) -> None:
        if self.backend is not None:
            self.backend.stop(15)
            self._procs.remove(self.backend)
            self.backend = None

    def add_operator(self, name: str, password: str) -> None:
        """An operator account for the dashboard; an existing one keeps its password."""
        done = self.backend_cli("operators", "add", name, stdin=password + "\n")
        if done.returncode != 0 and "exist" not in done.stderr:
            raise StackError(f"operators add {name}: {done.stderr.strip()}")

    def api(self, path: str, method: str = "GET", body: Any = None) -> Any:
        """JSON from the backend's HTTP API (raises StackError on a non-2xx answer)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api_url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.api_token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise StackError(f"{method} {path}: HTTP {exc.code} {exc.read()[:300]!r}") from None

    # -- cars and agents ---------------------------------------------------------------------

    def add_car(self, spec: CarSpec, *, fleet_token: str | None = FLEET_TOKEN,
                settings: str | None = None) -> Car:
        """Start the simulated car and `odo-agent init` a fresh state directory for its dongle."""
        n = len(self.cars) + 1
        car = Car(f"car{n}", spec, self.workdir / f"agent{n}")
        argv = [sys.executable, "-m", "sim.car", "--vin", spec.vin, "--start-km", str(spec.start_km),
                "--drive-s", str(spec.drive_s), "--park-s", str(spec.park_s),
                "--workdir", str(self.workdir / f"emulator{n}")]
        if spec.transport == "tcp":
            argv.append("--tcp")
        if not spec.has_a6:
            argv.append("--no-a6")
        car.sim = self._spawn(f"car-{n}", argv, stdout_pipe=True)
        car.port = _first_line(car.sim, 30)
        car.state_dir.mkdir(parents=True, exist_ok=True)
        args = ["init", "--obd-port", car.port, "--broker", self.broker_url]
        if fleet_token:
            args += ["--fleet-token", fleet_token]
        done = self.agent_cli(car, *args)
        if done.returncode != 0:
            raise StackError(f"odo-agent init for {car.name}: {done.stderr.strip()}")
        with open(car.state_dir / "agent.toml", "a") as fh:
            fh.write(self.agent_settings if settings is None else settings)
        car.dev = self.agent_cli(car, "status", "--json", check=True).json()["dev"]
        self.cars.append(car)
        return car

    def agent_cli(self, car: Car, *args: str, stdin: str | None = None, timeout: float = 30,
                  check: bool = False) -> AgentResult:
        """``odo-agent COMMAND --state-dir STATE_DIR ARGS``."""
        argv = [*_command("odo-agent", "agent.cli"), args[0], "--state-dir", str(car.state_dir), *args[1:]]
        done = subprocess.run(argv, cwd=ROOT, env=_env(), input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise StackError(f"odo-agent {' '.join(args)} ({car.name}) exited {done.returncode}: "
                             f"{done.stderr.strip()}")
        return AgentResult(done.returncode, done.stdout, done.stderr)

    def status(self, car: Car) -> dict[str, Any]:
        """``odo-agent status --json``."""
        result: dict[str, Any] = self.agent_cli(car, "status", "--json", check=True).json()
        return result

    def start_agent(self, car: Car, *, wait: bool = True) -> Proc:
        """``odo-agent run``; with ``wait``, return once it holds its state directory's lock
        (so that another command, e.g. ``enroll``, hands its work to the daemon)."""
        car.agent_runs += 1
        argv = [*_command("odo-agent", "agent.cli"), "run", "--state-dir", str(car.state_dir)]
        car.agent = self._spawn(f"agent-{car.name}", argv)
        deadline = time.monotonic() + 20
        while wait and not _holds_lock(car.agent.pid, car.state_dir / "daemon.lock"):
            if not car.agent.running():
                raise StackError(f"odo-agent run exited with {car.agent.popen.returncode}; "
                                 f"see {car.agent.log}")
            if time.monotonic() > deadline:
                raise StackError(f"odo-agent run did not take its lock within 20 s; see {car.agent.log}")
            time.sleep(0.05)
        return car.agent

    def enroll(self, car: Car, wait_s: float = 20) -> AgentResult:
        """``odo-agent enroll --wait``: exit 0 once approved, 3 while pending."""
        return self.agent_cli(car, "enroll", "--wait", str(wait_s), timeout=wait_s + 15)

    def stop_agent(self, car: Car, *, kill: bool = False) -> None:
        """Stop the agent cleanly (SIGTERM), or with ``kill`` as a power cut would (SIGKILL)."""
        if car.agent is None:
            return
        if kill:
            car.agent.kill()
        else:
            car.agent.stop(15)
        self._procs.remove(car.agent)
        car.agent = None


@dataclass(frozen=True)
class AgentResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def _mosquitto() -> str:
    for candidate in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"):
        if Path(candidate).exists():
            return candidate
    raise StackError("mosquitto is not installed: run `sudo make deps` (apt-get install mosquitto)")


def _holds_lock(pid: int, path: Path) -> bool:
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


def _wait_port(proc: Proc, port: int, timeout: float = 10) -> None:
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


def _first_line(proc: Proc, timeout: float) -> str:
    """The first line a process prints on stdout (the simulated car's port)."""
    out: IO[bytes] | None = proc.popen.stdout
    assert out is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(out, selectors.EVENT_READ)
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                raise StackError(f"{proc.name} printed no port within {timeout:.0f} s; see {proc.log}")
            chunk = os.read(out.fileno(), 4096)
            if not chunk:
                raise StackError(f"{proc.name} exited; see {proc.log}")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode().strip()
