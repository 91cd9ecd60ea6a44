"""C2SP tlog-tiles: paths, tile and bundle encodings, and a tree rebuilt from tiles."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import merkle, tiles
from protocol.errors import BadFormat

# --- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "text"), [
    (0, "000"), (5, "005"), (999, "999"), (1000, "x001/000"), (1234067, "x001/x234/067"),
    (10**9, "x001/x000/x000/000"),
])
def test_encode_index(n: int, text: str) -> None:
    assert tiles.encode_index(n) == text


def test_paths() -> None:
    assert tiles.path(0, 1234067) == "tile/0/x001/x234/067"
    assert tiles.path(0, 1234067, 8) == "tile/0/x001/x234/067.p/8"
    assert tiles.path(None, 1234067) == "tile/entries/x001/x234/067"
    assert tiles.path(None, 5, 255) == "tile/entries/005.p/255"
    assert tiles.path(63, 0, 1) == "tile/63/000.p/1"
    assert tiles.parse_path("tile/0/x001/x234/067.p/8") == (0, 1234067, 8)
    assert tiles.parse_path("tile/entries/x001/x234/067") == (None, 1234067, None)
    assert tiles.parse_path("tile/12/000") == (12, 0, None)


@pytest.mark.parametrize(("level", "n", "width"), [
    (-1, 0, None), (64, 0, None), (0, 0, 0), (0, 0, 256), (None, 0, 256), (0, -1, None),
])
def test_path_refuses(level: int | None, n: int, width: int | None) -> None:
    with pytest.raises(ValueError):
        tiles.path(level, n, width)


@pytest.mark.parametrize("p", [
    "", "tile/0/5", "tile/0/05", "tile/0/0005", "tile/00/005", "tile/01/005", "tile/64/005",
    "tile/100/005", "tile/-1/005", "tile/0/x000/005", "tile/0/x000/x001/005", "tile/0/x005",
    "tile/0/005/", "/tile/0/005", "tile/0/005.p/0", "tile/0/005.p/256", "tile/0/005.p/08",
    "tile/0/005.p/", "tile/0/005.p/1000", "tile/entries/005.p/", "tile/entry/005",
    "tile/0/x001x234/067", "tile/0/x001/x234/067\n", "tile/0/\u0660\u0660\u0665", "tile/0/X001/000",
    "tile/0/" + "x001/" * 50 + "001",
])
def test_parse_path_refuses(p: str) -> None:
    with pytest.raises(BadFormat):
        tiles.parse_path(p)


@given(st.one_of(st.none(), st.integers(0, 63)), st.integers(0, 10**15),
       st.one_of(st.none(), st.integers(1, 255)))
def test_path_round_trip(level: int | None, n: int, width: int | None) -> None:
    assert tiles.parse_path(tiles.path(level, n, width)) == (level, n, width)


# --- widths ------------------------------------------------------------------------------------


def test_widths_of_spec_example_70000() -> None:
    size = 70_000
    assert all(tiles.width_at(size, 0, n) == 256 for n in range(273))
    assert tiles.width_at(size, 0, 273) == 112
    assert tiles.width_at(size, 0, 274) is None
    assert tiles.width_at(size, 1, 0) == 256
    assert tiles.width_at(size, 1, 1) == 17
    assert tiles.width_at(size, 1, 2) is None
    assert tiles.width_at(size, 2, 0) == 1
    assert tiles.width_at(size, 2, 1) is None
    assert tiles.width_at(size, 3, 0) is None


def test_widths_of_256_leaves() -> None:
    assert tiles.width_at(256, 0, 0) == 256
    assert tiles.width_at(256, 0, 1) is None
    assert tiles.width_at(256, 1, 0) == 1
    assert tiles.width_at(256, 2, 0) is None
    assert tiles.width_at(0, 0, 0) is None
    assert tiles.width_at(1, 0, 0) == 1


# --- tile and bundle encodings -----------------------------------------------------------------


def test_tile_hashes() -> None:
    hs = [bytes([i]) * 32 for i in range(3)]
    assert tiles.tile_hashes(b"".join(hs), 3) == hs
    for bad in (b"", b"".join(hs)[:-1], b"".join(hs) + b"\0"):
        with pytest.raises(BadFormat):
            tiles.tile_hashes(bad, 3)


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=256))
def test_bundle_round_trip(entries: list[bytes]) -> None:
    assert tiles.decode_bundle(tiles.encode_bundle(entries), len(entries)) == entries


def test_bundle_limits_and_refusals() -> None:
    big = b"a" * 65535
    assert tiles.decode_bundle(tiles.encode_bundle([big, b""]), 2) == [big, b""]
    with pytest.raises(ValueError):
        tiles.encode_bundle([b"a" * 65536])
    good = tiles.encode_bundle([b"abc", b"de"])
    assert good == b"\x00\x03abc\x00\x02de"
    for data, width in [
        (good[:-1], 2),          # truncated entry
        (good[:6], 2),           # truncated length prefix
        (good[:5], 2),           # one entry only
        (good + b"\x00", 2),     # trailing byte
        (good, 1),               # count not the width
        (good, 3),
        (b"", 1),
    ]:
        with pytest.raises(BadFormat):
            tiles.decode_bundle(data, width)


# --- a tree rebuilt from tiles -----------------------------------------------------------------


def leaves_of(size: int, seed: int = 0) -> list[bytes]:
    return [merkle.leaf_hash(hashlib.sha256(b"%d/%d" % (seed, i)).digest()) for i in range(size)]


def levels_of(leaves: list[bytes]) -> list[list[bytes]]:
    """Tile-level hashes: level L+1 hash j is the perfect root of level-L hashes 256j..256j+255."""
    levels = [list(leaves)]
    while len(levels[-1]) >= 256:
        below = levels[-1]
        levels.append([merkle.root(below[256 * j:256 * j + 256]) for j in range(len(below) // 256)])
    return levels


class Server:
    """Serves tiles of a tree of ``size`` leaves; ``tamper`` flips one byte of one tile."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.size = len(leaves)
        self.levels = levels_of(leaves)
        self.calls: list[tuple[int, int, int]] = []
        self.tamper: tuple[int, int, int] | None = None  # (level, n, byte offset)

    def fetch(self, level: int, n: int, width: int) -> bytes:
        assert width == tiles.width_at(self.size, level, n)
        self.calls.append((level, n, width))
        data = bytearray(b"".join(self.levels[level][256 * n:256 * n + width]))
        if self.tamper is not None and self.tamper[:2] == (level, n):
            data[self.tamper[2]] ^= 0x01
        return bytes(data)


