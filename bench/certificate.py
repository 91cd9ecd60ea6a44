"""odo-verify on a mileage certificate of many records, beside the time its signatures alone take.

    .venv/bin/python -m bench.certificate [--records 100000] [--others 1] [--rounds 2] [--in-process]
                                          [--profile N]

The certificate is made with protocol code only, as the backend makes one (docs/certificate.md):
a device's enrolment and its approval, then ``--records`` records (odometer readings, a trip
every tenth), each followed in the log by ``--others`` entries of other vehicles; every entry of
the certificate carries its inclusion proof in the log's checkpoint. ``odo-verify CERT --log-key
KEY`` is then run as a process, as a buyer would, ``--rounds`` times (with ``--in-process``,
``protocol.certificate.verify`` in this process too, with the worker processes odo-verify starts
by default, which leaves out starting Python, reading the file and printing the report).

The baseline is the time the signatures of the records alone take: ``--records`` ÷ the raw
verify rate of the library odo-verify uses (:data:`protocol.identity.LIBRARY`), measured on the
certificate's own signatures in each round, beside that round's run. Figures are medians over
the rounds; ratios are time ÷ baseline (1.0: nothing but the signatures costs anything).
``--profile N`` prints the N functions in which ``protocol.certificate.verify`` spends most time
(in this process alone: its signatures are all checked here then).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from protocol import b64, canonical, identity, merkle, messages
from protocol import certificate as pc
from protocol.checkpoint import log_verifier, sign_note
from protocol.identity import SigningKey, VerifyKey
from sim.devices import T0, Dongle
from verifier.cli import Workers

ORIGIN = "bench.odoledger.example/log"
WEEK_MS = 7 * 24 * 3_600_000
ODO_VERIFY = Path(sys.executable).parent / "odo-verify"
GOAL = 1.2


class Certificate:
    """A certificate of one device's records, the log key that signed it, and the signatures."""

    def __init__(self, records: int, others: int) -> None:
        self.log_key = SigningKey.generate()
        device = Dongle()
        entries: list[bytes] = []
        mine: list[int] = []

        def add(entry: bytes, *, own: bool = True) -> None:
            if own:
                mine.append(len(entries))
            entries.append(entry)

        at = T0 - WEEK_MS
        add(canonical.dumps({"entry": "enrolment", "at": at,
                             "enrolment": messages.sign_enrollment(device.key, device.vin, at)}))
        add(canonical.dumps({"entry": "decision", "action": "approve", "dev": device.dev, "vin": device.vin,
                             "by": "operator:bench", "at": at + 1, "replaces": None}))
        self.signatures: list[tuple[bytes, bytes]] = []
        for i in range(records):
            record = device.trip(3, minutes=5) if i % 10 == 9 else device.odometer(1)
            add(record.jws.encode("ascii"))
            head, body, sig = record.jws.split(".")
            self.signatures.append((b64.decode(sig), f"{head}.{body}".encode("ascii")))
            for _ in range(others):
                add(b'{"entry":"transfer"}', own=False)
        self.device_key = device.key.public
        self.size = len(entries)
        mth = merkle.range_hashes([merkle.leaf_hash(e) for e in entries])
        checkpoint = sign_note(self.log_key, ORIGIN, self.size, mth(0, self.size))
        annotations = pc.sign_annotations(self.log_key, str(device.vin), T0 + records * 60_000, self.size,
                                          {}, [])
        chosen = [(i, entries[i], merkle.inclusion_path(mth, i, self.size)) for i in mine]
        self.data = pc.encode(pc.build(str(device.vin), ORIGIN, checkpoint.signed, chosen, annotations))
        self.vkey = log_verifier(ORIGIN, self.log_key.public).vkey


