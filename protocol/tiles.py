"""The tiled transparency-log format of C2SP tlog-tiles (https://c2sp.org/tlog-tiles).

A log of ``size`` leaves publishes its Merkle tree (RFC 6962 hashing, see :mod:`protocol.merkle`)
as static *tiles*: a tile at level ``L`` holds up to 256 consecutive hashes of tree level ``8*L``,
so hash ``i`` of tile level ``L`` is the MTH of leaves ``[i*256**L, (i+1)*256**L)``. Paths:

* ``tile/<L>/<N>`` -- a full tile (256 hashes, 32 bytes each) at level ``L`` (0..63);
* ``tile/<L>/<N>.p/<W>`` -- the rightmost, partial tile of ``W`` hashes (1..255);
* ``tile/entries/<N>[.p/<W>]`` -- the entry bundle matching level-0 tile ``N``: each entry is a
  big-endian uint16 length followed by that many bytes.

``<N>`` is written in 3-digit elements, all but the last prefixed ``x`` (1234067 ->
``x001/x234/067``); ``<L>`` and ``<W>`` are decimal without leading zeros.

:class:`TileTree` rebuilds roots and RFC 6962 proofs from tiles alone. Tiles are unauthenticated:
what it returns must be checked against a signed root (:func:`protocol.merkle.root_from_inclusion`,
:func:`protocol.merkle.verify_consistency`); a forged tile makes that check fail.

Pure code: no I/O; fetching is the caller's ``fetch`` function.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from protocol import merkle
from protocol.errors import BadFormat

HEIGHT = 8
WIDTH = 256  # == 2**HEIGHT
HASH_SIZE = 32
MAX_ENTRY_BYTES = 65535
MAX_LEVEL = 63
MAX_PATH_CHARS = 200

_PATH = re.compile(
    r"tile/(?:(entries)|(0|[1-9][0-9]?))/((?:x[0-9]{3}/)*[0-9]{3})(?:\.p/([1-9][0-9]{0,2}))?"
)


def encode_index(n: int) -> str:
    """``n`` as 3-digit path elements, all but the last prefixed ``x``."""
    if n < 0:
        raise ValueError("tile index must not be negative")
    digits = str(n)
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i:i + 3] for i in range(0, len(digits), 3)]
    return "/".join([*("x" + g for g in groups[:-1]), groups[-1]])


def path(level: int | None, n: int, width: int | None = None) -> str:
    """The path of tile ``(level, n)``; ``level`` None names the entry bundle; ``width`` None is full."""
    if level is not None and not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"tile level must be in 0..{MAX_LEVEL}")
    if width is not None and not 1 <= width < WIDTH:
        raise ValueError(f"partial tile width must be in 1..{WIDTH - 1}")
    head = "tile/entries/" if level is None else f"tile/{level}/"
    tail = "" if width is None else f".p/{width}"
    return head + encode_index(n) + tail


def parse_path(p: str) -> tuple[int | None, int, int | None]:
    """``(level, n, width)`` of a tile path, the strict inverse of :func:`path`."""
    if len(p) > MAX_PATH_CHARS:
        raise BadFormat(f"tile path: longer than {MAX_PATH_CHARS} characters")
    m = _PATH.fullmatch(p)
    if m is None:
        raise BadFormat("tile path: not tile/<L>|entries/<N>[.p/<W>]")
    entries, level_s, index_s, width_s = m.groups()
    level = None if entries else int(level_s)
    if level is not None and level > MAX_LEVEL:
        raise BadFormat(f"tile path: level above {MAX_LEVEL}")
    n = int(index_s.replace("x", "").replace("/", ""))
    if encode_index(n) != index_s:
        raise BadFormat("tile path: index not in canonical form (leading zero element)")
    width = None if width_s is None else int(width_s)
    if width is not None and width >= WIDTH:
        raise BadFormat(f"tile path: partial width above {WIDTH - 1}")
    return level, n, width


def width_at(size: int, level: int, n: int) -> int | None:
    """Hashes in tile ``(level, n)`` of a tree of ``size`` leaves: 256, 1..255, or None if absent."""
    if size < 0 or level < 0 or n < 0:
        raise ValueError("size, level and index must not be negative")
    count = size >> (HEIGHT * level)
    full = count // WIDTH
    if n < full:
        return WIDTH
    if n == full and count % WIDTH:
        return count % WIDTH
    return None


def tile_hashes(data: bytes, width: int) -> list[bytes]:
    """Split a tile of ``width`` hashes; BadFormat unless it is exactly ``32*width`` bytes."""
    if not 1 <= width <= WIDTH:
        raise ValueError(f"tile width must be in 1..{WIDTH}")
    if len(data) != HASH_SIZE * width:
        raise BadFormat(f"tile: {len(data)} bytes, expected {HASH_SIZE * width} for width {width}")
    return [bytes(data[i:i + HASH_SIZE]) for i in range(0, len(data), HASH_SIZE)]


def encode_bundle(entries: Sequence[bytes]) -> bytes:
    """An entry bundle: each entry as a big-endian uint16 length and its bytes."""
    if len(entries) > WIDTH:
        raise ValueError(f"an entry bundle holds at most {WIDTH} entries")
    out = bytearray()
    for e in entries:
        if len(e) > MAX_ENTRY_BYTES:
            raise ValueError(f"entry of {len(e)} bytes exceeds {MAX_ENTRY_BYTES}")
        out += len(e).to_bytes(2, "big") + e
    return bytes(out)


def decode_bundle(data: bytes, width: int) -> list[bytes]:
    """The ``width`` entries of a bundle; BadFormat on truncation, trailing bytes or a wrong count."""
    if not 1 <= width <= WIDTH:
        raise ValueError(f"bundle width must be in 1..{WIDTH}")
    entries: list[bytes] = []
    pos = 0
    while len(entries) < width:
        if pos == len(data):
            raise BadFormat(f"entry bundle: {len(entries)} entries, expected {width}")
        if pos + 2 > len(data):
            raise BadFormat("entry bundle: truncated length prefix")
        n = int.from_bytes(data[pos:pos + 2], "big")
        pos += 2
        if pos + n > len(data):
            raise BadFormat("entry bundle: truncated entry")
        entries.append(bytes(data[pos:pos + n]))
        pos += n
    if pos != len(data):
        raise BadFormat(f"entry bundle: trailing bytes after {width} entries")
    return entries


def _perfect_root(hashes: Sequence[bytes]) -> bytes:
    """Root of a perfect tree whose bottom row is ``hashes`` (a power-of-two count)."""
    row = list(hashes)
    while len(row) > 1:
        row = [merkle.node_hash(row[i], row[i + 1]) for i in range(0, len(row), 2)]
    return row[0]


class TileTree:
    """A client's view of a tree of ``size`` leaves, built only from tiles.

    ``fetch(level, n, width)`` returns the bytes of tile ``(level, n)``, ``width`` being what
    :func:`width_at` says (256 for a full tile). Fetched tiles are cached. The results are what
    the tiles imply, not proven facts: check them against a signed root with
    :func:`protocol.merkle.root_from_inclusion` or :func:`protocol.merkle.verify_consistency`;
    a forged tile makes that check fail. A tile of the wrong length raises BadFormat.
    """

    def __init__(self, size: int, fetch: Callable[[int, int, int], bytes]) -> None:
        if size < 0:
            raise ValueError("tree size must not be negative")
        self.size = size
        self._fetch = fetch
        self._tiles: dict[tuple[int, int], list[bytes]] = {}

    def _tile(self, level: int, n: int) -> list[bytes]:
        key = (level, n)
        tile = self._tiles.get(key)
        if tile is None:
            width = width_at(self.size, level, n)
            if width is None:
                raise ValueError(f"tile {level}/{n} is not in a tree of {self.size} leaves")
            tile = tile_hashes(self._fetch(level, n, width), width)
            self._tiles[key] = tile
        return tile

    def hash(self, level: int, index: int) -> bytes:
        """Hash ``index`` of tile level ``level``: the MTH of leaves [index*256**L, (index+1)*256**L)."""
        if not 0 <= level <= MAX_LEVEL or not 0 <= index < self.size >> (HEIGHT * level):
            raise ValueError(f"hash {level}/{index} is not in a tree of {self.size} leaves")
        return self._tile(level, index // WIDTH)[index % WIDTH]

    def leaf_hash(self, index: int) -> bytes:
        return self.hash(0, index)

    def mth(self, start: int, end: int) -> bytes:
        """The MTH of leaves [start, end), as RFC 6962 defines it over that list."""
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"range [{start}, {end}) is not in a tree of {self.size} leaves")
        n = end - start
        if n == 0:
            return merkle.EMPTY_ROOT
        if n & (n - 1) == 0 and start % n == 0:
            h = n.bit_length() - 1
            level, r = divmod(h, HEIGHT)
            first = start >> (HEIGHT * level)
            return _perfect_root([self.hash(level, first + i) for i in range(1 << r)])
        k = merkle.split(n)
        return merkle.node_hash(self.mth(start, start + k), self.mth(start + k, end))

    def root(self) -> bytes:
        return self.mth(0, self.size)

    def inclusion_proof(self, index: int) -> list[bytes]:
        """PATH(index, D[size]) of RFC 6962 §2.1.1."""
        return merkle.inclusion_path(self.mth, index, self.size)

    def consistency_proof(self, old_size: int) -> list[bytes]:
        """PROOF(old_size, D[size]) of RFC 6962 §2.1.2."""
        return merkle.consistency_path(self.mth, old_size, self.size)


def root_with_leaves(tree: TileTree, first: int, leaf_hashes: Sequence[bytes]) -> bytes:
    """The root of ``tree`` computed with the leaf hashes of leaves [first, size) given, and only
    hashes of leaves before ``first`` taken from tiles: equal to a signed root, it proves that
    those leaves are the log's (each one, and all of them), in O(size - first) hashes."""
    if not 0 <= first <= tree.size or len(leaf_hashes) != tree.size - first:
        raise ValueError(f"leaf hashes of [{first}, {tree.size}) needed, {len(leaf_hashes)} given")

    def mth(start: int, end: int) -> bytes:
        if end <= first:
            return tree.mth(start, end)
        if start >= first:
            return merkle.root(leaf_hashes[start - first:end - first])
        k = merkle.split(end - start)
        return merkle.node_hash(mth(start, start + k), mth(start + k, end))

    return mth(0, tree.size)
