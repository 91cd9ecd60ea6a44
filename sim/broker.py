"""A private mosquitto on a free loopback port, for a test session or a benchmark.

    broker = start_broker()          # mqtt://127.0.0.1:<free port>, anonymous, no persistence
    ...
    broker.stop()

:func:`mosquitto_binary` and :func:`mosquitto_conf` are also what :class:`sim.stack.Stack`
starts its broker with.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from sim.processes import StackError, free_port

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto")


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def mosquitto_binary() -> str:
    """The mosquitto executable; StackError (a RuntimeError) when it is not installed."""
    found = shutil.which("mosquitto") or next((c for c in _CANDIDATES if Path(c).exists()), None)
    if not found:
        raise StackError("mosquitto is not installed: run `sudo make deps` (apt-get install mosquitto)")
    return found


def mosquitto_conf(port: int, extra_conf: str = "", anonymous: bool = True) -> str:
    """A configuration listening on 127.0.0.1:``port`` (unless ``extra_conf`` has a listener),
    without persistence, logging errors and warnings to stderr, with ``extra_conf`` appended."""
    listener = f"listener {port} 127.0.0.1\n" if "listener" not in extra_conf else ""
    return (listener
            + f"allow_anonymous {'true' if anonymous else 'false'}\n"
            + "persistence false\n"
            + "log_dest stderr\n"
            + "log_type error\nlog_type warning\n"
            + extra_conf)


def start_broker(extra_conf: str = "", port: int | None = None, anonymous: bool = True) -> Broker:
    """Start mosquitto on 127.0.0.1 with ``extra_conf`` appended; wait until it listens."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="odo-mosquitto-"))
    conf = workdir / "mosquitto.conf"
    conf.write_text(mosquitto_conf(port, extra_conf, anonymous))
    with open(workdir / "mosquitto.log", "wb") as log:
        # the child keeps its own copy of the descriptor; ours closes here
        proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {(workdir / 'mosquitto.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return Broker("127.0.0.1", port, proc, workdir)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start listening within 10 s")


def quiet_broker(extra_conf: str = "", port: int | None = None, anonymous: bool = True) -> Broker:
    """:func:`start_broker`, with its ResourceWarnings (a log file left to the garbage
    collector) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return start_broker(extra_conf, port, anonymous)
