"""Ed25519 verify: PyNaCl (libsodium) beside ``cryptography`` (OpenSSL), on the same signatures.

    .venv/bin/python -m bench.verify [--devices 4] [--signatures 4000] [--rounds 9]

The signatures are those of real records (a trip every tenth, the rest odometer readings), made
once; each round runs every candidate over all of them, in an order that turns from round to
round, so that a busy CPU slows every candidate alike. Figures are the median over the rounds of
verifications per second; each ratio is the median of the rounds' own ratios (ours ÷ baseline of
the same round), its lowest and highest in brackets. Candidates: the bare library calls (a key
object made once per device), and :meth:`protocol.identity.VerifyKey.verify` with each library,
which adds the checks that make both libraries agree (:func:`protocol.identity.acceptable`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata

from cryptography.hazmat.backends.openssl import backend as openssl
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol import b64, identity
from protocol.identity import VerifyKey
from sim.devices import Dongle

Work = list[tuple[bytes, bytes, bytes]]          # (raw public key, signature, signed bytes)
Candidate = Callable[[], int]                     # verifies everything once; returns how many


def _work(devices: int, signatures: int) -> Work:
    out: Work = []
    per = max(1, signatures // devices)
    for _ in range(devices):
        d = Dongle()
        for i in range(per):
            r = d.trip(3, minutes=5) if i % 10 == 9 else d.odometer(1)
            head, body, sig = r.jws.split(".")
            out.append((d.key.public.raw, b64.decode(sig), f"{head}.{body}".encode()))
    return out


def _candidates(work: Work) -> dict[str, Candidate]:
    keys = {raw: Ed25519PublicKey.from_public_bytes(raw) for raw, _, _ in work}
    ours = {raw: VerifyKey(raw) for raw, _, _ in work}

    def cryptography_alone() -> int:
        for raw, signature, data in work:
            keys[raw].verify(signature, data)
        return len(work)

    def protocol_with(library: str) -> Candidate:
        verify = identity.LIBRARIES[library]

        def run() -> int:
            # what VerifyKey.verify does, with the library named rather than the default one
            for raw, signature, data in work:
                if not (identity.acceptable(raw, signature) and verify(raw, signature, data)):
                    raise SystemExit(f"{library} refused a good signature")
            return len(work)
        return run

    out = {"cryptography verify": cryptography_alone}
    if "libsodium" in identity.LIBRARIES:
        import nacl.bindings
        import nacl.signing

        nacl_keys = {raw: nacl.signing.VerifyKey(raw) for raw, _, _ in work}
        signed = [(raw, signature + data) for raw, signature, data in work]

        def open_alone() -> int:
            open_ = nacl.bindings.crypto_sign_open
            for raw, sm in signed:
                open_(sm, raw)
            return len(signed)

        def verify_key_alone() -> int:
            for raw, signature, data in work:
                nacl_keys[raw].verify(data, signature)
            return len(work)

        out |= {"crypto_sign_open": open_alone, "nacl.signing.VerifyKey.verify": verify_key_alone,
                "protocol, libsodium": protocol_with("libsodium")}

    def verify_key_default() -> int:
        for raw, signature, data in work:
            ours[raw].verify(signature, data)
        return len(work)

    out |= {"protocol, cryptography": protocol_with("cryptography"),
            f"VerifyKey.verify ({identity.LIBRARY})": verify_key_default}
    return out


def _rounds(candidates: dict[str, Candidate], rounds: int) -> dict[str, list[float]]:
    """Verifications per second of each candidate in each round, the order turning each round."""
    names = list(candidates)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            n = candidates[name]()
            rates[name].append(n / (time.perf_counter() - start))
    return rates


#: (row label, candidate, baseline candidate, baseline label)
_ROWS = [
    ("PyNaCl crypto_sign_open", "crypto_sign_open", "cryptography verify", "cryptography verify"),
    ("PyNaCl VerifyKey.verify", "nacl.signing.VerifyKey.verify", "cryptography verify",
     "cryptography verify"),
    ("protocol verify, libsodium", "protocol, libsodium", "crypto_sign_open", "crypto_sign_open alone"),
    ("protocol verify, cryptography", "protocol, cryptography", "cryptography verify",
     "cryptography verify"),
]


def _row(name: str, ours: list[float], base_name: str, base: list[float]) -> None:
    ratios = [o / b for o, b in zip(ours, base, strict=True)]
    figure, floor = statistics.median(ours), statistics.median(base)
    print(f"{name:<45}{figure / 1000:>6.1f}k/s   {base_name} {floor / 1000:.1f}k/s".ljust(99)
          + f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.verify", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--devices", type=int, default=4, help="keys the signatures are spread over")
    ap.add_argument("--signatures", type=int, default=4000, help="in all; each round verifies them all")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if not 1 <= args.devices <= 1000 or not 1 <= args.signatures <= 10**6 or not 1 <= args.rounds <= 1000:
        ap.error("--devices 1..1000, --signatures 1..10^6, --rounds 1..1000")
    nacl = (f"PyNaCl {metadata.version('pynacl')} (its own libsodium)" if "libsodium" in identity.LIBRARIES
            else "no PyNaCl")
    work = _work(args.devices, args.signatures)
    sizes = sorted(len(d) for _, _, d in work)
    print(f"{len(work)} signatures by {args.devices} keys, messages of {sizes[0]}–{sizes[-1]} bytes "
          f"(median {sizes[len(sizes) // 2]}), {args.rounds} rounds; cryptography "
          f"{metadata.version('cryptography')} ({openssl.openssl_version_text()}), {nacl}; Python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs; VerifyKey.verify uses {identity.LIBRARY}")
    rates = _rounds(_candidates(work), args.rounds)
    print(f"{'operation':<45}{'ours':>10}   baseline".ljust(99) + "ratio (lowest–highest)")
    for label, name, base, base_label in _ROWS:
        if name in rates:
            _row(label, rates[name], base_label, rates[base])
    default = f"VerifyKey.verify ({identity.LIBRARY})"
    floor = "crypto_sign_open" if identity.LIBRARY == "libsodium" else "cryptography verify"
    _row(f"{default}, a key each", rates[default], f"{floor} alone", rates[floor])


if __name__ == "__main__":
    main()
