"""``odo-verify CERT [VIN] --log-key KEY``: check a mileage certificate (docs/certificate.md).

Offline by default: the certificate file and the keys are all it reads. ``--witness-key``
(repeatable) and ``--quorum K`` require K witnesses' cosignatures on its checkpoint; ``--log URL``
also checks it against the log as it is now (:mod:`verifier.online`); ``--jobs N`` checks the
records' signatures in N processes, this one included (:class:`Workers`). Exit 0 when everything
verifies (and say what that proves and what it does not), 1 at the first failure (named), 2 on
bad usage or a file that cannot be read. Imports :mod:`protocol` and the standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future
from pathlib import Path
from typing import Any

from protocol import BadFormat, certificate_fast, note
from protocol import certificate as pc
from protocol.frames import read_frame, write_frame
from protocol.identity import VIN_RE, VerifyKey
from protocol.records import Record
from verifier import online

log = logging.getLogger(__name__)
MAX_KEY_FILE_BYTES = 4096


def _date(t_ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(t_ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _km(metres: int) -> str:
    return f"{metres // 1000:,}.{metres % 1000:03d} km"


def _reading(r: Record, estimates: Mapping[str, int]) -> str:
    assert r.odo_m is not None
    if r.clock == "synced":
        when = _date(r.t)
    elif r.id in estimates:
        when = f"{_date(estimates[r.id])} (backend's estimate: the device clock was not synced)"
    else:
        when = f"{_date(r.t)} (device clock not synced)"
    return f"{_km(r.odo_m)} on {when} ({r.kind}, seq {r.seq} of device {r.dev})"


def _seqs(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seqs {first}-{last}"


def _ends(p: pc.Proven) -> tuple[Record, Record] | None:
    """The first and the last of ``p.readings`` (without sorting them all)."""
    keyed = [(odo, r.t, r.dev, r.seq, r) for r in p.records if (odo := r.odo_m) is not None]
    if not keyed:
        return None
    return min(keyed, key=lambda k: k[:4])[4], max(keyed, key=lambda k: k[:4])[4]


def _device_lines(p: pc.Proven) -> list[str]:
    lines = []
    for d in p.devices:
        mine = [r for r in p.records if r.dev == d.dev]
        first = d.enrolments[0]
        said = f"enrolled (signed by its own key) for VIN {first.enrollment.vin}" if first.enrollment.vin \
            else "enrolled (signed by its own key) with no VIN"
        lines.append(f"  device {d.dev}: {said}, logged at entry {first.index} on {_date(first.at)}")
        for dec in d.decisions:
            extra = f" for VIN {dec.vin}" if dec.vin else ""
            extra += f", replacing {dec.replaces}" if dec.replaces else ""
            lines.append(f"    {dec.action}{extra} by {dec.by} on {_date(dec.at)} (log entry {dec.index})")
        if mine:
            lines.append(f"    {len(mine)} records, seq {mine[0].seq} to {mine[-1].seq}, each logged while "
                         "it was approved for this VIN")
    return lines


def report(p: pc.Proven, cosigners: Sequence[str], later: online.Later | None) -> list[str]:
    """What a verified certificate proves, and what it does not, as lines for a person."""
    cp = p.checkpoint
    lines = [f"VERIFIED: mileage certificate for VIN {p.vin}", "proven:"]
    lines.extend(_device_lines(p))
    ends = _ends(p)
    if ends:
        lines.append(f"  first reading: {_reading(ends[0], p.estimates)}")
        lines.append(f"  last reading:  {_reading(ends[1], p.estimates)}")
    lines.append(f"  records: {len(p.records)}, each signed by its device's key and included in checkpoint "
                 f"{cp.size} of log {cp.origin}")
    lines.append(f"  checkpoint: signed by the log's key, cosigned by {len(cosigners)} witness(es)"
                 + (f": {', '.join(cosigners)}" if cosigners else ""))
    if p.corrections:
        lines.append(f"  odometer: never decreases along each device's chain, but for {len(p.corrections)} "
                     f"correction(s) of at most {pc.CORRECTION_SLACK_M} m by a derived or driver's figure:")
        lines.extend(f"    {c}" for c in p.corrections)
    else:
        lines.append("  odometer: never decreases along each device's chain, nor across the vehicle's "
                     "devices in time order")
    if not p.gaps:
        lines.append("  chain: unbroken between the first and last record of each device")
    if later is not None:
        lines.append(f"  log now: checkpoint {later.checkpoint.size} of {cp.origin} is consistent with the "
                     f"certificate's ({later.checkpoint.size - cp.size} entries since, "
                     f"{len(later.checkpoint.cosignatures)} cosignature(s) from the witnesses given)")
        if later.scanned or later.checkpoint.size == cp.size:
            if later.records or later.decisions:
                lines.append(f"  log now: holds {len(later.records)} newer record(s) and "
                             f"{len(later.decisions)} newer device entr(ies) about this vehicle:")
                lines.extend(f"    {x}" for x in (*later.decisions, *later.records))
            else:
                lines.append("  log now: holds no newer records or device entries about this vehicle")
    lines.append("signed by the log key, not proven (the backend's word):")
    for dev, start in sorted(p.starts.items()):
        if start > 1:
            lines.append(f"  device {dev}: its records before seq {start} are not in this certificate "
                         "(not about this VIN, or before it was fitted)")
    for g in p.gaps:
        why = "; ".join(g.notes) if g.notes else "no reason given"
        lines.append(f"  gap: device {g.dev} {_seqs(g.first_seq, g.last_seq)} not in the certificate; "
                     f"the chain cannot be checked across it (backend says: {why})")
    if p.estimates:
        lines.append(f"  {len(p.estimates)} record(s) of an unsynced device clock are dated by the backend's "
                     "estimate")
    lines.append(f"  issued {_date(p.issued_at)}")
    lines.extend(f"  warning: {w}" for w in p.warnings)
    if p.ignored_signatures:
        lines.append(f"ignored: {p.ignored_signatures} signature line(s) on the checkpoint by keys not given "
                     "(not checked)")
    lines.append("not proven:")
    lines.append("  that the vehicle had no dongle besides the ones listed (one that never enrolled)")
    if later is None:
        lines.append("  that the log holds no later entries for this VIN (check with --log URL)")
    elif not later.scanned and later.checkpoint.size != cp.size:
        lines.append(f"  that the log holds no later entries for this VIN (more than "
                     f"{online.MAX_SCAN_ENTRIES} entries since: not read)")
    return lines


def _summary(p: pc.Proven, cosigners: Sequence[str], later: online.Later | None) -> dict[str, Any]:
    first, last = _ends(p) or (None, None)
    return {
        "ok": True, "vin": p.vin, "devices": [d.dev for d in p.devices], "records": len(p.records),
        "first": None if first is None else {"t": first.t, "odo_m": first.odo_m, "dev": first.dev,
                                              "seq": first.seq},
        "last": None if last is None else {"t": last.t, "odo_m": last.odo_m, "dev": last.dev,
                                            "seq": last.seq},
        "checkpoint": {"origin": p.checkpoint.origin, "size": p.checkpoint.size,
                       "root": p.checkpoint.root.hex(), "cosigned_by": list(cosigners)},
        "decisions": [{"dev": d.dev, "action": d.action, "vin": d.vin, "by": d.by, "at": d.at,
                       "index": d.index} for dev in p.devices for d in dev.decisions],
        "gaps": [{"dev": g.dev, "first_seq": g.first_seq, "last_seq": g.last_seq, "notes": list(g.notes)}
                 for g in p.gaps],
        "warnings": list(p.warnings),
        "corrections": list(p.corrections),
        "issued_at": p.issued_at,
        "ignored_signatures": p.ignored_signatures,
        "log_now": None if later is None else {
            "size": later.checkpoint.size, "consistent": True, "scanned": later.scanned,
            "newer_records": list(later.records), "newer_device_entries": list(later.decisions)},
    }


class UsageError(Exception):
    pass


# -- signatures, checked in other processes ---------------------------------------------------

#: What a worker runs: :func:`serve_signatures`, on this same Python.
_WORKER = "from verifier.cli import serve_signatures; serve_signatures()"


def serve_signatures() -> None:
    """A worker: read chunks of signatures (pickled by :class:`Workers`, its parent) on stdin
    until it closes; write the indexes of those that do not verify for each. It runs at a lower
    priority than its parent."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    if hasattr(os, "nice"):
        # Below the parent, which reads the certificate meanwhile: it has a CPU when it needs one.
        try:
            os.nice(10)
        except OSError:
            pass
    while (body := read_frame(inp)) is not None:
        write_frame(out, pickle.dumps(certificate_fast.check_chunk(pickle.loads(body))))


