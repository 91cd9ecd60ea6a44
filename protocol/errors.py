"""The protocol's exception tree (see the package docstring)."""


class ProtocolError(Exception):
    """Base of every error raised by :mod:`protocol`."""


class BadFormat(ProtocolError):
    """The input is not well formed; the message names what was wrong."""


class BadSignature(ProtocolError):
    """The input is well formed but its signature does not verify."""
