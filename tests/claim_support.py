"""What the claim tests share: the whole system (mosquitto, ``odo-backend run``, a car and its
``odo-agent run``) with the driver's page (``odo-agent ui``) of that car, signed in with its PIN, and
a driver."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from backend.db import Database
from sim.processes import ROOT, Proc, child_env, command, free_port, wait_port
from sim.stack import Car, CarSpec, Stack
from tests.e2e_support import wait_until
from tests.page_support import PIN, set_pin, sign_in

VIN = "WP0ZZZ99ZTS390031"


@dataclass
class ClaimStack:
    stack: Stack
    car: Car
    ui_url: str
    db: Database
    ui_cookie: str            # a session of the page (its PIN: ``ui_pin``)
    ui_pin: str = PIN


@contextmanager
def agent_ui(car: Car, logs: Path) -> Iterator[str]:
    """``odo-agent ui`` of ``car`` on a free loopback port, its PIN :data:`PIN`; its URL. Stopped
    on leaving."""
    set_pin(car.state_dir)
    port = free_port()
    argv = [*command("odo-agent", "agent.cli"), "ui", "--state-dir", str(car.state_dir),
            "--listen", f"127.0.0.1:{port}"]
    with open(logs / f"ui-{car.name}.log", "ab") as out:
        popen = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=out, start_new_session=True)
    proc = Proc(f"ui-{car.name}", popen, logs / f"ui-{car.name}.log")
    try:
        wait_port(proc, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@contextmanager
def claim_stack(workdir: Path, db_url: str | None = None) -> Iterator[ClaimStack]:
    """An approved car whose VIN the backend knows, its page, and the driver ``alice``."""
    with Stack(workdir, db_url=db_url) as stack:
        stack.start_broker()
        stack.start_backend()
        car = stack.add_car(CarSpec(VIN, 20_000.0))
        stack.start_agent(car)
        done = stack.enroll(car)
        assert done.returncode == 0, done.stdout + done.stderr
        assert stack.backend_cli("drivers", "add", "alice").returncode == 0
        assert stack.db_url is not None
        db = Database.open(stack.db_url)
        try:
            wait_until("the device approved for its VIN", lambda: db.one(
                "SELECT 1 AS ok FROM devices WHERE dev = ? AND status = 'approved' AND vin = ?",
                (car.dev, VIN)))
            with agent_ui(car, stack.logs) as url:
                yield ClaimStack(stack, car, url, db, sign_in("127.0.0.1", int(url.rsplit(":", 1)[1])))
        finally:
            db.close()