class Workers(Executor):
    """``jobs`` worker processes (each an interpreter of its own, so that they check signatures
    while this one reads the certificate), started at the first chunk: an executor of
    :func:`protocol.certificate_fast.check_chunk` only. A worker that fails fails its chunks
    (BrokenExecutor), which are then checked here."""

    def __init__(self, jobs: int) -> None:
        self._jobs = jobs
        self._queue: queue.SimpleQueue[tuple[Future[list[int]], Any] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if fn is not certificate_fast.check_chunk or len(args) != 1 or kwargs:
            raise ValueError("Workers run protocol.certificate_fast.check_chunk(chunk) only")
        if self._stopped:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if not self._threads:
            for n in range(self._jobs):
                thread = threading.Thread(target=self._run, name=f"signatures-{n}", daemon=True)
                thread.start()
                self._threads.append(thread)
        future: Future[list[int]] = Future()
        self._queue.put((future, args[0]))
        return future

    def _run(self) -> None:
        """One worker: hand it chunks as they come, one ahead of the one it checks (so that it
        never waits for this process), while :meth:`_answers` reads what it says."""
        root = str(Path(__file__).resolve().parent.parent)      # where verifier/ and protocol/ are
        path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
        proc: subprocess.Popen[bytes] | None
        try:
            proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": path})
        except OSError as exc:
            log.debug("no worker process: %s", exc)
            proc = None
        sent: queue.SimpleQueue[Future[list[int]] | None] = queue.SimpleQueue()
        answers = None if proc is None else threading.Thread(target=self._answers, args=(proc, sent),
                                                             daemon=True)
        if answers is not None:
            answers.start()
        broken = proc is None
        try:
            while (job := self._queue.get()) is not None:
                future, chunk = job
                if not future.set_running_or_notify_cancel():
                    continue
                if broken or proc is None or proc.stdin is None:
                    future.set_exception(BrokenExecutor("no worker process"))
                    continue
                sent.put(future)
                try:
                    write_frame(proc.stdin, pickle.dumps(chunk))
                except (OSError, ValueError):       # it stopped: _answers fails what was sent
                    broken = True
                    proc.kill()
        finally:
            sent.put(None)
            if proc is not None:
                if proc.stdin is not None:
                    try:
                        proc.stdin.close()              # the worker stops when it has answered
                    except OSError:
                        pass
                if answers is not None:
                    answers.join()
                if proc.stdout is not None:
                    proc.stdout.close()
                proc.wait()

    @staticmethod
    def _answers(proc: subprocess.Popen[bytes], sent: queue.SimpleQueue[Future[list[int]] | None]) -> None:
        """Set each chunk's answer, in the order the chunks were sent."""
        failure = ""
        while (future := sent.get()) is not None:
            if not failure:
                try:
                    assert proc.stdout is not None
                    body = read_frame(proc.stdout)
                    if body is None:
                        raise EOFError("it stopped")
                    future.set_result(pickle.loads(body))
                    continue
                except (OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
                    failure = f"the worker failed: {exc}"
                    proc.kill()
            future.set_exception(BrokenExecutor(failure))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers once they have checked what they were given (``cancel_futures``:
        only what they have begun); ``wait``: until they have stopped."""
        if cancel_futures:
            ends = 0                        # the end marks of an earlier shutdown stay in the queue
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    ends += 1
                else:
                    job[0].cancel()
            for _ in range(ends):
                self._queue.put(None)
        if not self._stopped:
            self._stopped = True
            for _ in self._threads:
                self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


def _read(path: str, what: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot read it ({exc.strerror})") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path}: larger than {limit} bytes")
    return data


def _log_key(path: str) -> note.Verifier | VerifyKey:
    data = _read(path, "--log-key", MAX_KEY_FILE_BYTES)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return VerifyKey.from_pem(data)
        verifier = note.parse_vkey(data.decode("utf-8"))
    except (BadFormat, UnicodeDecodeError) as exc:
        raise UsageError(f"--log-key {path}: neither a verifier key (<origin>+<id>+<key>) nor a PEM "
                         f"public key ({exc})") from None
    if verifier.kind != note.ED25519:
        raise UsageError(f"--log-key {path}: a log's key is an Ed25519 (type 0x01) key")
    return verifier


def _witness_key(path: str) -> note.Verifier:
    data = _read(path, "--witness-key", MAX_KEY_FILE_BYTES)
    try:
        verifier = note.parse_vkey(data.decode("utf-8"))
    except (BadFormat, UnicodeDecodeError) as exc:
        raise UsageError(f"--witness-key {path}: not a verifier key ({exc})") from None
    if verifier.kind == note.ED25519:
        # A witness's vkey may name type 0x01; its cosignatures are of type 0x04 (tlog-cosignature).
        verifier = note.Verifier(verifier.name, note.COSIGNATURE_V1, verifier.public)
    return verifier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="odo-verify", description="Verify a mileage certificate with the log's key; offline unless "
                                       "--log is given.")
    parser.add_argument("certificate", metavar="CERT", help="the certificate (JSON)")
    parser.add_argument("vin", metavar="VIN", nargs="?", help="the VIN of the car in front of you: the "
                        "certificate must be its")
    parser.add_argument("--log-key", required=True, metavar="FILE",
                        help="the log's verifier key (from odo-backend log-key), or its PEM public key")
    parser.add_argument("--witness-key", action="append", default=[], metavar="FILE",
                        help="a witness's verifier key (from odo-witness key); repeatable")
    parser.add_argument("--quorum", type=int, default=None, metavar="K",
                        help="cosignatures required from the witness keys given (default: all of them)")
    parser.add_argument("--log", metavar="URL", help="the log's public URL (…/log): check the certificate "
                        "against the log as it is now")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="processes checking the records' signatures, this one included (default: "
                             "one a CPU); the result is the same with any number")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.vin is not None and not VIN_RE.fullmatch(args.vin):
            raise UsageError(f"VIN {args.vin!r}: 17 characters of A-H, J-N, P, R-Z and 0-9")
        log_key = _log_key(args.log_key)
        witnesses = [_witness_key(p) for p in args.witness_key]
        quorum = len(witnesses) if args.quorum is None else args.quorum
        if not 0 <= quorum <= len(witnesses):
            raise UsageError(f"--quorum {quorum}: must be 0 to the number of --witness-key files "
                             f"({len(witnesses)})")
        if not 1 <= args.jobs <= 256:
            raise UsageError(f"--jobs {args.jobs}: 1 to 256")
        if args.log is not None and not args.log.startswith(("http://", "https://")):
            raise UsageError(f"--log {args.log!r}: an http:// or https:// URL")
        data = _read(args.certificate, "certificate", pc.MAX_CERTIFICATE_BYTES)
    except UsageError as exc:
        print(f"odo-verify: {exc}", file=sys.stderr)
        return 2
    workers = Workers(args.jobs - 1) if args.jobs > 1 else None
    collecting = gc.isenabled()
    # What is made from here on is kept to the end, and holds no cycles to collect: looking for
    # some among millions of objects, again and again as they are made, would cost seconds.
    gc.disable()
    try:
        return _check(args, data, log_key, witnesses, quorum, workers)
    finally:
        if workers is not None:
            workers.shutdown(cancel_futures=True)
        if collecting:
            gc.enable()


def _check(args: argparse.Namespace, data: bytes, log_key: note.Verifier | VerifyKey,
           witnesses: Sequence[note.Verifier], quorum: int, workers: Workers | None) -> int:
    """Verify the certificate read, and print what it proves; the exit status."""
    try:
        proven = pc.verify(data, log_key, witnesses, quorum, executor=workers)
        if workers is not None:
            workers.shutdown(wait=False)        # they stop while the report is made
        if args.vin is not None and proven.vin != args.vin:
            raise pc.CertificateError(f"the certificate is for VIN {proven.vin}, not {args.vin}")
        verifier = log_key if isinstance(log_key, note.Verifier) else \
            note.Verifier(proven.checkpoint.origin, note.ED25519, log_key)
        later = None if args.log is None else online.check(
            args.log, proven.checkpoint, verifier, witnesses, quorum, proven.vin,
            {d.dev: d.pub for d in proven.devices})
    except (pc.CertificateError, online.OnlineError) as exc:
        if args.json:
            print(json.dumps({"ok": False, "failure": str(exc)}))
        print(f"FAILED: {exc}", file=sys.stdout if not args.json else sys.stderr)
        return 1
    cosigners = [v.verifier.name for v in proven.checkpoint.cosignatures]
    if args.json:
        print(json.dumps(_summary(proven, cosigners, later), indent=1))
    else:
        print("\n".join(report(proven, cosigners, later)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
