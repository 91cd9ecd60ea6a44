"""Ed25519 verify with libsodium (PyNaCl) and with cryptography (OpenSSL): the same answer to
every signature, whichever library checks it.

Both are run over the same vectors: RFC 8032's, the twelve edge cases of "Taming the many EdDSAs"
(Chalkias, Garillot, Nikolaenko, 2020; libsodium's test/default/sign2.c), signatures made here to
hit each rule (S not reduced, keys and R of small order, a key of mixed order, non-canonical
keys), and random signatures with random changes. A small Ed25519 in plain Python makes what no
library will sign.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import BadSignature, identity
from protocol.identity import SigningKey, VerifyKey

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("cryptography", "libsodium")

# -- Ed25519 by hand, to make signatures that no library makes --------------------------------

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
Point = tuple[int, int]
IDENTITY: Point = (0, 1)


def add(a: Point, b: Point) -> Point:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    return ((x1 * y2 + x2 * y1) * pow(1 + t, P - 2, P) % P,
            (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P)


def mul(k: int, a: Point) -> Point:
    out = IDENTITY
    while k:
        if k & 1:
            out = add(out, a)
        a, k = add(a, a), k >> 1
    return out


def x_of(y: int, sign: int) -> int | None:
    xx = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    x = pow(xx, (P + 3) // 8, P)
    if (x * x - xx) % P:
        x = x * SQRT_M1 % P
    if (x * x - xx) % P:
        return None
    return P - x if x & 1 != sign else x


def encode(a: Point) -> bytes:
    return (a[1] | (a[0] & 1) << 255).to_bytes(32, "little")


def decode(raw: bytes) -> Point:
    n = int.from_bytes(raw, "little")
    x = x_of(n & (2**255 - 1), n >> 255)
    assert x is not None
    return x, n & (2**255 - 1)


BASE: Point = (x_of(4 * pow(5, P - 2, P) % P, 0) or 0, 4 * pow(5, P - 2, P) % P)


def challenge(r: bytes, a: bytes, message: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r + a + message).digest(), "little") % L


def scalar(seed: bytes) -> int:
    """The secret scalar of an RFC 8032 private key."""
    h = int.from_bytes(hashlib.sha512(seed).digest()[:32], "little")
    return (h & (2**254 - 8)) | 2**254


def order_8_point() -> Point:
    """A point of order 8: [L] of a point of the whole group, found by trying y = 2, 3, ..."""
    for y in range(2, 1000):
        x = x_of(y, 0)
        if x is not None:
            t = mul(L, (x, y))
            if mul(4, t) != IDENTITY:
                return t
    raise AssertionError("no point of order 8 found")


def verdicts(public: bytes, signature: bytes, message: bytes) -> dict[str, bool]:
    return {lib: identity.verify_with(lib, public, signature, message) for lib in LIBRARIES}


def agree(public: bytes, signature: bytes, message: bytes) -> bool:
    """Both libraries' answer, which must be one."""
    got = verdicts(public, signature, message)
    assert len(set(got.values())) == 1, got
    return got["cryptography"]


# -- both libraries are there, and libsodium is the one used ----------------------------------

def test_both_libraries_are_installed_and_libsodium_is_used() -> None:
    # PyNaCl comes with the backend extra; the suite runs in a venv with it.
    assert set(identity.LIBRARIES) == set(LIBRARIES), "PyNaCl is missing: pip install -e '.[backend]'"
    assert identity.LIBRARY == "libsodium"


def test_without_pynacl_cryptography_checks_the_same_way() -> None:
    """odo-verify's install (no extra) has no PyNaCl: cryptography is used, with the same rules."""
    key = SigningKey.generate()
    message = b"no pynacl here"
    zero_forgery = _forgery_on_the_zero_key()
    code = ("import sys; sys.modules['nacl'] = None\n"
            "from protocol import identity\n"
            "from protocol.errors import BadSignature\n"
            f"key = identity.VerifyKey({key.public.raw!r})\n"
            f"key.verify({key.sign(message)!r}, {message!r})\n"
            "try:\n"
            f"    identity.VerifyKey(bytes(32)).verify({zero_forgery[1]!r}, {zero_forgery[2]!r})\n"
            "except BadSignature:\n"
            "    print(identity.LIBRARY, sorted(identity.LIBRARIES), 'nacl' in sys.modules and "
            "sys.modules['nacl'] is not None)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    res = subprocess.run([sys.executable, "-I", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["cryptography", "['cryptography']", "False"]


# -- RFC 8032 ---------------------------------------------------------------------------------

# RFC 8032 §7.1: (secret key, public key, message, signature), TEST 1, 2, 3 and SHA(abc).
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
     "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf"
     "5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
     "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2"
     "eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
     "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c1"
     "5e9716ed28dc027beceea1ec40a"),
    ("833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
     "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     hashlib.sha512(b"abc").hexdigest(),
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca1"
     "79c138ac17ad9bef1177331a704"),
]


