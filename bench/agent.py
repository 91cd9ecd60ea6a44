"""The agent's footprint: ``odo-agent run`` polling a simulated car at 1 Hz, its RSS and CPU, for a day.

    .venv/bin/python -m bench.agent [--hours 24] [--drives 2] [--drive-min 60] [--day-s 55]
                                    [--realtime-s 10] [--every 250]

The agent runs as installed, a process of its own, against the ELM327 emulator (:mod:`sim.car`,
on a pseudo-terminal, as a serial or Bluetooth adapter is) through a relay in this process that
counts its polls: each poll asks for the battery voltage (``ATRV``) once, and for the speed
(``010D``) while the ignition is on. RSS is VmRSS from ``/proc/<pid>/status``; CPU is utime +
stime from ``/proc/<pid>/stat`` (all its threads), read every ``--every`` polls. The broker in
the agent's configuration does not answer: an offline day, every record kept in the outbox.

1. Baselines, each in a fresh interpreter: the RSS and import time of Python alone, of
   ``import agent``, of what every ``odo-agent`` command imports (``agent.cli``), of what
   ``odo-agent run`` imports, and of python-OBD's whole package (pint and all) imported on top,
   the part of it that the agent's imports are. Then the CPU of one
   poll's queries sent through bare pyserial: the floor under the agent's.
2. One hertz, in real time: ``odo-agent run`` with its stock timings, driving, for
   ``--realtime-s``: its share of a core, timers and idle threads included (summed from the
   kernel's per-thread ``schedstat``, in ns: 10 ms ticks are too coarse for a few seconds).
3. A day, compressed: ``--drives`` drives of ``--drive-min`` minutes and the car parked in
   between, ``--hours`` of simulated time in ``--day-s`` seconds.

How the day is compressed. The car's clock runs k times the wall clock (the profile's
``time_scale``), k chosen so that the day lasts ``--day-s``. The agent's configuration
follows, through settings it has anyway: ``[power] on_poll_s`` is one second of the car's
time (less what the same queries take through bare pyserial, so that a poll starts about
every simulated second, as with ``on_poll_s = 1``; no less than 0.1 ms); the ``[vehicle]``
times in ms are divided by k, and ``max_kph`` multiplied by k. Parked, a poll stands for the
stock ``off_poll_s`` of 10 s: the car's profile parks for a tenth of the parked time, each
second of it counts for ten, and ``off_poll_s`` is one second of the car's time too. What
the emulator and this machine allow is reported beside it: polls per driving and per parked
hour (3600 and 360 at 1 Hz and 0.1 Hz).

The agent's own clock is not touched (its records carry true times), so what runs on that
clock rather than per poll keeps its real pace and is under-counted by the day: the live view
saved at most every 10 s, the outbox pruned every 10 min, the sync loop's reconnects, the main
loop's 1 s wake-ups. Part 2 counts them at their real rate. A dongle powered off when parked
(the power policy's ``shutdown_command``) restarts every day; this one runs through the day.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pty
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import serial  # type: ignore[import-untyped]

from sim.car import SimCar
from sim.processes import ROOT, Proc, ProcessGroup, child_env, command, free_port
from sim.profile import Profile

PARKED_POLL_S = 10              # what a parked poll stands for: the stock off_poll_s
FASTEST_POLL_S = 0.0001         # the shortest poll interval the day asks for
RSS_GOAL_MIB = 50.0
SLOPE_GOAL_MIB_H = 0.05         # "flat": at most 1.2 MiB a day
CPU_GOAL = 0.02                 # of one core, at 1 Hz
DRIVING_QUERIES = (b"010D", b"010C", b"01A6", b"0131", b"ATRV")   # a poll, as agent.obd_source sends it
PARKED_QUERIES = (b"ATRV", b"010C")                               # a poll with the ignition off
VEHICLE_MS = {"record_every_ms": 60_000, "ignition_on_debounce_ms": 3000, "ignition_off_debounce_ms": 30_000,
              "integrate_max_gap_ms": 5000}                       # agent.vehicle.VehicleConfig's defaults
MAX_KPH = 300
#: What ``odo-agent run`` imports (agent.cli.cmd_run), for the baselines.
DAEMON_IMPORTS = ("agent.cli", "agent.daemon", "agent.obd_source", "agent.power", "agent.sync",
                  "agent.vehicle")

_MAX_PROC_BYTES = 65_536
_MAX_LINE = 256
_VMRSS = re.compile(rb"VmRSS:\s+(\d{1,12}) kB")
_SCHEDSTAT = re.compile(rb"(\d{1,20}) \d{1,20} \d{1,20}\s*")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- reading /proc ---------------------------------------------------------------------------------

def _proc(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as fh:
        return fh.read(_MAX_PROC_BYTES)


def rss_kib(pid: int) -> int:
    """VmRSS of process ``pid``, in KiB."""
    m = _VMRSS.search(_proc(pid, "status"))
    if m is None:
        raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")
    return int(m.group(1))


def cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads, running or ended), in seconds."""
    stat = _proc(pid, "stat")
    fields = stat[stat.rindex(b")") + 2:].split()
    if len(fields) < 13 or not (fields[11].isdigit() and fields[12].isdigit()):
        raise RuntimeError(f"/proc/{pid}/stat has no utime and stime: {stat[:80]!r}")
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cpu_ns(pid: int) -> int:
    """The CPU time of the running threads of process ``pid``, in ns (``/proc/<pid>/task/*/schedstat``)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task")[:1000]:
        try:
            text = _proc(pid, f"task/{tid}/schedstat")
        except FileNotFoundError:   # the thread ended meanwhile
            continue
        m = _SCHEDSTAT.fullmatch(text)
        if m is None:
            raise RuntimeError(f"/proc/{pid}/task/{tid}/schedstat: unexpected {text[:80]!r}")
        total += int(m.group(1))
    return total


# -- the relay that counts polls -------------------------------------------------------------------

class PollCounter:
    """A pseudo-terminal for the agent, relayed to the emulator's; counts the polls sent through it."""

    def __init__(self, car_port: str) -> None:
        self._car = os.open(car_port, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self._car)
        self._master, self._slave = pty.openpty()   # the slave stays open: no EIO between clients
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self.polls = 0                 # ATRV: one per poll
        self.driving = 0               # 010D: one per poll with the ignition on
        self._line = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master, self._car], [], [], 0.1)
            for fd in ready:
                data = os.read(fd, 4096)
                if not data:            # the emulator went away
                    return
                if fd == self._master:
                    self._count(data)
                    os.write(self._car, data)
                else:
                    os.write(self._master, data)

    def _count(self, data: bytes) -> None:
        *lines, rest = (self._line + data).split(b"\r")
        self._line = rest[-_MAX_LINE:]
        for line in lines:
            cmd = line.strip()
            if cmd == b"ATRV":
                self.polls += 1
            elif cmd == b"010D":
                self.driving += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for fd in (self._master, self._slave, self._car):
            os.close(fd)


