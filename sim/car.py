"""Launch a simulated car (the ELM327 emulator in its own process) and steer it.

    car = SimCar(Profile(start_odo_km=50_000, has_a6=False), workdir)
    port = car.start()          # "/dev/pts/7", or "socket://127.0.0.1:40123"
    car.hang(); car.unhang()    # the adapter goes silent, and comes back
    car.stop()

or from a shell (the demo does this)::

    python -m sim.car --vin WP0ZZZ99ZTS390000 --start-km 12345.6 [--no-a6] [--tcp]

which prints the port on the first line and runs until interrupted.

The emulator is a test and demo tool (CC-BY-NC-SA): it runs as a separate
process in ``workdir`` (where it writes ``elm.log``), never inside the agent.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from sim.profile import Profile

_REPO = Path(__file__).resolve().parent.parent


class SimCarError(RuntimeError):
    """The simulated car did not start, or did not accept a command."""


class SimCar:
    """One simulated car; a context manager that starts and stops it."""

    def __init__(self, profile: Profile, workdir: str | os.PathLike[str], *, transport: str = "pty",
                 start_timeout_s: float = 15.0) -> None:
        if transport not in ("pty", "tcp"):
            raise ValueError(f"transport: {transport!r} is not 'pty' or 'tcp'")
        self.profile = profile
        self.workdir = Path(workdir)
        self.transport = transport
        self.port: str | None = None
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._log: IO[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> str:
        """Start the emulator process; return the port an OBD client should open."""
        if self._proc is not None:
            raise SimCarError("already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
        self._log = open(self.workdir / "emulator-host.log", "ab")  # noqa: SIM115 - kept until stop()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "sim.emulator_host", "--profile", self.profile.to_json(),
             "--transport", self.transport],
            cwd=self.workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log,
        )
        line = self._line(self._start_timeout_s)
        if not line.startswith("ready "):
            self.stop()
            raise SimCarError(f"emulator did not start: {line!r} (see {self.workdir}/emulator-host.log)")
        self.port = line.split(" ", 1)[1]
        return self.port

    def stop(self) -> None:
        """Stop the emulator process (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> SimCar:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- runtime controls (each returns once it has taken effect) ----------------------------

    def hang(self) -> None:
        """The adapter goes silent: nothing is answered until unhang()."""
        self._send({"cmd": "hang", "on": True})

    def unhang(self) -> None:
        self._send({"cmd": "hang", "on": False})

    def no_data(self, on: bool) -> None:
        """PID A6 answers NO DATA (True) or its value again (False)."""
        self._send({"cmd": "no_data", "on": on})

    def set_vin(self, vin: str) -> None:
        """The dongle now sits in another car with this VIN."""
        self._send({"cmd": "vin", "vin": vin})

    def engine(self, on: bool | None) -> None:
        """Force the engine on or off; None follows the profile again."""
        self._send({"cmd": "engine", "on": on})

    def set_voltage(self, mv: int | None) -> None:
        """Force the battery voltage the adapter reports; None follows the engine."""
        self._send({"cmd": "voltage", "mv": mv})

    def clear_codes(self) -> None:
        """A garage clears the trouble codes: PID 0x31 starts again from 0."""
        self._send({"cmd": "clear_codes"})

    # -- plumbing ----------------------------------------------------------------------------

    def _send(self, msg: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise SimCarError("not started")
        proc.stdin.write((json.dumps(msg) + "\n").encode())
        proc.stdin.flush()
        answer = self._line(5.0)
        if answer != "ok":
            raise SimCarError(f"{msg['cmd']}: {answer}")

    def _line(self, timeout_s: float) -> str:
        proc = self._proc
        if proc is None or proc.stdout is None:
            raise SimCarError("not started")
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    raise SimCarError(f"no answer from the emulator within {timeout_s} s")
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise SimCarError(f"emulator exited (status {proc.poll()}); see {self.workdir}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode().strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.car", description="Run one simulated car.")
    ap.add_argument("--vin", default=Profile.vin)
    ap.add_argument("--start-km", type=float, default=Profile.start_odo_km)
    ap.add_argument("--no-a6", action="store_true", help="the car does not answer PID A6")
    ap.add_argument("--tcp", action="store_true", help="serve socket://127.0.0.1:PORT instead of a pty")
    ap.add_argument("--drive-s", type=float, default=Profile.drive_s)
    ap.add_argument("--park-s", type=float, default=Profile.park_s)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--workdir", default=None, help="where the emulator writes elm.log (default: a temp dir)")
    args = ap.parse_args(argv)
    try:
        profile = Profile(vin=args.vin, start_odo_km=args.start_km, has_a6=not args.no_a6,
                          drive_s=args.drive_s, park_s=args.park_s, time_scale=args.time_scale)
    except ValueError as exc:
        print(f"sim.car: {exc}", file=sys.stderr)
        return 2
    import tempfile

    with tempfile.TemporaryDirectory(prefix="simcar-") as tmp:
        car = SimCar(profile, args.workdir or tmp, transport="tcp" if args.tcp else "pty")
        stop = False

        def on_signal(_sig: int, _frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        with car:
            print(car.port, flush=True)
            while not stop:
                time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
