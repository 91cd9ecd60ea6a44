"""The device key on disk (docs/protocol.md §2): PKCS#8 PEM, mode 0600, in the state directory.

The private key never leaves the device: nothing here sends or prints it. A missing or
unusable key is an :class:`agent.errors.IdentityError`.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from agent.errors import IdentityError
from protocol.errors import BadFormat
from protocol.identity import SigningKey

log = logging.getLogger(__name__)

KEY_FILE = "device.key"


def key_path(state_dir: Path) -> Path:
    return state_dir / KEY_FILE


def create(state_dir: Path) -> SigningKey:
    """Make a new key in ``state_dir``; refuse if one is already there."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = key_path(state_dir)
    key = SigningKey.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise IdentityError(
            f"{path} already exists: this device already has a key; refusing to overwrite it"
        ) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.to_pem())
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, 0o600)  # O_CREAT's mode is filtered by the umask; be exact
    return key


def load(state_dir: Path) -> SigningKey:
    path = key_path(state_dir)
    try:
        pem = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise IdentityError(f"no device key at {path}: run `odo-agent init` first") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by others (mode %o); it should be 0600", path, stat.S_IMODE(mode))
    try:
        return SigningKey.from_pem(pem)
    except BadFormat as exc:
        raise IdentityError(f"{path}: {exc}") from None
