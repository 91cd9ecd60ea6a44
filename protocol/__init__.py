"""What the agent and the backend agree on: records, identity, topics, messages,
Merkle-log hashing, signed notes and checkpoints in the C2SP formats, and the mileage
certificate.

Pure: bytes in, values out. No sockets, files or clocks; a third party's
verifier needs this package alone.

Exceptions::

    ProtocolError
    ├── BadFormat        the bytes are not a well-formed record or message
    └── BadSignature     well-formed, but the signature does not verify
"""

from protocol.errors import BadFormat, BadSignature, ProtocolError

__all__ = ["BadFormat", "BadSignature", "ProtocolError"]
