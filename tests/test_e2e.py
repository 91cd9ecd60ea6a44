"""End to end, on real parts: mosquitto, ``odo-backend run``, the ELM327 emulator and
``odo-agent`` as real processes (started by :mod:`sim.stack`), plus ``make demo``'s module."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.buffer import Outbox
from protocol import canonical, jws, messages, topics
from protocol.identity import SigningKey
from protocol.records import record_id
from sim.stack import ROOT, Car, CarSpec, Stack
from tests.e2e_support import left_running, wait_until

VIN1, VIN2, VIN3 = "WP0ZZZ99ZTS390011", "WVWZZZ1JZXW000012", "VF1RFB00X00000013"


def records(stack: Stack, car: Car) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = stack.api(f"/api/devices/{car.dev}/records")
    return got


def accepted_chain(stack: Stack, car: Car, at_least: int) -> list[dict[str, Any]]:
    """Wait until the backend holds ``at_least`` records; check seq 1..N, all accepted."""
    recs = wait_until(f"{at_least} records of {car.name}",
                      lambda: (r := records(stack, car)) and len(r) >= at_least and r, timeout=40)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert [(r["seq"], r["status"], r["reason"]) for r in recs if r["status"] != "accepted"] == []
    return recs


def start_car(stack: Stack, spec: CarSpec, *, fleet_token: bool = True) -> Car:
    car = stack.add_car(spec) if fleet_token else stack.add_car(spec, fleet_token=None)
    stack.start_agent(car)
    return car


def enrolled(stack: Stack, car: Car) -> Car:
    done = stack.enroll(car)
    assert done.returncode == 0, done.stdout + done.stderr
    return car


# -- make demo ---------------------------------------------------------------------------------------

def test_demo_smoke(tmp_path: Path) -> None:
    data = tmp_path / "demo-data"
    done = subprocess.run([sys.executable, "-m", "sim.demo", "--seconds", "40", "--data", str(data)],
                          cwd=ROOT, capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-4:-1]     # the last block of vehicle lines
    assert len(last) == 3 and all(" accepted " in ln for ln in last), done.stdout
    for ln in last:
        accepted = int(re.search(r"accepted +(\d+)", ln).group(1))  # type: ignore[union-attr]
        rejected = int(re.search(r"rejected +(\d+)", ln).group(1))  # type: ignore[union-attr]
        assert accepted > 0 and rejected == 0, ln
        assert float(re.search(r"balance +([\d.,]+) tokens", ln).group(1)) >= 10, ln  # type: ignore[union-attr]
    assert "(derived)" in done.stdout
    assert (data / "logs" / "backend.log").exists()
    assert left_running(data) == []


# -- the main scenario, on SQLite and PostgreSQL -------------------------------------------------

def test_records_accepted_in_order_and_confirmation_credited_once(tmp_path: Path, db_url: str) -> None:
    with Stack(tmp_path / "stack", db_url=db_url) as stack:
        stack.start_broker()
        stack.start_backend()
        car = enrolled(stack, start_car(stack, CarSpec(VIN1, 20_000.0)))
        accepted_chain(stack, car, 2)
        odo = wait_until("an odometer figure", lambda: stack.status(car)["odo_m"])
        done = stack.agent_cli(car, "confirm", "--km", f"{odo / 1000:.1f}", "--yes")
        assert done.returncode == 0, done.stderr
        wallet = f"/api/wallets/unassigned:{car.dev}"
        wait_until("the confirmation credited", lambda: stack.status(car)["balance"] == 10000, timeout=20)
        assert stack.api(wallet)["balance"] == 10000
        # a restart resends whatever was not acknowledged yet: still credited once
        stack.stop_agent(car)
        stack.start_agent(car)
        before = len(records(stack, car))
        recs = accepted_chain(stack, car, before + 1)
        assert [r["kind"] for r in recs].count("confirmation") == 1
        wait_until("the agent in sync", lambda: stack.status(car)["backlog"] == 0, timeout=20)
        st = stack.status(car)
        assert st["balance"] == stack.api(wallet)["balance"] == 10000
        assert len(stack.api(wallet)["transfers"]) == 1
        assert st["synced_through"] == st["last_seq"] >= recs[-1]["seq"]
    assert left_running(tmp_path) == []


# -- bad records published straight to the broker ------------------------------------------------

class Publisher:
    """A paho client that publishes as anyone and reads every device's acks."""

    def __init__(self, stack: Stack) -> None:
        self.acks: list[tuple[str, messages.Ack]] = []
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="e2e-intruder", protocol=mqtt.MQTTv5)
        self.c.on_message = lambda c, u, m: self.acks.append((m.topic.split("/")[2],
                                                              messages.decode_ack(m.payload)))
        self.c.connect("127.0.0.1", stack.broker_port)
        self.c.subscribe("odo/v1/+/ack", qos=1)
        self.c.loop_start()

    def publish(self, dev: str, jws_list: list[str]) -> None:
        self.c.publish(topics.records(dev), messages.encode_batch(jws_list), qos=1).wait_for_publish(5)

    def rejections(self, dev: str) -> set[tuple[int | None, str]]:
        return {(r.seq, r.reason) for d, a in list(self.acks) if d == dev for r in a.rejected}

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _payload(compact: str) -> dict[str, Any]:
    body = compact.split(".")[1]
    loaded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return loaded