def _verify_alone(key: VerifyKey, signatures: list[tuple[bytes, bytes]]) -> float:
    """Seconds for the bare library call of :data:`protocol.identity.LIBRARY` on all of them."""
    if identity.LIBRARY == "libsodium":
        from nacl.bindings import crypto_sign_open

        signed = [signature + data for signature, data in signatures]
        start = time.perf_counter()
        for sm in signed:
            crypto_sign_open(sm, key.raw)
        return time.perf_counter() - start
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    public = Ed25519PublicKey.from_public_bytes(key.raw)
    start = time.perf_counter()
    for signature, data in signatures:
        public.verify(signature, data)
    return time.perf_counter() - start


def _odo_verify(cert: Path, key: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([str(ODO_VERIFY), str(cert), "--log-key", str(key)], capture_output=True, text=True,
                          timeout=3600, check=False)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"odo-verify failed ({done.returncode}): {done.stdout}{done.stderr}")
    return took


def _in_process(c: Certificate) -> float:
    jobs = os.cpu_count() or 1                  # as odo-verify's default --jobs
    workers = Workers(jobs - 1) if jobs > 1 else None
    start = time.perf_counter()
    try:
        proven = pc.verify(c.data, log_verifier(ORIGIN, c.log_key.public), executor=workers)
    finally:
        if workers is not None:
            workers.shutdown()
    took = time.perf_counter() - start
    assert len(proven.records) == len(c.signatures)
    return took


def _profile(c: Certificate, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(pc.verify, c.data, log_verifier(ORIGIN, c.log_key.public))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print(f"\nprotocol.certificate.verify under cProfile, the {top} functions of most own time:")
    print("\n".join(line for line in lines[start - 2:] if line.strip()))


def _row(name: str, ours: list[float], base_name: str, base: list[float]) -> None:
    ratios = [o / b for o, b in zip(ours, base, strict=True)]
    figure, floor = statistics.median(ours), statistics.median(base)
    print(f"{name:<44}{figure:>7.2f} s   {base_name} {floor:.2f} s".ljust(100)
          + f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.certificate",
                                 description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--others", type=int, default=1, help="entries of other vehicles after each record")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--in-process", action="store_true", help="also time protocol.certificate.verify here")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print cProfile's top N functions")
    args = ap.parse_args()
    if not 1 <= args.records <= 1_000_000 or not 0 <= args.others <= 100 or not 1 <= args.rounds <= 100:
        ap.error("--records 1..10^6, --others 0..100, --rounds 1..100")
    if not 0 <= args.profile <= 200:
        ap.error("--profile 0..200")
    start = time.perf_counter()
    c = Certificate(args.records, args.others)
    made = time.perf_counter() - start
    print(f"a certificate of {args.records} records in a log of {c.size} entries, {len(c.data) / 2**20:.1f} "
          f"MiB (made in {made:.0f} s); odo-verify with {identity.LIBRARY}; {args.rounds} rounds; Python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs")
    n = args.records
    odo: list[float] = []
    inproc: list[float] = []
    alone: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "cert.json", Path(tmp) / "log.vkey"
        cert.write_bytes(c.data)
        key.write_text(c.vkey + "\n")
        for r in range(args.rounds):
            # the baseline beside each run, before it in one round and after it in the next
            steps: list[Callable[[], None]] = [
                lambda: alone.append(_verify_alone(c.device_key, c.signatures)),
                lambda: odo.append(_odo_verify(cert, key)),
            ]
            if args.in_process:
                steps.append(lambda: inproc.append(_in_process(c)))
            for step in steps if r % 2 == 0 else steps[::-1]:
                step()
    print(f"{'operation':<44}{'ours':>9}   baseline".ljust(100) + "ratio (lowest–highest)")
    base = f"{n} ÷ {identity.LIBRARY} verify alone"
    _row(f"odo-verify, {n} records (a process)", odo, base, alone)
    if args.in_process:
        _row("protocol.certificate.verify (in process)", inproc, base, alone)
    rate, records = n / statistics.median(alone), n / statistics.median(odo)
    print(f"(goal: odo-verify ≤ {GOAL} × baseline; verify alone {rate / 1000:.1f}k/s, odo-verify "
          f"{records / 1000:.1f}k records/s)")
    if args.profile:
        _profile(c, args.profile)


if __name__ == "__main__":
    main()
