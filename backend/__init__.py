"""The odoledger backend: it receives signed records over MQTT, checks them, keeps a
tamper-evident history per vehicle and credits rewards to drivers.

A record flows through the subpackages in this order::

    records/        ingest (MQTT) → verify → store; enrolment and the devices
    ledger/         rules → rewards → accounts (double entry); assignments, audit
    transparency/   the Merkle log and its checkpoints → mileage certificates
    web/            the JSON API, the operator dashboard, metrics and health
    cli/            ``odo-backend``: one module per command group

beside the modules every stage uses: ``config`` (settings), ``db`` (SQLite or PostgreSQL),
``schema`` (migrations), ``metrics`` (Prometheus) and ``service`` (``odo-backend run``).

Exceptions (:mod:`backend.errors`)::

    BackendError
    ├── UsageError            bad input on the command line (exit 2)
    ├── ConfigError           a missing or wrong setting (exit 2 from a flag, 78 otherwise)
    ├── DatabaseError         a database URL, connection or migration that fails
    │   └── IntegrityError    a constraint refused a write
    ├── RulesError            the rules file is unreadable or wrong
    ├── DeviceError
    │   ├── UnknownDevice     no device has that id
    │   └── DeviceInputError  a device id, VIN or decision that cannot be used
    ├── LedgerError
    │   ├── UnknownAccount    no such account, or a malformed account name
    │   ├── UnknownItem       not in the rules' catalogue
    │   ├── InsufficientFunds the balance would go below zero
    │   ├── KeyConflict       the idempotency key was used for something else
    │   ├── InvalidKey        the idempotency key is empty or malformed
    │   ├── AssignmentError   a driver or an assignment that cannot be made
    │   └── ClaimError        a claim with a pairing code, refused:
    │       ├── UnknownCode, ExpiredCode, UsedCode      the code
    │       ├── ClaimConflict     the vehicle is another driver's now
    │       ├── ClaimDeviceError  the device is not approved for a VIN
    │       └── TooManyClaims     too many wrong codes from the device lately
    ├── TranslogError         an entry conflicts with the transparency log
    ├── CertificateError      no certificate can be made for that VIN
    ├── AuthError             an operator name or password that cannot be used
    └── BadRequest            an HTTP body or parameter that cannot be used (400)
"""