class RecordingTree(tiles.TileTree):
    """Records which hashes were read, so a test can forge one that matters."""

    def __init__(self, server: Server) -> None:
        super().__init__(server.size, server.fetch)
        self.read: set[tuple[int, int]] = set()

    def hash(self, level: int, index: int) -> bytes:
        self.read.add((level, index))
        return super().hash(level, index)


def forge_one(server: Server, read: set[tuple[int, int]], rng: random.Random) -> None:
    level, index = rng.choice(sorted(read))
    server.tamper = (level, index // 256, 32 * (index % 256) + rng.randrange(32))


def check_tree(leaves: list[bytes], rng: random.Random, checks: int) -> None:
    size = len(leaves)
    server = Server(leaves)
    want = merkle.root(leaves)
    tree = RecordingTree(server)
    assert tree.root() == want
    assert len(server.calls) == len(set(server.calls))  # each tile fetched once

    for index in {0, size - 1, *(rng.randrange(size) for _ in range(checks))}:
        proof = tree.inclusion_proof(index)
        assert tree.leaf_hash(index) == leaves[index]
        assert merkle.root_from_inclusion(index, size, leaves[index], proof) == want

    for old in {1, size, *(rng.randint(1, size) for _ in range(checks))}:
        old_root = merkle.root(leaves[:old])
        assert tree.mth(0, old) == old_root
        proof = tree.consistency_proof(old)
        assert merkle.verify_consistency(old, size, old_root, want, proof)
    assert len(server.calls) == len(set(server.calls))


def check_forgeries(leaves: list[bytes], rng: random.Random) -> None:
    size = len(leaves)
    want = merkle.root(leaves)
    server = Server(leaves)

    probe = RecordingTree(server)
    probe.root()
    forge_one(server, probe.read, rng)
    assert tiles.TileTree(size, server.fetch).root() != want

    server.tamper = None
    index = rng.randrange(size)
    probe = RecordingTree(server)
    probe.inclusion_proof(index)
    if probe.read:  # a one-leaf tree has an empty proof
        forge_one(server, probe.read, rng)
        proof = tiles.TileTree(size, server.fetch).inclusion_proof(index)
        assert merkle.root_from_inclusion(index, size, leaves[index], proof) != want

    if size > 1:
        server.tamper = None
        old = rng.randrange(1, size)
        probe = RecordingTree(server)
        probe.consistency_proof(old)
        forge_one(server, probe.read, rng)
        proof = tiles.TileTree(size, server.fetch).consistency_proof(old)
        assert not merkle.verify_consistency(old, size, merkle.root(leaves[:old]), want, proof)


@pytest.mark.parametrize("size", [1, 2, 255, 256, 257, 65535, 65536, 70_000])
def test_tree_from_tiles(size: int) -> None:
    leaves = leaves_of(size, seed=size)
    rng = random.Random(size)
    check_tree(leaves, rng, checks=10)
    check_forgeries(leaves, rng)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3000), st.randoms(use_true_random=False))
def test_tree_from_tiles_random(size: int, rng: random.Random) -> None:
    leaves = leaves_of(size)
    check_tree(leaves, rng, checks=3)
    check_forgeries(leaves, rng)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 1500), st.data())
def test_proofs_equal_merkle(size: int, data: st.DataObject) -> None:
    leaves = leaves_of(size)
    tree = tiles.TileTree(size, Server(leaves).fetch)
    index = data.draw(st.integers(0, size - 1))
    old = data.draw(st.integers(1, size))
    start = data.draw(st.integers(0, size))
    end = data.draw(st.integers(start, size))
    assert tree.inclusion_proof(index) == merkle.inclusion_proof(index, leaves)
    assert tree.consistency_proof(old) == merkle.consistency_proof(old, leaves)
    assert tree.mth(start, end) == merkle.root(leaves[start:end])


def test_empty_tree_and_bounds() -> None:
    tree = tiles.TileTree(0, Server([]).fetch)
    assert tree.root() == merkle.EMPTY_ROOT
    tree = tiles.TileTree(300, Server(leaves_of(300)).fetch)
    for bad in (lambda: tree.hash(0, 300), lambda: tree.hash(1, 1), lambda: tree.hash(2, 0),
                lambda: tree.inclusion_proof(300), lambda: tree.consistency_proof(0),
                lambda: tree.consistency_proof(301), lambda: tree.mth(5, 301)):
        with pytest.raises(ValueError):
            bad()


def test_wrong_length_tile_is_refused() -> None:
    server = Server(leaves_of(300))
    tree = tiles.TileTree(300, lambda level, n, width: server.fetch(level, n, width)[:-1])
    with pytest.raises(BadFormat):
        tree.root()
    tree = tiles.TileTree(300, lambda level, n, width: server.fetch(level, n, width) + b"\0" * 32)
    with pytest.raises(BadFormat):
        tree.leaf_hash(0)