# -- baselines -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Footprint:
    rss_kib: int
    import_ms: float
    pint: bool                 # pint was among what was imported


_CHILD = """
import importlib, re, sys, time
t = time.perf_counter()
for name in sys.argv[1:]:
    importlib.import_module(name)
ms = (time.perf_counter() - t) * 1000
rss = re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
print(rss, ms, int("pint" in sys.modules))
"""


def footprint(modules: Sequence[str], runs: int = 3) -> Footprint:
    """RSS (the median) and import time (the least, the one least disturbed by whatever else runs)
    of importing ``modules`` in ``runs`` fresh interpreters."""
    out = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", _CHILD, *modules], cwd=ROOT, env=child_env(),
                              capture_output=True, text=True, timeout=60, check=True)
        rss, ms, pint = done.stdout.split()
        out.append((int(rss), float(ms), pint == "1"))
    return Footprint(int(statistics.median(r for r, _, _ in out)), min(m for _, m, _ in out), out[0][2])


@dataclass(frozen=True)
class Bare:
    cpu_s: float               # per poll, this thread's
    wall_s: float              # per poll


def bare_queries(port: str, queries: Sequence[bytes], polls: int) -> Bare:
    """Send ``queries`` ``polls`` times through bare pyserial (write, read to the prompt); the
    CPU of this thread only (the relay's is no more the agent's than it is this)."""
    with serial.Serial(port, 38400, timeout=2) as s:
        def ask(cmd: bytes) -> None:
            s.write(cmd + b"\r")
            buf = b""
            while not buf.endswith(b">"):
                chunk = s.read(s.in_waiting or 1)
                if not chunk:
                    raise RuntimeError(f"the emulator did not answer {cmd!r}")
                buf = (buf + chunk)[-_MAX_LINE:]

        for cmd in (b"ATZ", b"ATE0", b"ATH1", b"ATL0", b"ATSP0", b"0100"):
            ask(cmd)
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(polls):
            for cmd in queries:
                ask(cmd)
        return Bare((time.thread_time() - cpu) / polls, (time.perf_counter() - wall) / polls)


