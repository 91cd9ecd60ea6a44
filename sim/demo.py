"""``make demo``: three simulated cars, their dongles and a backend, all on this machine.

    python -m sim.demo [--data DIR] [--seconds N]

Starts (see :mod:`sim.stack`) a private mosquitto on a free loopback port, ``odo-backend
run`` on SQLite under ``DIR`` (default ``./demo-data``, wiped at each start: the simulated
cars start from the same odometer every time, so an old history would only show as
rollbacks) with ``rules/example.toml``, three ELM327 emulators (the third one without PID
A6, so its odometer is derived from speed and anchored by the driver's confirmation) and
an ``odo-agent`` for each, enrolled with the fleet token so they are approved at once. Each
car gets a driver confirmation, so its wallet shows a balance.

Then prints a line per vehicle every ~2 s until Ctrl-C (or ``--seconds``); every process it
started is stopped on the way out. Logs: ``DIR/logs/``.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from sim.stack import Car, CarSpec, Stack, StackError

log = logging.getLogger(__name__)

CARS = (
    CarSpec("WP0ZZZ99ZTS390001", 12_345.6, has_a6=True, drive_s=90, park_s=40),
    CarSpec("WVWZZZ1JZXW000002", 48_210.0, has_a6=True, drive_s=120, park_s=40),
    CarSpec("VF1RFB00X00000003", 7_500.0, has_a6=False, drive_s=100, park_s=40),
)
OPERATOR = "operator"


class Stop(Exception):
    """SIGTERM or SIGINT: leave the main loop and stop everything."""


def _on_signal(sig: int, _frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second Ctrl-C must not cut the cleanup short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Stop(signal.Signals(sig).name)


def _km(odo_m: int | None) -> str:
    return "-" if odo_m is None else f"{odo_m / 1000:,.1f} km"


def _tokens(milli: int | None) -> str:
    return "-" if milli is None else f"{milli / 1000:,.3f}"


def _balance(stack: Stack, dev: str) -> int | None:
    try:
        return int(stack.api(f"/api/wallets/unassigned:{dev}")["balance"])
    except StackError:
        return None


def _confirm(stack: Stack, car: Car) -> bool:
    """A driver confirmation: the car's own figure when it reads one (PID A6), else the dashboard's."""
    if car.spec.has_a6:
        if stack.status(car).get("odo_m") is None:
            return False
        done = stack.agent_cli(car, "confirm", "--yes")
    else:
        done = stack.agent_cli(car, "confirm", "--km", f"{car.spec.start_km:.1f}", "--yes")
    print(f"  {car.name}: {(done.stdout or done.stderr).strip()}", flush=True)
    return done.returncode == 0


def line(stack: Stack, car: Car, devices: dict[str, dict[str, Any]]) -> str:
    d = devices.get(car.dev, {})
    st = stack.status(car)
    return (f"{car.name} {car.spec.vin}  odo {_km(d.get('odo_m')):>14} ({st.get('src') or '-':7}) "
            f"accepted {d.get('accepted', 0):4}  rejected {d.get('rejected', 0):3}  "
            f"balance {_tokens(_balance(stack, car.dev)):>8} tokens  "
            f"{'online' if d.get('online') else 'offline'}")


def run(data: Path, seconds: float | None) -> int:
    if data.exists():
        shutil.rmtree(data)
    print(f"demo: starting fresh in {data} (wiped at each start); logs in {data / 'logs'}", flush=True)
    password = secrets.token_urlsafe(9)
    with Stack(data) as stack:
        stack.start_broker()
        print(f"demo: mosquitto on {stack.broker_url}", flush=True)
        stack.start_backend()
        stack.add_operator(OPERATOR, password)
        print(f"demo: dashboard {stack.api_url}/login  login {OPERATOR} / {password}", flush=True)
        print(f"demo: API {stack.api_url}/api needs its token (in {data / 'api-token'}, given to odo-backend "
              f"with --api-token-file), e.g.\n  curl -H 'Authorization: Bearer {stack.api_token}' "
              f"{stack.api_url}/api/devices", flush=True)
        cars = [stack.add_car(spec) for spec in CARS]
        for car in cars:
            stack.start_agent(car)
            print(f"demo: {car.name} {car.spec.vin} on {car.port} "
                  f"({'PID A6' if car.spec.has_a6 else 'no PID A6: derived odometer'}), device {car.dev}",
                  flush=True)
        for car in cars:
            done = stack.enroll(car)
            print(f"  {car.name}: {(done.stdout or done.stderr).strip()}", flush=True)
            if done.returncode != 0:
                raise StackError(f"{car.name} was not approved; see {data / 'logs'}")
        unconfirmed = list(cars)
        deadline = None if seconds is None else time.monotonic() + seconds
        print("demo: running; Ctrl-C stops every process", flush=True)
        while deadline is None or time.monotonic() < deadline:
            unconfirmed = [car for car in unconfirmed if not _confirm(stack, car)]
            devices = {d["dev"]: d for d in stack.api("/api/devices")}
            print(time.strftime("%H:%M:%S"), flush=True)
            for car in cars:
                print("  " + line(stack, car, devices), flush=True)
            for proc in [stack.broker, stack.backend, *(c.agent for c in cars), *(c.sim for c in cars)]:
                if proc is not None and not proc.running():
                    raise StackError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}")
            time.sleep(2)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("demo-data"),
                    help="state and logs (default ./demo-data)")
    ap.add_argument("--seconds", type=float, default=None, help="stop after this many seconds")
    args = ap.parse_args(argv)
    if args.seconds is not None and args.seconds <= 0:
        ap.error("--seconds must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        code = run(args.data.resolve(), args.seconds)
    except Stop as exc:
        print(f"demo: stopped ({exc}); every process it started is stopped", flush=True)
        return 0
    except StackError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    print("demo: done; every process it started is stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
