"""``odo-backend run`` as a real process, and reading its HTTP answers and metrics.

The devices that talk MQTT to it are :class:`sim.mqtt_device.MqttDevice`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sim.devices import FLEET_TOKEN, write_rules
from sim.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
API_TOKEN = "api-token-for-tests"


@dataclass
class Backend:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=5)

    def wait_healthy(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"odo-backend exited with {self.process.returncode}:\n"
                                     f"{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"odo-backend did not answer /healthz:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"odo-backend did not stop on {sig}:\n{self.log.read_text()}") from None
        return int(self.process.returncode)


def start_backend(tmp_path: Path, db_url: str, broker_url: str, *extra: str, name: str = "backend",
                  wait: bool = True) -> Backend:
    port = free_port()
    log = tmp_path / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODO_")}
    argv = [sys.executable, "-m", "backend.cli", "--log-level", "info", "run", "--db", db_url,
            "--broker", broker_url, "--http", f"127.0.0.1:{port}", "--rules", str(write_rules(tmp_path)),
            "--fleet-token", FLEET_TOKEN, "--api-token", API_TOKEN, *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    backend = Backend(proc, port, log)
    if wait:
        backend.wait_healthy()
    return backend


def metrics_value(text: str, selector: str) -> int:
    """The sum of the samples named as ``selector`` says (``name`` or ``name{label="value",…}``,
    the labels a subset of the sample's, in any order), read with Prometheus' own parser."""
    name = selector.split("{", 1)[0]
    labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', selector))
    return sum(int(s.value) for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def as_json(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return json.loads(response.text)