@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032,
                         ids=["TEST 1", "TEST 2", "TEST 3", "SHA(abc)"])
def test_rfc8032_vectors_verify_and_any_changed_bit_fails(secret: str, public: str, message: str,
                                                          signature: str) -> None:
    sk, pk, msg, sig = (bytes.fromhex(h) for h in (secret, public, message, signature))
    own = Ed25519PrivateKey.from_private_bytes(sk)     # the vector is copied right: it is reproduced
    assert own.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == pk
    assert own.sign(msg) == sig
    assert agree(pk, sig, msg)
    VerifyKey(pk).verify(sig, msg)
    for bit in range(0, 512, 7):
        changed = bytearray(sig)
        changed[bit // 8] ^= 1 << bit % 8
        assert not agree(pk, bytes(changed), msg), f"signature bit {bit}"
    assert not agree(pk, sig, msg + b"\x00")
    if msg:
        assert not agree(pk, sig, bytes([msg[0] ^ 1]) + msg[1:])
    assert not agree(pk[:31] + bytes([pk[31] ^ 0x80]), sig, msg)  # the key's sign bit


# -- "Taming the many EdDSAs": cases 0-11 -----------------------------------------------------

# (message, public key, signature, accepted). Accepted: only case 3 (a key of mixed order, the
# equation holding without the cofactor). Refused: 0-1 a key of small order, 2 an R of small
# order, 4-5 the equation holding only with the cofactor, 6-7 S not reduced, 8-9 R not
# canonical, 10-11 a key of small order (and not canonical).
SPECCHECK = [
    ("8c93255d71dcab10e8f379c26200f3c7bd5f09d9bc3068d3ef4edeb4853022b6",
     "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
     "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a0000000000000000000000000000000000000000"
     "000000000000000000000000", False),
    ("9bd9f44f4dcc75bd531b56b2cd280b0bb38fc1cd6d1230e14861d861de092e79",
     "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
     "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43a5bb704786be79fc476f91d3f3f89b03984d8068"
     "dcf1bb7dfc6637b45450ac04", False),
    ("aebf3f2601a0c8c5d39cc7d8911642f740b78168218da8471772b35f9d35b9ab",
     "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43",
     "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa8c4bd45aecaca5b24fb97bc10ac27ac8751a7dfe"
     "1baff8b953ec9f5833ca260e", False),
    ("9bd9f44f4dcc75bd531b56b2cd280b0bb38fc1cd6d1230e14861d861de092e79",
     "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d",
     "9046a64750444938de19f227bb80485e92b83fdb4b6506c160484c016cc1852f87909e14428a7a1d62e9f22f3d3ad7802db02eb2"
     "e688b6c52fcd6648a98bd009", True),
    ("e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec4011eaccd55b53f56c",
     "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d",
     "160a1cb0dc9c0258cd0a7d23e94d8fa878bcb1925f2c64246b2dee1796bed5125ec6bc982a269b723e0668e540911a9a6a58921d"
     "6925e434ab10aa7940551a09", False),
    ("e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec4011eaccd55b53f56c",
     "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d",
     "21122a84e0b5fca4052f5b1235c80a537878b38f3142356b2c2384ebad4668b7e40bc836dac0f71076f9abe3a53f9c03c1ceeedd"
     "b658d0030494ace586687405", False),
    ("85e241a07d148b41e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec40",
     "442aad9f089ad9e14647b1ef9099a1ff4798d78589e66f28eca69c11f582a623",
     "e96f66be976d82e60150baecff9906684aebb1ef181f67a7189ac78ea23b6c0e547f7690a0e2ddcd04d87dbc3490dc19b3b3052f"
     "7ff0538cb68afb369ba3a514", False),
    ("85e241a07d148b41e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec40",
     "442aad9f089ad9e14647b1ef9099a1ff4798d78589e66f28eca69c11f582a623",
     "8ce5b96c8f26d0ab6c47958c9e68b937104cd36e13c33566acd2fe8d38aa19427e71f98a4734e74f2f13f06f97c20d58cc3f54b8"
     "bd0d272f42b695dd7e89a8c2", False),
    ("9bedc267423725d473888631ebf45988bad3db83851ee85c85e241a07d148b41",
     "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43",
     "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff03be9678ac102edcd92b0210bb34d7428d12ffc5"
     "df5f37e359941266a4e35f0f", False),
    ("9bedc267423725d473888631ebf45988bad3db83851ee85c85e241a07d148b41",
     "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43",
     "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffca8c5b64cd208982aa38d4936621a4775aa233aa"
     "0505711d8fdcfdaa943d4908", False),
    ("e96b7021eb39c1a163b6da4e3093dcd3f21387da4cc4572be588fafae23c155b",
     "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
     "a9d55260f765261eb9b84e106f665e00b867287a761990d7135963ee0a7d59dca5bb704786be79fc476f91d3f3f89b03984d8068"
     "dcf1bb7dfc6637b45450ac04", False),
    ("39a591f5321bbe07fd5a23dc2f39d025d74526615746727ceefd6e82ae65c06f",
     "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
     "a9d55260f765261eb9b84e106f665e00b867287a761990d7135963ee0a7d59dca5bb704786be79fc476f91d3f3f89b03984d8068"
     "dcf1bb7dfc6637b45450ac04", False),
]


@pytest.mark.parametrize(("case", "message", "public", "signature", "accepted"),
                         [(i, *c) for i, c in enumerate(SPECCHECK)], ids=[f"case {i}" for i in range(12)])
def test_the_edge_cases_of_taming_the_many_eddsas(case: int, message: str, public: str, signature: str,
                                                  accepted: bool) -> None:
    msg, pk, sig = bytes.fromhex(message), bytes.fromhex(public), bytes.fromhex(signature)
    assert verdicts(pk, sig, msg) == {lib: accepted for lib in LIBRARIES}, f"case {case}"


# -- each rule, with a signature made to break it ---------------------------------------------

def _signer(seed: bytes) -> tuple[int, bytes]:
    a = scalar(seed)
    return a, encode(mul(a, BASE))


def _forgery_on_the_zero_key() -> tuple[bytes, bytes, bytes]:
    """The all-zero key is a point of order 4: R = identity, S = 0 satisfies the equation for any
    message whose challenge is a multiple of 4, without any secret."""
    r = encode(IDENTITY)
    for i in range(1000):
        message = b"forged %d" % i
        if challenge(r, bytes(32), message) % 4 == 0:
            return bytes(32), r + bytes(32), message
    raise AssertionError("no message found")


def test_the_small_order_list_is_the_y_of_the_eight_points_of_small_order() -> None:
    t = order_8_point()
    torsion = {mul(i, t) for i in range(8)}
    assert len(torsion) == 8 and all(mul(8, q) == IDENTITY for q in torsion)
    ys = {y for _, y in torsion}
    assert ys | {P, P + 1} == identity._SMALL_ORDER_Y
    for q in torsion:
        assert identity.weak_key(encode(q))
        assert identity.weak_key((int.from_bytes(encode(q), "little") ^ 1 << 255).to_bytes(32, "little"))


def test_a_key_of_small_order_accepts_nothing() -> None:
    public, signature, message = _forgery_on_the_zero_key()
    # the equation holds (a library that only checks it, as OpenSSL does, would accept) ...
    assert mul(int.from_bytes(signature[32:], "little"), BASE) == add(
        decode(signature[:32]), mul(challenge(signature[:32], public, message), decode(public)))
    # ... and the key is refused
    assert identity.weak_key(public) and not agree(public, signature, message)
    with pytest.raises(BadSignature, match="signature does not verify"):
        VerifyKey(public).verify(signature, message)
    one = encode(IDENTITY)          # the neutral point as a key: R = identity, S = 0 signs anything
    assert not agree(one, one + bytes(32), b"anything")


def test_an_r_of_small_order_is_refused_even_from_the_keys_owner() -> None:
    """R = identity and S = k·a: the equation holds, but no honest signer makes such an R."""
    a, public = _signer(b"\x07" * 32)
    message = b"small-order R"
    r = encode(IDENTITY)
    forged = r + (challenge(r, public, message) * a % L).to_bytes(32, "little")
    assert not identity.acceptable(public, forged)
    assert not agree(public, forged, message)


def test_s_not_reduced_is_refused() -> None:
    key = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for i in range(40):
        message = b"S + L %d" % i
        signature = key.sign(message)
        s = int.from_bytes(signature[32:], "little")
        assert agree(public, signature, message)
        if s + L < 2**256:              # the same S mod L, so the same equation: refused all the same
            assert not agree(public, signature[:32] + (s + L).to_bytes(32, "little"), message)
        assert not agree(public, signature[:32] + (L + (s % 16)).to_bytes(32, "little"), message)


def test_a_key_of_mixed_order_is_accepted_when_the_equation_holds_without_the_cofactor() -> None:
    """A' = A + T (T of order 8) is canonical and not of small order: both accept a signature whose
    challenge k is a multiple of 8, so that [k]T vanishes, and refuse it otherwise."""
    a, _ = _signer(b"\x09" * 32)
    public = encode(add(mul(a, BASE), order_8_point()))
    assert not identity.weak_key(public)
    rng = random.Random(8)
    accepted = refused = 0
    while not (accepted and refused):
        nonce = rng.randrange(1, L)
        r = encode(mul(nonce, BASE))
        message = b"mixed order %d" % nonce
        k = challenge(r, public, message)
        signature = r + ((nonce + k * a) % L).to_bytes(32, "little")
        ok = agree(public, signature, message)
        assert ok == (k % 8 == 0)
        accepted, refused = accepted + ok, refused + (not ok)


def test_non_canonical_keys_are_refused() -> None:
    for y in range(P, 2**255):
        for sign in (0, 1):
            raw = (y | sign << 255).to_bytes(32, "little")
            assert identity.weak_key(raw)
            assert not agree(raw, bytes(64), b"")
            assert not agree(raw, encode(BASE) + bytes(32), b"")


def test_signatures_of_another_length_and_keys_off_the_curve_are_refused() -> None:
    key = SigningKey.generate()
    message = b"length"
    signature = key.sign(message)
    for bad in (b"", signature[:63], signature + b"\x00", signature * 2):
        assert not agree(key.public.raw, bad, message)
        with pytest.raises(BadSignature):
            key.public.verify(bad, message)
    y = next(y for y in range(2, 1000) if x_of(y, 0) is None)       # no point has this y
    off = y.to_bytes(32, "little")
    assert not identity.weak_key(off) and not agree(off, signature, message)


# -- random signatures, and random changes to them --------------------------------------------

def test_random_signatures_and_random_changes_get_the_same_answer() -> None:
    rng = random.Random(20260921)
    for n in range(300):
        seed = rng.randbytes(32)
        key = Ed25519PrivateKey.from_private_bytes(seed)
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        message = rng.randbytes(rng.choice((0, 1, 64, 450, 600, 2000)))
        signature = key.sign(message)
        assert agree(public, signature, message), n
        VerifyKey(public).verify(signature, message)
        which = rng.randrange(3)
        if which == 0:
            i = rng.randrange(64)
            signature = signature[:i] + bytes([signature[i] ^ 1 << rng.randrange(8)]) + signature[i + 1:]
        elif which == 1:
            i = rng.randrange(32)
            public = public[:i] + bytes([public[i] ^ 1 << rng.randrange(8)]) + public[i + 1:]
        else:
            message = message + b"!" if not message or rng.random() < 0.5 else message[1:]
        assert not agree(public, signature, message), n
        assert not agree(rng.randbytes(32), rng.randbytes(64), message)    # anything at all


def test_verify_key_verify_uses_the_library_and_raises_bad_signature() -> None:
    key = SigningKey.generate()
    key.public.verify(key.sign(b"data"), b"data")
    with pytest.raises(BadSignature, match="signature does not verify"):
        key.public.verify(key.sign(b"data"), b"date")
    with pytest.raises(BadSignature):
        SigningKey.generate().public.verify(key.sign(b"data"), b"data")
