"""The agent that runs in the car: OBD reading → odometer and trips → signed
records → the SQLite outbox → MQTT sync. Imports :mod:`protocol`, never the backend.

Exceptions (each module's own, caught by the CLI and the daemon)::

    ConfigError     agent.config    a missing or bad setting (exit 2 for flags, 78 otherwise)
    IdentityError   agent.identity  no usable device key (exit 78)
    StorageError    agent.buffer    the outbox could not be written; nothing stored changed
    AuthRefused     agent.sync      the broker refused the device's credentials
    Unreachable     agent.sync      the broker could not be reached
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("odoledger")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
