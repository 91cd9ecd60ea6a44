"""``odo-verify --log URL``: check a certificate against the log as it is now (docs/certificate.md).

It fetches ``URL/checkpoint`` (verified with the same keys as the certificate's), proves the
certificate's checkpoint consistent with it from the log's tiles (c2sp.org/tlog-tiles), and
reads every entry logged since, proving them the log's by rebuilding the new root from them,
to say whether the log holds newer records or decisions about the vehicle.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from protocol import canonical, merkle, messages, note, records, tiles
from protocol.checkpoint import NoteCheckpoint, open_note
from protocol.errors import BadFormat, BadSignature, ProtocolError
from protocol.identity import VerifyKey

TIMEOUT_S = 20.0
MAX_CHECKPOINT_BYTES = 64 * 1024
#: Entries read after the certificate's checkpoint, at most (a log's weeks, not its years).
MAX_SCAN_ENTRIES = 5_000_000


class OnlineError(ProtocolError):
    """The log could not be read, or what it serves does not agree with the certificate."""


@dataclass(frozen=True)
class Later:
    """What the log holds about the vehicle after the certificate's checkpoint."""

    checkpoint: NoteCheckpoint
    records: tuple[str, ...]          # one line each: records about the VIN
    decisions: tuple[str, ...]        # decisions and enrolments about its devices or the VIN
    scanned: int


def _get(url: str, limit: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 - the buyer's URL
            data: bytes = response.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise OnlineError(f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise OnlineError(f"{url}: cannot fetch it ({getattr(exc, 'reason', exc)})") from None
    if len(data) > limit:
        raise OnlineError(f"{url}: more than {limit} bytes")
    return data


def check(base: str, certified: NoteCheckpoint, log: note.Verifier, witnesses: Sequence[note.Verifier],
          quorum: int, vin: str, keys: Mapping[str, VerifyKey]) -> Later:
    """Check the log at ``base`` against the certificate's checkpoint ``certified``; the log's
    checkpoint now needs ``quorum`` cosignatures as well."""
    base = base.rstrip("/")
    try:
        current = open_note(_get(f"{base}/checkpoint", MAX_CHECKPOINT_BYTES), log, witnesses, quorum)
    except (BadFormat, BadSignature) as exc:
        raise OnlineError(f"{base}/checkpoint: {exc}") from None
    if current.size < certified.size:
        raise OnlineError(f"the log now has {current.size} entries, fewer than the certificate's checkpoint "
                          f"({certified.size}): it has shown two histories")

    def fetch(level: int, n: int, width: int) -> bytes:
        return _get(f"{base}/{tiles.path(level, n, None if width == tiles.WIDTH else width)}",
                    tiles.WIDTH * tiles.HASH_SIZE)

    tree = tiles.TileTree(current.size, fetch)
    try:
        proof = tree.consistency_proof(certified.size) if certified.size < current.size else []
    except BadFormat as exc:
        raise OnlineError(f"{base}: a tile is malformed ({exc})") from None
    if not merkle.verify_consistency(certified.size, current.size, certified.root, current.root, proof):
        raise OnlineError(f"the log's checkpoint of {current.size} entries is not consistent with the "
                          f"certificate's of {certified.size}: the log has shown two histories")
    if current.size - certified.size > MAX_SCAN_ENTRIES:
        return Later(current, (), (), 0)
    entries = _entries(base, certified.size, current.size)
    if tiles.root_with_leaves(tree, certified.size, [merkle.leaf_hash(e) for e in entries]) != current.root:
        raise OnlineError(f"{base}: the entries it serves after {certified.size} are not the ones its "
                          "checkpoint commits to")
    recs, decisions = _about(entries, certified.size, vin, keys)
    return Later(current, tuple(recs), tuple(decisions), len(entries))


def _entries(base: str, first: int, size: int) -> list[bytes]:
    out: list[bytes] = []
    for n in range(first // tiles.WIDTH, -(-size // tiles.WIDTH)):
        width = min(tiles.WIDTH, size - n * tiles.WIDTH)
        url = f"{base}/{tiles.path(None, n, None if width == tiles.WIDTH else width)}"
        data = _get(url, width * (2 + tiles.MAX_ENTRY_BYTES))
        try:
            bundle = tiles.decode_bundle(data, width)
        except BadFormat as exc:
            raise OnlineError(f"{url}: {exc}") from None
        start = n * tiles.WIDTH
        out.extend(e for i, e in enumerate(bundle, start) if i >= first)
    return out


def _about(entries: Sequence[bytes], first: int, vin: str, keys: Mapping[str, VerifyKey]
           ) -> tuple[list[str], list[str]]:
    recs: list[str] = []
    decisions: list[str] = []
    devices = set(keys)
    for index, entry in enumerate(entries, first):
        try:
            if entry.startswith(b"{"):
                obj = canonical.loads_object(entry, f"entry {index}")
                kind = obj.get("entry")
                if kind == "decision" and (obj.get("vin") == vin or obj.get("dev") in devices):
                    decisions.append(f"entry {index}: {obj.get('action')} of device {obj.get('dev')} "
                                     f"(VIN {obj.get('vin')}) by {obj.get('by')}")
                    devices.add(str(obj.get("dev")))
                elif kind == "enrolment" and isinstance(obj.get("enrolment"), str):
                    e = messages.verify_enrollment(obj["enrolment"])
                    if e.vin == vin or e.dev in devices:
                        decisions.append(f"entry {index}: enrolment of device {e.dev} (VIN {e.vin})")
                        devices.add(e.dev)
                continue
            parts = records.open_unverified(entry)
            payload = canonical.loads_object(parts.payload, f"entry {index}")
        except (BadFormat, BadSignature):
            continue
        if payload.get("vin") != vin:
            continue
        key = keys.get(parts.kid)
        how = "signed by a device the certificate does not hold"
        if key is not None:
            try:
                records.verify(parts, key)
                how = "signature verified"
            except (BadFormat, BadSignature):
                how = "its signature does NOT verify"
        odo = payload.get("end_odo_m", payload.get("odo_m"))
        recs.append(f"entry {index}: {payload.get('kind')} seq {payload.get('seq')} of device {parts.kid}"
                    + (f", odometer {odo} m" if isinstance(odo, int) else "") + f" ({how})")
    return recs, decisions
