"""Launching the simulated cars of a stack and their dongles: each car an ELM327 emulator
(``python -m sim.car``, the emulator itself), each dongle an ``odo-agent`` with a state
directory of its own.

:class:`sim.stack.Stack` calls these (``add_car``, ``start_agent``, ``agent_cli``...); they start
their processes in the stack's :class:`sim.processes.ProcessGroup`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.processes import ROOT, Proc, ProcessGroup, StackError, child_env, command, first_line, holds_lock


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
    """A started car: its emulator and port, its agent's state directory, device id and process."""

    name: str
    spec: CarSpec
    state_dir: Path
    port: str = ""
    dev: str = ""
    sim: Proc | None = None
    agent: Proc | None = None
    agent_runs: int = 0


@dataclass(frozen=True)
class AgentResult:
    """What an ``odo-agent`` command exited with and printed."""

    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def start_emulator(group: ProcessGroup, name: str, spec: CarSpec, workdir: Path) -> tuple[Proc, str]:
    """Start the car's emulator; the process and the port it printed (a TCP address or a pty)."""
    argv = [sys.executable, "-m", "sim.car", "--vin", spec.vin, "--start-km", str(spec.start_km),
            "--drive-s", str(spec.drive_s), "--park-s", str(spec.park_s), "--workdir", str(workdir)]
    if spec.transport == "tcp":
        argv.append("--tcp")
    if not spec.has_a6:
        argv.append("--no-a6")
    proc = group.spawn(name, argv, stdout_pipe=True)
    return proc, first_line(proc, 30)


def agent_cli(car: Car, *args: str, stdin: str | None = None, timeout: float = 30,
              check: bool = False) -> AgentResult:
    """``odo-agent COMMAND --state-dir STATE_DIR ARGS``; with ``check``, StackError unless it exits 0."""
    argv = [*command("odo-agent", "agent.cli"), args[0], "--state-dir", str(car.state_dir), *args[1:]]
    done = subprocess.run(argv, cwd=ROOT, env=child_env(), input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise StackError(f"odo-agent {' '.join(args)} ({car.name}) exited {done.returncode}: "
                         f"{done.stderr.strip()}")
    return AgentResult(done.returncode, done.stdout, done.stderr)


def init_agent(car: Car, broker_url: str, fleet_token: str | None, settings: str) -> None:
    """``odo-agent init`` a fresh state directory for the car's port, append ``settings`` to its
    agent.toml, and note the device id it made."""
    car.state_dir.mkdir(parents=True, exist_ok=True)
    args = ["init", "--obd-port", car.port, "--broker", broker_url]
    if fleet_token:
        args += ["--fleet-token", fleet_token]
    done = agent_cli(car, *args)
    if done.returncode != 0:
        raise StackError(f"odo-agent init for {car.name}: {done.stderr.strip()}")
    with open(car.state_dir / "agent.toml", "a") as fh:
        fh.write(settings)
    car.dev = agent_cli(car, "status", "--json", check=True).json()["dev"]


def start_agent(group: ProcessGroup, car: Car, *, wait: bool = True) -> Proc:
    """``odo-agent run``; with ``wait``, return once it holds its state directory's lock."""
    car.agent_runs += 1
    argv = [*command("odo-agent", "agent.cli"), "run", "--state-dir", str(car.state_dir)]
    agent = car.agent = group.spawn(f"agent-{car.name}", argv)
    deadline = time.monotonic() + 20
    while wait and not holds_lock(agent.pid, car.state_dir / "daemon.lock"):
        if not agent.running():
            raise StackError(f"odo-agent run exited with {agent.popen.returncode}; see {agent.log}")
        if time.monotonic() > deadline:
            raise StackError(f"odo-agent run did not take its lock within 20 s; see {agent.log}")
        time.sleep(0.05)
    return agent