def test_forged_tampered_cross_topic_and_replayed_records(stack: Stack) -> None:
    car1 = enrolled(stack, start_car(stack, CarSpec(VIN1, 30_000.0)))
    car2 = enrolled(stack, start_car(stack, CarSpec(VIN2, 40_000.0)))
    accepted_chain(stack, car1, 2)
    accepted_chain(stack, car2, 2)
    outbox = Outbox.open(car1.state_dir / "outbox.db")
    try:
        tip_seq = outbox.tip()[0]
        real = outbox.get(tip_seq)
        first = outbox.get(1)
    finally:
        outbox.close()
    assert real is not None and first is not None
    # forged: the next seq, claiming car1's kid, signed by another key
    body = {**_payload(real.jws), "seq": tip_seq + 1, "prev": real.id, "t": real.t + 1}
    forged = jws.sign(canonical.dumps(body), SigningKey.generate(), car1.dev)
    # tampered: one byte of a real record flipped
    head, pay, sig = first.jws.split(".")
    flipped = pay[:10] + ("A" if pay[10] != "A" else "B") + pay[11:]
    tampered = f"{head}.{flipped}.{sig}"
    pub = Publisher(stack)
    try:
        pub.publish(car1.dev, [forged])
        wait_until("the forged record rejected",
                   lambda: (tip_seq + 1, "bad_signature") in pub.rejections(car1.dev))
        pub.publish(car1.dev, [tampered])
        wait_until("the tampered record rejected",
                   lambda: {(1, "bad_signature"), (1, "bad_format"), (None, "bad_format")}
                   & pub.rejections(car1.dev))
        pub.publish(car2.dev, [real.jws])     # car1's genuine record on car2's topic
        wait_until("the cross-topic record rejected",
                   lambda: any(reason == "dev_mismatch" for _, reason in pub.rejections(car2.dev)))
        before = records(stack, car1)
        pub.publish(car1.dev, [first.jws, real.jws])   # replayed: a no-op
        time.sleep(1.0)
        after = records(stack, car1)
        assert [(r["seq"], r["id"], r["status"]) for r in after[:len(before)]] == \
               [(r["seq"], r["id"], r["status"]) for r in before]
    finally:
        pub.close()
    # the genuine chains go on, unaffected: the real record with the forged one's seq is accepted
    recs1 = accepted_chain(stack, car1, tip_seq + 2)
    ids = [r["id"] for r in recs1]
    assert record_id(forged) not in ids and record_id(tampered) not in ids and len(set(ids)) == len(ids)
    accepted_chain(stack, car2, len(records(stack, car2)))
    devices = {d["dev"]: d for d in stack.api("/api/devices")}
    assert devices[car1.dev]["rejected"] == 0 and devices[car2.dev]["rejected"] == 0


# -- enrolment without a fleet token --------------------------------------------------------------

def test_enrolment_without_fleet_token_stays_pending_until_approved(stack: Stack) -> None:
    car = start_car(stack, CarSpec(VIN3, 9_000.0), fleet_token=False)
    done = stack.enroll(car, wait_s=5)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "pending" in done.stdout
    st = wait_until("records waiting on the agent",
                    lambda: (s := stack.status(car))["backlog"] >= 2 and s["last_rejection"] and s)
    assert st["last_rejection"]["reason"] == "unknown_device"
    assert st["synced_through"] == 0
    assert records(stack, car) == []
    approved = stack.backend_cli("devices", "approve", car.dev)
    assert approved.returncode == 0, approved.stderr
    last = stack.status(car)["last_seq"]
    recs = accepted_chain(stack, car, last)
    wait_until("the backlog sent", lambda: stack.status(car)["backlog"] == 0, timeout=30)
    assert recs[0]["seq"] == 1


def test_run_alone_enrols_with_the_fleet_token(stack: Stack) -> None:
    """`init --fleet-token` then `run`, with no `enroll`: the daemon enrols on connect."""
    car = start_car(stack, CarSpec(VIN2, 30_000.0))
    st = wait_until("approval", lambda: (s := stack.status(car))["enrolled"] == "approved" and s)
    assert st["dev"] == car.dev
    recs = accepted_chain(stack, car, 1)
    assert stack.api(f"/api/devices/{car.dev}")["status"] == "approved"
    assert recs[0]["seq"] == 1
