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
``workdir/logs/<name>.log`` (:mod:`sim.processes`); :meth:`Stack.close` stops every group it
started, so nothing is left running. The broker and the backend are started here, the cars and
their agents by :mod:`sim.cars`. Used by ``python -m sim.demo``, the end-to-end tests,
``bench.ingest`` and ``bench.load``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from sim import cars as _cars
from sim.broker import mosquitto_binary, mosquitto_conf
from sim.cars import AgentResult, Car, CarSpec
from sim.processes import ROOT, Proc, ProcessGroup, StackError, child_env, command, free_port, wait_port

__all__ = ["API_TOKEN", "EXAMPLE_RULES", "FLEET_TOKEN", "ROOT", "AgentResult", "Car", "CarSpec", "Proc",
           "Stack", "StackError", "Witness", "free_port"]

EXAMPLE_RULES = ROOT / "rules" / "example.toml"
FLEET_TOKEN = "demo-fleet-token"
API_TOKEN = "demo-api-token"
#: the order :meth:`Stack.close` stops processes in, by the start of their names
_STOP_ORDER = {"agent": 0, "car": 1, "backend": 2, "witness": 3, "mosquitto": 4}


@dataclass(frozen=True)
class Witness:
    """A running ``odo-witness``: its URL, verifier key file and state file."""

    name: str
    url: str
    vkey: Path
    state: Path
    proc: Proc


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
    broker_conf: str = ""                      # appended to mosquitto's configuration
    http_port: int = 0
    broker: Proc | None = None
    backend: Proc | None = None
    backends: list[Proc] = field(default_factory=list)   # every backend process running, backend first
    cars: list[Car] = field(default_factory=list)
    log_origin: str | None = None              # the transparency log's name (default: made by the backend)
    witnesses: dict[str, Witness] = field(default_factory=dict)     # by name, started by start_witness
    _group: ProcessGroup = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.logs.mkdir(parents=True, exist_ok=True)
        self._group = ProcessGroup(self.logs)
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

    def close(self) -> None:
        """Stop every process started, agents first, then cars, backend, broker."""
        self._group.close(lambda proc: _STOP_ORDER.get(proc.name.split("-")[0], 0))

    def stop_process(self, proc: Proc, *, kill: bool = False, timeout: float = 15) -> None:
        """Stop one process this stack started (SIGTERM, or SIGKILL at once with ``kill``) and
        forget it wherever it is held: the broker, a backend, a car's emulator or its agent."""
        self._group.stop(proc, timeout=timeout, kill=kill)
        if proc is self.broker:
            self.broker = None
        if proc is self.backend:
            self.backend = None
        if proc in self.backends:
            self.backends.remove(proc)
        for car in self.cars:
            if car.agent is proc:
                car.agent = None
            if car.sim is proc:
                car.sim = None

    # -- broker ------------------------------------------------------------------------------

    def start_broker(self) -> None:
        """mosquitto on 127.0.0.1:broker_port (the same port again after stop_broker)."""
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(mosquitto_conf(self.broker_port, self.broker_conf))
        self.broker = self._group.spawn("mosquitto", [mosquitto_binary(), "-c", str(conf)])
        wait_port(self.broker, self.broker_port)

    def stop_broker(self) -> None:
        if self.broker is not None:
            self._group.stop(self.broker)
            self.broker = None

    # -- backend -----------------------------------------------------------------------------

    def backend_cli(self, *args: str, stdin: str | None = None,
                    timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``odo-backend ARGS --db DB_URL``."""
        assert self.db_url is not None
        argv = [*command("odo-backend", "backend.cli"), *args, "--db", self.db_url]
        return subprocess.run(argv, cwd=ROOT, env=child_env(), input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start_backend(self, timeout: float = 30, *, client_id: str | None = None,
                      http_port: int | None = None, extra_args: Sequence[str] = ()) -> Proc:
        """``odo-backend run`` on db_url and the broker; return once it answers /healthz.

        Without ``http_port`` it is :attr:`backend`, serving :attr:`api_url`. With one, it is
        another process beside it (``backend-<client_id or port>``, in :attr:`backends` only), sharing
        the broker's subscriptions; each process needs a ``client_id`` of its own.
        ``extra_args`` go after the others (e.g. ``--session-expiry 0``)."""
        assert self.db_url is not None
        port = self.http_port if http_port is None else http_port
        argv = [*command("odo-backend", "backend.cli"), "--log-level", "info", "run", "--db", self.db_url,
                "--broker", self.broker_url, "--http", f"127.0.0.1:{port}",
                "--rules", str(self.rules),
                "--api-token-file", str(self.secret_file("api-token", self.api_token))]
        if self.fleet_token:
            argv += ["--fleet-token-file", str(self.secret_file("fleet-token", self.fleet_token))]
        if self.log_origin:
            argv += ["--log-origin", self.log_origin]
        for w in self.witnesses.values():
            argv += ["--witness", w.url]
        if client_id is not None:
            argv += ["--client-id", client_id]
        argv += list(extra_args)
        main = http_port is None
        proc = self._group.spawn("backend" if main else f"backend-{client_id or port}", argv)
        if main:
            self.backend = proc
        self.backends.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.running():
                raise StackError(f"odo-backend exited with {proc.popen.returncode}; see {proc.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return proc
            except OSError:
                pass
            time.sleep(0.1)
        raise StackError(f"odo-backend did not answer /healthz within {timeout:.0f} s; see {proc.log}")

    def secret_file(self, name: str, value: str) -> Path:
        """``value`` in ``workdir/<name>``, readable by this user only: how secrets reach the
        backend without showing in ``ps``."""
        path = self.workdir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(value + "\n")
        return path

    def log_key(self, *, pem: bool = False) -> Path:
        """The log's verifier key (``odo-backend log-key``), written into the workdir."""
        out = self.workdir / ("log.pem" if pem else "log.vkey")
        args = ["log-key", "--out", str(out), *(["--pem"] if pem else [])]
        if self.log_origin:
            args += ["--log-origin", self.log_origin]
        done = self.backend_cli(*args)
        if done.returncode != 0:
            raise StackError(f"odo-backend log-key: {done.stderr.strip()}")
        return out

    def start_witness(self, name: str) -> Witness:
        """``odo-witness serve`` for this log on a free port, its state under the workdir; its
        URL is passed to the backend started after it (``--witness``)."""
        port = free_port()
        state = self.workdir / f"witness-{name}.db"
        log_key = self.log_key()
        argv = [*command("odo-witness", "witness"), "serve", "--listen", f"127.0.0.1:{port}",
                "--state", str(state), "--log-key", str(log_key), "--name", f"{name}.witness.example"]
        proc = self._group.spawn(f"witness-{name}", argv)
        wait_port(proc, port)
        vkey = self.workdir / f"witness-{name}.vkey"
        done = subprocess.run([*command("odo-witness", "witness"), "key", "--state", str(state), "--out",
                               str(vkey)], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                              timeout=30, check=False)
        if done.returncode != 0:
            raise StackError(f"odo-witness key: {done.stderr.strip()}")
        witness = Witness(name, f"http://127.0.0.1:{port}", vkey, state, proc)
        self.witnesses[name] = witness
        return witness

    def stop_witness(self, name: str) -> None:
        self._group.stop(self.witnesses[name].proc, timeout=10)

    def stop_backend(self) -> None:
        """Stop :attr:`backend` (the processes started beside it keep running)."""
        if self.backend is not None:
            self._group.stop(self.backend, timeout=15)
            if self.backend in self.backends:
                self.backends.remove(self.backend)
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

    # -- cars and agents (see sim.cars) --------------------------------------------------------

    def add_car(self, spec: CarSpec, *, fleet_token: str | None = FLEET_TOKEN,
                settings: str | None = None) -> Car:
        """Start the simulated car and `odo-agent init` a fresh state directory for its dongle."""
        n = len(self.cars) + 1
        car = Car(f"car{n}", spec, self.workdir / f"agent{n}")
        car.sim, car.port = _cars.start_emulator(self._group, f"car-{n}", spec, self.workdir / f"emulator{n}")
        _cars.init_agent(car, self.broker_url, fleet_token,
                        self.agent_settings if settings is None else settings)
        self.cars.append(car)
        return car

    def agent_cli(self, car: Car, *args: str, stdin: str | None = None, timeout: float = 30,
                  check: bool = False) -> AgentResult:
        """``odo-agent COMMAND --state-dir STATE_DIR ARGS``."""
        return _cars.agent_cli(car, *args, stdin=stdin, timeout=timeout, check=check)

    def status(self, car: Car) -> dict[str, Any]:
        """``odo-agent status --json``."""
        result: dict[str, Any] = self.agent_cli(car, "status", "--json", check=True).json()
        return result

    def start_agent(self, car: Car, *, wait: bool = True) -> Proc:
        """``odo-agent run``; with ``wait``, return once it holds its state directory's lock
        (so that another command, e.g. ``enroll``, hands its work to the daemon)."""
        return _cars.start_agent(self._group, car, wait=wait)

    def enroll(self, car: Car, wait_s: float = 20) -> AgentResult:
        """``odo-agent enroll --wait``: exit 0 once approved, 3 while pending."""
        return self.agent_cli(car, "enroll", "--wait", str(wait_s), timeout=wait_s + 15)

    def stop_agent(self, car: Car, *, kill: bool = False) -> None:
        """Stop the agent cleanly (SIGTERM), or with ``kill`` as a power cut would (SIGKILL)."""
        if car.agent is None:
            return
        self._group.stop(car.agent, timeout=15, kill=kill)
        car.agent = None
