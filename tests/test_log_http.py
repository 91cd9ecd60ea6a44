"""The public log under /log: checkpoints as C2SP notes and tlog-tiles, from the database, with
no token; a client that knows only those paths and RFC 6962 rebuilds every root and proof."""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator

import pytest

from backend.db import Database
from backend.errors import TranslogError
from backend.transparency import translog
from backend.web.app import create_app
from backend.web.context import AppContext
from protocol import merkle, tiles
from protocol.checkpoint import NoteCheckpoint, open_note

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

TOKEN = "api-token-for-the-log-tests"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(db: Database, clock: Clock) -> Iterator[TestClient]:
    with TestClient(create_app(AppContext(db=db, api_token=TOKEN, clock=clock))) as c:
        yield c


def _grow(db: Database, entries: list[bytes], to: int, rng: random.Random) -> None:
    with db.write() as tx:
        while len(entries) < to:
            data = rng.randbytes(rng.randrange(1, 300))
            entries.append(data)
            translog.append(tx, "record", f"r{len(entries)}", data)
    translog.integrate_all(db)


def _checkpoint(db: Database, client: TestClient, clock: Clock) -> NoteCheckpoint:
    clock.now += 5_000            # past the interval between two checkpoints
    r = client.get("/log/checkpoint")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert "no-cache" in r.headers["cache-control"]
    return open_note(r.content, translog.verifier(db))


def _tree(client: TestClient, size: int) -> tiles.TileTree:
    def fetch(level: int, n: int, width: int) -> bytes:
        r = client.get("/log/" + tiles.path(level, n, None if width == tiles.WIDTH else width))
        assert r.status_code == 200, (level, n, width, r.text)
        return r.content

    return tiles.TileTree(size, fetch)


def test_a_client_rebuilds_every_root_and_proof_from_the_tiles(db: Database, client: TestClient,
                                                                 clock: Clock) -> None:
    rng = random.Random(9)
    entries: list[bytes] = []
    old: NoteCheckpoint | None = None
    for size in (0, 1, 2, 3, 255, 256, 257, 511, 512, 700, 65 * 256 + 3):
        _grow(db, entries, size, rng)
        cp = _checkpoint(db, client, clock)
        assert cp.size == size
        tree = _tree(client, size)
        assert tree.root() == cp.root == merkle.root([merkle.leaf_hash(e) for e in entries])
        for i in rng.sample(range(size), min(size, 5)):
            proof = tree.inclusion_proof(i)
            assert merkle.root_from_inclusion(i, size, merkle.leaf_hash(entries[i]), proof) == cp.root
        if old is not None and old.size > 0:
            proof = tree.consistency_proof(old.size) if old.size < size else []
            assert merkle.verify_consistency(old.size, size, old.root, cp.root, proof)
        # entry bundles hold the entries, verbatim
        for n in range(0, -(-size // tiles.WIDTH), max(1, size // tiles.WIDTH // 3 or 1)):
            width = tiles.width_at(size, 0, n)
            assert width is not None
            r = client.get("/log/" + tiles.path(None, n, None if width == tiles.WIDTH else width))
            assert r.status_code == 200
            assert tiles.decode_bundle(r.content, width) == entries[n * tiles.WIDTH:n * tiles.WIDTH + width]
        old = cp


def test_tiles_are_cacheable_and_only_within_the_latest_checkpoint(db: Database, client: TestClient,
                                                                   clock: Clock) -> None:
    rng = random.Random(2)
    entries: list[bytes] = []
    _grow(db, entries, 300, rng)
    assert client.get("/log/tile/0/000").status_code == 404        # no checkpoint yet
    _checkpoint(db, client, clock)
    full = client.get("/log/tile/0/000")
    assert full.status_code == 200 and len(full.content) == 256 * 32
    assert full.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert full.headers["content-type"] == "application/octet-stream"
    partial = client.get("/log/tile/0/001.p/44")
    assert partial.status_code == 200 and len(partial.content) == 44 * 32
    assert "immutable" not in partial.headers["cache-control"]
    assert client.get("/log/tile/entries/001.p/44").status_code == 200
    # beyond the checkpoint: entries appended since are not served until a checkpoint covers them
    _grow(db, entries, 600, rng)
    for path in ("tile/0/001", "tile/0/002.p/1", "tile/entries/001", "tile/1/000", "tile/0/001.p/45"):
        r = client.get("/log/" + path)
        assert r.status_code == 404, path
        assert "beyond the latest checkpoint" in r.text
    # malformed paths name what is wrong
    for path in ("tile/0/1", "tile/0/x000/000", "tile/0/000.p/0", "tile/0/000.p/256", "tile/-1/000",
                 "tile/entries/000.p/00", "tile/0/000/", "tile/a/000", "tile/0/0000"):
        r = client.get("/log/" + path)
        assert r.status_code == 404, path
        assert "no such tile" in r.text, path
    assert client.post("/log/checkpoint").status_code == 405


def test_the_log_needs_no_token_but_the_api_still_does(db: Database, client: TestClient,
                                                        clock: Clock) -> None:
    _grow(db, [], 3, random.Random(1))
    assert client.get("/log/checkpoint").status_code == 200
    assert client.get("/api/checkpoint").status_code == 401
    body = client.get("/api/checkpoint", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert body["size"] == 3 and body["note"].startswith(body["origin"] + "\n3\n")


def test_a_public_request_signs_at_most_one_checkpoint_a_second(db: Database, client: TestClient,
                                                                 clock: Clock) -> None:
    rng = random.Random(3)
    entries: list[bytes] = []
    _grow(db, entries, 5, rng)
    first = _checkpoint(db, client, clock)
    _grow(db, entries, 9, rng)
    clock.now += 10
    again = open_note(client.get("/log/checkpoint").content, translog.verifier(db))
    assert again.size == first.size == 5
    assert _checkpoint(db, client, clock).size == 9


def test_the_origin_is_fixed_when_the_log_begins(db: Database) -> None:
    assert translog.origin(db, "odo.example.net/log") == "odo.example.net/log"
    assert translog.origin(db) == "odo.example.net/log"
    with pytest.raises(TranslogError, match="origin is odo.example.net/log"):
        translog.origin(db, "other.example/log")
    cp = translog.checkpoint(db, 1)
    assert cp["note"].startswith("odo.example.net/log\n0\n")
    assert translog.verifier(db).vkey.startswith("odo.example.net/log+")
    for bad in ("has space", "a+b", "", "x" * 256, "tab\there"):
        with pytest.raises(ValueError, match="cannot name a log"):
            translog.check_origin(bad)


def test_a_default_origin_is_made_from_the_log_key(db: Database) -> None:
    name = translog.origin(db)
    assert name == translog.DEFAULT_ORIGIN_PREFIX + translog.verifier(db).public.id[:16]


def test_an_entry_larger_than_a_bundle_holds_is_refused(db: Database) -> None:
    with pytest.raises(TranslogError, match="more than a log entry holds"), db.write() as tx:
        translog.append(tx, "record", "big", b"x" * 65536)
    with db.read() as tx:
        assert translog.size(tx) == 0
