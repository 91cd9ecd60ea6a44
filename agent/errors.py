"""The agent's exceptions, in one tree under :class:`AgentError` (drawn in :mod:`agent`).

Each names what went wrong in words fit for the log or the terminal; the CLI and the daemon
catch them and turn them into an exit status or a logged error state.
"""

from __future__ import annotations


class AgentError(Exception):
    """The root: anything the agent raises on purpose."""


class Exit(AgentError):
    """End an ``odo-agent`` command with ``code`` (and the message, when there is one)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code


class ConfigError(AgentError):
    """A missing or bad setting; ``key`` names it, ``source`` says where it came from."""

    def __init__(self, key: str, message: str, source: str = "file") -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.source = source  # "flag" | "env" | "file"

    @property
    def exit_code(self) -> int:
        return 2 if self.source == "flag" else 78


class ClockError(AgentError):
    """This boot's id cannot be read: records could not be ordered across reboots."""


class IdentityError(AgentError):
    """No usable device key (missing, unreadable, or not an Ed25519 PKCS#8 key)."""


class StorageError(AgentError):
    """The outbox could not be written (disk full, I/O error, lock timeout)."""


class BrokerError(AgentError):
    """The MQTT broker could not be used."""


class AuthRefused(BrokerError):
    """The broker refused this device's credentials; retrying will not help."""


class Unreachable(BrokerError):
    """The broker could not be reached or did not accept the connection."""
