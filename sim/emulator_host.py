"""The process that runs one simulated car on the ELM327 emulator.

Started by :class:`sim.car.SimCar` as ``python -m sim.emulator_host`` in a
scratch directory (the emulator writes ``elm.log`` into its working directory
and configures logging for the whole process, so it never runs inside a test or
the agent). The emulator is used as published: its stock "car" scenario, plus
our own scenario entries (``ResponseFooter`` callables) for the PIDs a car's
odometer story needs, computed from :mod:`sim.profile` at the elapsed time.

Between the client and the emulator sits a small relay, which owns the port the
client opens (a pseudo-terminal, or a TCP port for ``socket://`` clients). While
the car is "hung" the relay drops every byte both ways: a silent adapter.

Control: one JSON object per line on stdin, e.g. ``{"cmd": "hang", "on": true}``;
each is answered by ``ok`` or ``error <why>`` on stdout, after it has taken
effect. The first line on stdout is ``ready <port>``. End of stdin stops the car.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pty
import select
import socket
import sys
import threading
import time
import tty
from collections.abc import Callable
from typing import Any

from elm import Elm  # type: ignore[import-untyped]  # a test tool, never imported by the agent
from elm.obd_message import ObdMessage  # type: ignore[import-untyped]

from sim import profile as pf

log = logging.getLogger(__name__)

ON, OFF = "odoledger_on", "odoledger_off"
NO_DATA = "<writeln>NO DATA</writeln>"


def _single_frame(data: str, header: str = "7E8") -> str:
    """One CAN frame in the emulator's response markup (header, length, data)."""
    return f"<header>{header}</header><size>{len(data.split()):02X}</size><data>{data}</data>"


def _hex(value: int, n_bytes: int) -> str:
    return " ".join(f"{b:02X}" for b in value.to_bytes(n_bytes, "big"))


class CarState:
    """The simulated car at the current time, plus the test's runtime controls."""

    def __init__(self, profile: pf.Profile) -> None:
        self.p = profile
        self.lock = threading.Lock()
        self._t0 = time.monotonic()
        self._last_t = 0.0
        self._driven_m = 0.0
        self._since_clear_m = 0.0
        self._cleared = False
        self.hung = False
        self.no_data = False
        self.vin = profile.vin
        self.engine: bool | None = None       # None: follow the profile
        self.voltage: int | None = None       # None: follow the profile

    def _advance(self) -> float:
        t = (time.monotonic() - self._t0) * self.p.time_scale
        if self.engine is not False and t > self._last_t:
            step = pf.distance_m(self.p, t) - pf.distance_m(self.p, self._last_t)
            self._driven_m += step
            self._since_clear_m += step
        self._last_t = t
        return t

    def _on(self, t: float) -> bool:
        return pf.engine_on(self.p, t) if self.engine is None else self.engine

    def read(self) -> dict[str, Any]:
        with self.lock:
            t = self._advance()
            on = self._on(t)
            moving = on and self.engine is not False and pf.engine_on(self.p, t)
            speed = int(pf.speed_kph(self.p, t)) if moving else 0
            rpm = (pf.rpm(self.p, t) if moving else self.p.idle_rpm) if on else 0
            volt = self.voltage if self.voltage is not None else (
                self.p.charging_mv if on else self.p.battery_mv)
            return {
                "on": on, "speed": speed, "rpm": rpm, "volt": volt, "vin": self.vin,
                "odo_m": pf.odometer_m(self.p, self._driven_m),
                "dsc_km": pf.dsc_km(self.p, self._since_clear_m, self._cleared),
                "no_data": self.no_data,
            }

    def clear_codes(self) -> None:
        with self.lock:
            self._advance()
            self._since_clear_m = 0.0
            self._cleared = True


def _entry(request: str, descr: str, footer: Callable[[], str]) -> dict[str, Any]:
    return {
        "Request": request, "Descr": descr, "Priority": 1,
        "ResponseFooter": lambda _elm, _cmd, _pid, _val: footer(),
    }


def build_scenarios(car: CarState) -> dict[str, dict[str, Any]]:
    """Our two scenarios: engine running (stock car plus our PIDs), engine off."""
    footer = r"[0123456]?$"

    def when_on(make: Callable[[dict[str, Any]], str]) -> Callable[[], str]:
        def answer() -> str:
            s = car.read()
            return make(s) if s["on"] else NO_DATA
        return answer

    def volt() -> str:
        mv = car.read()["volt"]
        return f"<writeln>{mv // 1000}.{(mv % 1000) // 100}V</writeln>"

    def a6(s: dict[str, Any]) -> str:
        if not car.p.has_a6 or s["no_data"]:
            return NO_DATA
        return _single_frame("41 A6 " + _hex(pf.a6_raw(s["odo_m"]), 4))

    def vin(s: dict[str, Any]) -> str:
        return "<pos_answer>01 " + " ".join(f"{ord(c):02X}" for c in s["vin"]) + "</pos_answer>"

    on: dict[str, Any] = dict(ObdMessage["car"])
    on.update({
        "ODO_VOLTAGE": _entry(r"^ATRV$", "Battery voltage", volt),
        "ODO_PIDS_A": _entry("^0100" + footer, "Supported PIDs 01-20",
                             when_on(lambda s: _single_frame("41 00 BE 3F A8 13"))),
        "ODO_RPM": _entry("^010C" + footer, "Engine RPM",
                          when_on(lambda s: _single_frame("41 0C " + _hex(s["rpm"] * 4, 2)))),
        "ODO_SPEED": _entry("^010D" + footer, "Vehicle speed",
                            when_on(lambda s: _single_frame(f"41 0D {s['speed']:02X}"))),
        "ODO_DSC": _entry("^0131" + footer, "Distance since codes cleared",
                          when_on(lambda s: _single_frame("41 31 " + _hex(s["dsc_km"], 2)))),
        "ODO_PIDS_F": _entry("^01A0" + footer, "Supported PIDs A1-C0",
                             when_on(lambda s: _single_frame("41 A0 04 00 00 00")
                                     if car.p.has_a6 else NO_DATA)),
        "ODO_VIN": _entry("^0902" + footer, "VIN", when_on(vin)),
    })
    if not car.p.stock_a6:
        on["ODO_A6"] = _entry("^01A6" + footer, "Odometer", when_on(a6))

    def search_fails() -> str:
        return ("<string>SEARCHING...</string><exec>time.sleep(0.3)</exec>"
                "<writeln></writeln><writeln>UNABLE TO CONNECT</writeln>")

    off: dict[str, Any] = {
        "ODO_VOLTAGE": _entry(r"^ATRV$", "Battery voltage", volt),
        "ODO_OFF_SEARCH": _entry("^0100" + footer, "No ECU answers", search_fails),
        "ODO_OFF_NO_DATA": _entry(r"^[0-9A-F]{4,}$", "No ECU answers", lambda: NO_DATA),
    }
    return {ON: on, OFF: off}


