"""The backend's exception tree (drawn in :mod:`backend`'s docstring).

Each error's message names what was wrong, for the operator who reads it; none names a
command-line flag: the CLI (:mod:`backend.cli`) and the HTTP API (:mod:`backend.web.api`)
say where the bad value came from.
"""

from __future__ import annotations

EX_USAGE = 2
EX_CONFIG = 78


class BackendError(Exception):
    """Base of every error the backend raises on purpose."""


class UsageError(BackendError):
    """Bad input on the command line or stdin; exit status 2 (``EX_USAGE``)."""


class ConfigError(BackendError):
    """A missing or wrong setting; ``key`` names it, ``status`` is the exit status it deserves."""

    def __init__(self, key: str, message: str, status: int = EX_CONFIG) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.status = status


class DatabaseError(BackendError):
    """A database URL that cannot be used, or a database that cannot be reached or migrated."""


class IntegrityError(DatabaseError):
    """A unique or foreign key constraint refused a write."""


class LockTimeout(DatabaseError):
    """Another process held a lock longer than a writer waits for it (it may be stopped); the
    transaction is rolled back, and what it was for is done again later."""


class StorageUnavailable(DatabaseError):
    """The database could not store at all (a full disk, an I/O error, a lost connection), as
    :func:`backend.storage.failure` names it: raised again where the write was asked for when it
    failed in another process (:mod:`backend.records.processes`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class RulesError(BackendError):
    """The rules file is unreadable or wrong; the message names the file and the key."""


class DeviceError(BackendError):
    """A device operation refused; the message names what was wrong."""


class UnknownDevice(DeviceError):
    """No device has that id."""


class DeviceInputError(DeviceError):
    """A device id, VIN or decision that cannot be used."""


class LedgerError(BackendError):
    """Base of the ledger's refusals; the message says what was wrong."""


class UnknownAccount(LedgerError):
    """No such account, or a malformed account name."""


class UnknownItem(LedgerError):
    """Not in the rules' catalogue."""


class InsufficientFunds(LedgerError):
    """The balance would go below zero."""


class KeyConflict(LedgerError):
    """The idempotency key was used for something else."""


class InvalidKey(LedgerError):
    """The idempotency key is empty or malformed."""


class AssignmentError(LedgerError):
    """A driver or an assignment that cannot be made."""


class ClaimError(LedgerError):
    """A claim of a vehicle with a pairing code, refused; ``reason`` names why in a word the
    device is told (docs/protocol.md, the ``claim`` message)."""

    reason = "refused"


class UnknownCode(ClaimError):
    """No pairing code is that one."""

    reason = "unknown_code"


class ExpiredCode(ClaimError):
    """The pairing code's time is over, or a newer one of the same driver replaced it."""

    reason = "expired_code"


class UsedCode(ClaimError):
    """The pairing code has claimed a vehicle already (from another device)."""

    reason = "used_code"


class ClaimConflict(ClaimError):
    """The vehicle is another driver's now: that claim or assignment must end first."""

    reason = "vehicle_taken"


class ClaimDeviceError(ClaimError):
    """The claiming device is unknown, not approved, or approved for no VIN."""

    reason = "device_not_approved"


class TooManyClaims(ClaimError):
    """The device sent too many wrong codes lately; it must wait."""

    reason = "too_many_attempts"


class TranslogError(BackendError):
    """An entry conflicts with the transparency log (the log never changes what it holds)."""


class CertificateError(BackendError):
    """No certificate can be made; the message says why."""


class AuthError(BackendError):
    """A username or password that cannot be used, or an operator that already exists."""


class BadRequest(BackendError):
    """An HTTP request body or parameter that cannot be used (answered with 400)."""
