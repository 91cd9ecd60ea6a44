"""The agent that runs in the car: OBD reading → odometer and trips → signed
records → the SQLite outbox → MQTT sync. Imports :mod:`protocol`, never the backend.

Exceptions (all in :mod:`agent.errors`; caught by the CLI and the daemon)::

    AgentError
    ├── Exit            an odo-agent command ends with this status and message
    ├── ConfigError     a missing or bad setting (exit 2 for flags, 78 otherwise)
    ├── ClockError       this boot's id cannot be read
    ├── IdentityError   no usable device key (exit 78)
    ├── StorageError    the outbox could not be written; nothing stored changed
    └── BrokerError     the MQTT broker could not be used
        ├── AuthRefused     it refused the device's credentials (not retried)
        └── Unreachable     it could not be reached or did not accept the connection
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("odoledger")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