class Relay:
    """Bytes between the client's port and the emulator's pty, dropped while hung."""

    def __init__(self, car: CarState, emulator_pty: str, transport: str) -> None:
        self.car = car
        self.emu = os.open(emulator_pty, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.emu)
        self.stopping = False
        self.listener: socket.socket | None = None
        self.client: socket.socket | None = None
        self.master: int | None = None
        if transport == "tcp":
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.port = f"socket://127.0.0.1:{self.listener.getsockname()[1]}"
        else:
            self.master, self._slave = pty.openpty()   # the slave stays open: no EIO between clients
            tty.setraw(self._slave)
            self.port = os.ttyname(self._slave)

    def run(self) -> None:
        while not self.stopping:
            watch: list[Any] = [self.emu]
            if self.master is not None:
                watch.append(self.master)
            if self.listener is not None:
                watch.append(self.listener)
            if self.client is not None:
                watch.append(self.client)
            ready, _, _ = select.select(watch, [], [], 0.2)
            for src in ready:
                self._pump(src)

    def _pump(self, src: Any) -> None:
        if src is self.listener:
            conn, _ = self.listener.accept()
            if self.client is not None:
                self.client.close()
            self.client = conn
            return
        if src is self.client:
            data = self.client.recv(4096)
            if not data:
                self.client.close()
                self.client = None
                return
        else:
            data = os.read(src, 4096)
        if self.car.hung:
            return
        if src is self.emu:
            if self.master is not None:
                os.write(self.master, data)
            elif self.client is not None:
                self.client.sendall(data)
        else:
            os.write(self.emu, data)


def _apply(car: CarState, elm: Elm, msg: dict[str, Any]) -> None:
    cmd = msg.get("cmd")
    with car.lock:
        if cmd == "hang":
            car.hung = bool(msg["on"])
        elif cmd == "no_data":
            car.no_data = bool(msg["on"])
        elif cmd == "vin":
            if not pf.VIN_RE.match(str(msg["vin"])):
                raise ValueError(f"bad VIN {msg['vin']!r}")
            car.vin = str(msg["vin"])
        elif cmd == "engine":
            car.engine = None if msg["on"] is None else bool(msg["on"])
        elif cmd == "voltage":
            car.voltage = None if msg["mv"] is None else int(msg["mv"])
        elif cmd != "clear_codes":
            raise ValueError(f"unknown command {cmd!r}")
    if cmd == "clear_codes":
        car.clear_codes()
    _follow_engine(car, elm)


def _follow_engine(car: CarState, elm: Elm) -> None:
    want = ON if car.read()["on"] else OFF
    if elm.scenario != want:
        elm.set_sorted_obd_msg(want)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.emulator_host")
    ap.add_argument("--profile", required=True, help="the car's Profile as JSON")
    ap.add_argument("--transport", choices=("pty", "tcp"), default="pty")
    args = ap.parse_args(argv)
    car = CarState(pf.Profile.from_json(args.profile))

    control_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)   # whatever the emulator prints goes to stderr, not into the control channel

    ObdMessage.update(build_scenarios(car))
    elm = Elm(batch_mode=True)
    with elm as session:
        while session.threadState == session.THREAD.STARTING:
            time.sleep(0.02)
        emu_pty = session.get_pty()
        if session.threadState == session.THREAD.TERMINATED or emu_pty is None:
            control_out.write("error emulator did not start\n")
            return 1
        _follow_engine(car, session)
        relay = Relay(car, emu_pty, args.transport)
        threading.Thread(target=relay.run, daemon=True).start()

        def tick() -> None:
            while not relay.stopping:
                _follow_engine(car, session)
                time.sleep(0.05)
        threading.Thread(target=tick, daemon=True).start()

        control_out.write(f"ready {relay.port}\n")
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                _apply(car, session, json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                control_out.write(f"error {exc}\n")
                continue
            control_out.write("ok\n")
        relay.stopping = True
        # End of stdin: the car is done. The emulator's own shutdown waits seconds for its
        # thread, blocked reading the pty; nothing is left to save, so leave at once.
        control_out.flush()
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