# -- the agent -------------------------------------------------------------------------------------

def agent_cli(state: Path, *args: str) -> str:
    argv = [*command("odo-agent", "agent.cli"), args[0], "--state-dir", str(state), *args[1:]]
    done = subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"odo-agent {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def configure(state: Path, port: str, broker: str, extra: str = "") -> None:
    """Write the agent's config file: this port and broker, a synchronised clock, and ``extra``."""
    (state / "agent.toml").write_text(
        f'obd_port = "{port}"\nobd_baudrate = 38400\nbroker = "{broker}"\nclock = "synced"\n'
        f'log_level = "warning"\n{extra}')


def start_agent(group: ProcessGroup, name: str, state: Path, relay: PollCounter) -> Proc:
    """``odo-agent run``; returns once it has polled."""
    agent = group.spawn(name, [*command("odo-agent", "agent.cli"), "run", "--state-dir", str(state)])
    before = relay.polls
    deadline = time.monotonic() + 30
    while relay.polls == before:
        if not agent.running():
            raise RuntimeError(f"odo-agent run exited {agent.popen.returncode}; see {agent.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"odo-agent run did not poll within 30 s; see {agent.log}")
        time.sleep(0.005)
    return agent


@dataclass(frozen=True)
class RealTime:
    rss_kib: int               # after start: at the second poll
    polls: int
    cpu_share: float           # of one core, over the window


def one_hertz(group: ProcessGroup, relay: PollCounter, state: Path, seconds: float) -> RealTime:
    """The agent for ``seconds`` from its second poll on; its RSS then."""
    agent = start_agent(group, "agent-1hz", state, relay)
    second = relay.polls + 1
    while relay.polls < second and agent.running():
        time.sleep(0.005)
    rss = rss_kib(agent.pid)
    polls, ns, t = relay.polls, cpu_ns(agent.pid), time.monotonic()
    time.sleep(seconds)
    polls, ns, t = relay.polls - polls, cpu_ns(agent.pid) - ns, time.monotonic() - t
    group.stop(agent)
    return RealTime(rss, polls, ns / 1e9 / t)


@dataclass(frozen=True)
class Schedule:
    """The day in the car's time (``car_s``, the profile's seconds) and in simulated time."""

    drive_s: float
    park_car_s: float          # the profile's park_s: the parked time / PARKED_POLL_S

    @property
    def period(self) -> float:
        return self.drive_s + self.park_car_s

    def driven_s(self, car_s: float) -> float:
        n, u = divmod(car_s, self.period)
        return n * self.drive_s + min(u, self.drive_s)

    def sim_s(self, car_s: float) -> float:
        driven = self.driven_s(car_s)
        return driven + PARKED_POLL_S * (car_s - driven)


@dataclass(frozen=True)
class Sample:
    sim_h: float
    polls: int
    driving: int
    cpu_s: float
    rss_kib: int


@dataclass(frozen=True)
class Day:
    k: float
    real_s: float
    driven_h: float
    samples: list[Sample]
    records: int
    outbox_kib: int


@dataclass(frozen=True)
class DaySpec:
    sched: Schedule
    hours: float
    k: float
    on_poll_s: float
    off_poll_s: float
    every: int


def a_day(group: ProcessGroup, tmp: Path, state: Path, broker: str, profile: Profile, spec: DaySpec,
          records_before: int) -> Day:
    """The agent through ``spec.hours`` of simulated time; RSS and CPU every ``spec.every`` polls."""
    k, sched = spec.k, spec.sched
    car = SimCar(profile, tmp / "car-day")
    car_t0 = time.monotonic()       # the car's clock starts within start()
    car.start()
    relay = PollCounter(car.port or "")
    try:
        vehicle = "".join(f"{key} = {max(1, round(ms / k))}\n" for key, ms in VEHICLE_MS.items())
        configure(state, relay.port, broker,
                  f"\n[vehicle]\n{vehicle}max_kph = {round(MAX_KPH * k)}\n\n"
                  f"[power]\non_poll_s = {spec.on_poll_s:.6f}\noff_poll_s = {spec.off_poll_s:.6f}\n")
        agent = start_agent(group, "agent-day", state, relay)
        start = time.monotonic()
        c0 = (start - car_t0) * k
        samples: list[Sample] = []
        next_at = relay.polls
        while True:
            c = (time.monotonic() - car_t0) * k
            sim_h = (sched.sim_s(c) - sched.sim_s(c0)) / 3600
            if relay.polls >= next_at or sim_h >= spec.hours:
                samples.append(Sample(sim_h, relay.polls, relay.driving, cpu_s(agent.pid),
                                      rss_kib(agent.pid)))
                next_at = relay.polls + spec.every
            if sim_h >= spec.hours:
                break
            if not agent.running():
                raise RuntimeError(f"odo-agent run exited {agent.popen.returncode}; see {agent.log}")
            time.sleep(0.002)
        real_s = time.monotonic() - start
        group.stop(agent)
    finally:
        relay.close()
        car.stop()
    records = int(json.loads(agent_cli(state, "status", "--json"))["last_seq"]) - records_before
    return Day(k, real_s, (sched.driven_s(c) - sched.driven_s(c0)) / 3600, samples, records,
               (state / "outbox.db").stat().st_size // 1024)


# -- the report ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Results:
    base: dict[str, Footprint]
    bare: Bare
    bare_parked: Bare
    rt: RealTime
    day: Day
    hours: float
    realtime_s: float


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def split_cpu(samples: list[Sample]) -> dict[bool, tuple[float, int]]:
    """CPU seconds per poll and polls, over the stretches between samples that were all driving
    (True) or all parked (False); a stretch of both (an ignition change) counts for neither."""
    cpu = {True: 0.0, False: 0.0}
    polls = {True: 0, False: 0}
    for a, b in zip(samples, samples[1:], strict=False):
        n, d = b.polls - a.polls, b.driving - a.driving
        if n > 0 and (d >= 0.95 * n or d <= 0.05 * n):
            cpu[d > n / 2] += b.cpu_s - a.cpu_s
            polls[d > n / 2] += n
    return {kind: (cpu[kind] / polls[kind] if polls[kind] else float("nan"), polls[kind])
            for kind in (True, False)}


def report(r: Results) -> list[str]:
    day, rt, s = r.day, r.rt, r.day.samples
    first, last = s[0], s[-1]
    warm = [x for x in s if x.sim_h >= 1.0]
    slope = (statistics.linear_regression([x.sim_h for x in warm], [x.rss_kib / 1024 for x in warm]).slope
             if len(warm) >= 3 else float("nan"))
    peak = max(x.rss_kib for x in s)
    polls, driving = last.polls - first.polls, last.driving - first.driving
    per_poll = (last.cpu_s - first.cpu_s) / polls if polls else float("nan")
    split = split_cpu(s)
    (on_cpu, on_n), (off_cpu, off_n) = split[True], split[False]
    floor = r.base["daemon"].rss_kib
    goal_kib = RSS_GOAL_MIB * 1024
    parked_h = r.hours - day.driven_h
    out = [
        "| figure | ours | baseline | ratio | goal | met |",
        "|---|---:|---|---:|---|---|",
        f"| RSS after start | {_mib(rt.rss_kib)} | what `odo-agent run` imports, alone: {_mib(floor)} | "
        f"{rt.rss_kib / floor:.2f} | ≤ {RSS_GOAL_MIB:.0f} MiB | {_met(rt.rss_kib <= goal_kib)} |",
        f"| RSS, highest over the day | {_mib(peak)} | the same | {peak / floor:.2f} | "
        f"≤ {RSS_GOAL_MIB:.0f} MiB | {_met(peak <= goal_kib)} |",
        f"| RSS slope after the first hour | {slope:+.3f} MiB/h | — | — | ≤ {SLOPE_GOAL_MIB_H} MiB/h "
        f"| {_met(abs(slope) <= SLOPE_GOAL_MIB_H)} |",
        f"| CPU per poll, driving ({on_n} polls) | {on_cpu * 1000:.2f} ms | the same 5 queries through bare "
        f"pyserial: {r.bare.cpu_s * 1000:.2f} ms | {on_cpu / r.bare.cpu_s:.1f} | "
        f"≤ {CPU_GOAL * 1000:.0f} ms (2 % at 1 Hz) | {_met(on_cpu <= CPU_GOAL)} |",
        f"| CPU per poll, parked ({off_n} polls) | {off_cpu * 1000:.2f} ms | the same 2 queries through bare "
        f"pyserial: {r.bare_parked.cpu_s * 1000:.2f} ms | {off_cpu / r.bare_parked.cpu_s:.1f} | "
        f"≤ {CPU_GOAL * PARKED_POLL_S * 1000:.0f} ms (2 % at 0.1 Hz) | "
        f"{_met(off_cpu <= CPU_GOAL * PARKED_POLL_S)} |",
        f"| CPU per poll over the day, × 1 Hz | {per_poll:.3%} of a core | — | — | ≤ {CPU_GOAL:.0%} "
        f"| {_met(per_poll <= CPU_GOAL)} |",
        f"| CPU at 1 Hz in real time ({r.realtime_s:.0f} s driving, {rt.polls} polls) | {rt.cpu_share:.3%} "
        f"of a core | bare pyserial at 1 Hz: {r.bare.cpu_s:.3%} | {rt.cpu_share / r.bare.cpu_s:.1f} | "
        f"≤ {CPU_GOAL:.0%} | {_met(rt.cpu_share <= CPU_GOAL)} |",
        "",
        "| process | RSS | import time | pint imported |",
        "|---|---:|---:|---|",
    ]
    names = {"python": "Python alone", "agent": "`import agent`",
             "cli": "`import agent.cli`: every `odo-agent` command, `--help`",
             "daemon": "what `odo-agent run` imports",
             "whole": "the same, python-OBD's whole package imported on top"}
    for key, label in names.items():
        fp = r.base[key]
        ms = f"{fp.import_ms:.0f} ms" if key != "python" else "—"
        out.append(f"| {label} | {_mib(fp.rss_kib)} | {ms} | {'yes' if fp.pint else 'no'} |")
    hourly = "; ".join(f"{x.sim_h:.0f} h {x.rss_kib / 1024:.1f}" for x in _every_hours(s, 4))
    out += [
        "",
        f"The day: {r.hours:g} simulated hours in {day.real_s:.0f} s (k = {day.k:.0f}), "
        f"{day.driven_h:.2f} h of them driving. {polls} polls: {driving} with the engine running, "
        f"{_per_hour(driving, day.driven_h)} per driving hour (1 Hz: 3600); {polls - driving} parked, "
        f"{_per_hour(polls - driving, parked_h)} per parked hour (0.1 Hz: 360). {day.records} records "
        f"signed, outbox {day.outbox_kib} KiB. "
        f"RSS (MiB) by simulated hour: {hourly}.",
    ]
    if day.driven_h and driving / day.driven_h < 0.8 * 3600:
        out.append(f"The agent polled below 1 Hz of simulated time here: give the day more --day-s than "
                   f"{day.real_s:.0f}.")
    return out


def _per_hour(n: int, hours: float) -> str:
    return f"{n / hours:.0f}" if hours > 0 else "—"


def _every_hours(samples: list[Sample], step: float) -> list[Sample]:
    out, at = [], 0.0
    for x in samples:
        if x.sim_h >= at:
            out.append(x)
            at += step
    if out[-1] is not samples[-1]:
        out.append(samples[-1])
    return out


# -- main ------------------------------------------------------------------------------------------

def _bounded(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not within {low:g}..{high:g}")
        return value
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.agent", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--hours", type=_bounded(float, 1, 72), default=24.0, help="simulated hours (24)")
    ap.add_argument("--drives", type=_bounded(int, 1, 48), default=2, help="drives in them (2)")
    ap.add_argument("--drive-min", type=_bounded(float, 5, 600), default=60.0, help="minutes each (60)")
    ap.add_argument("--day-s", type=_bounded(float, 10, 3600), default=55.0,
                    help="real seconds the day takes: about 1 Hz needs ~4 ms a poll here (55)")
    ap.add_argument("--realtime-s", type=_bounded(float, 3, 600), default=10.0,
                    help="seconds at 1 Hz in real time (10)")
    ap.add_argument("--every", type=_bounded(int, 10, 100_000), default=250,
                    help="polls between samples (250)")
    args = ap.parse_args(argv)
    if args.drives * args.drive_min * 60 > args.hours * 3600:
        ap.error(f"{args.drives} drives of {args.drive_min:g} min do not fit in {args.hours:g} h")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    drive_s = args.drive_min * 60
    sched = Schedule(drive_s, (args.hours * 3600 / args.drives - drive_s) / PARKED_POLL_S)
    k = args.drives * sched.period / args.day_s
    broker = f"mqtt://127.0.0.1:{free_port()}"   # nobody listens there
    print(f"odo-agent run against ELM327-emulator on a pty; Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs; a day of {args.hours:g} h: {args.drives} drives of "
          f"{args.drive_min:g} min, parked polls standing for {PARKED_POLL_S} s, k = {k:.0f}; broker "
          f"unreachable; RSS and CPU every {args.every} polls", flush=True)
    base = {"python": footprint([]), "agent": footprint(["agent"]), "cli": footprint(["agent.cli"]),
            "daemon": footprint(DAEMON_IMPORTS), "whole": footprint([*DAEMON_IMPORTS, "obd"])}
    with tempfile.TemporaryDirectory(prefix="odo-bench-agent-") as tmpdir:
        tmp = Path(tmpdir)
        group = ProcessGroup(tmp / "logs")
        state = tmp / "state"
        state.mkdir()
        try:
            car = SimCar(Profile(drive_s=3600, park_s=0), tmp / "car-1hz")
            car.start()
            relay = PollCounter(car.port or "")
            try:
                bare = bare_queries(relay.port, DRIVING_QUERIES, 100)
                bare_parked = bare_queries(relay.port, PARKED_QUERIES, 100)
                agent_cli(state, "init", "--obd-port", relay.port, "--broker", broker)
                # Stock timings but off_poll_s: the ignition is off until a few samples say it is on.
                configure(state, relay.port, broker, "\n[power]\noff_poll_s = 1\n")
                rt = one_hertz(group, relay, state, args.realtime_s)
            finally:
                relay.close()
                car.stop()
            status = json.loads(agent_cli(state, "status", "--json"))
            odo_m = status["odo_m"] or Profile().start_odo_m
            profile = Profile(start_odo_km=odo_m / 1000 + 1, drive_s=drive_s, park_s=sched.park_car_s,
                              time_scale=k)
            spec = DaySpec(sched, args.hours, k, max(FASTEST_POLL_S, 1 / k - bare.wall_s),
                           max(FASTEST_POLL_S, 1 / k - bare_parked.wall_s), args.every)
            day = a_day(group, tmp, state, broker, profile, spec, int(status["last_seq"]))
        finally:
            group.close()
    print()
    print("\n".join(report(Results(base, bare, bare_parked, rt, day, args.hours, args.realtime_s))))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # clean up as for Ctrl-C
    main()
