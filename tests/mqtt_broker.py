"""A private mosquitto for one test session, on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if not found:
        raise RuntimeError("mosquitto is not installed: run `sudo make deps` (apt-get install mosquitto)")
    return found


def start_broker(extra_conf: str = "", port: int | None = None, anonymous: bool = True) -> Broker:
    """Start mosquitto on 127.0.0.1 with ``extra_conf`` appended; wait until it listens."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="odo-mosquitto-"))
    conf = workdir / "mosquitto.conf"
    listener = f"listener {port} 127.0.0.1\n" if "listener" not in extra_conf else ""
    conf.write_text(
        listener
        + f"allow_anonymous {'true' if anonymous else 'false'}\n"
        + "persistence false\n"
        + "log_dest stderr\n"
        + "log_type error\nlog_type warning\n"
        + extra_conf
    )
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
