"""The witness's HTTP service (c2sp.org/tlog-witness), on the standard library's HTTP server.

- ``POST /add-checkpoint``: cosign a checkpoint that extends the last one cosigned for its log
  (:mod:`witness.core` decides; :class:`witness.state.State` records it, compare-and-set);
- ``GET /<hex SHA-256 of an origin>/checkpoint``: the last checkpoint cosigned for that log,
  with the log's signature lines and this witness's cosignature (the spec's monitoring call).

A request body needs a Content-Length of at most :data:`protocol.witness.MAX_REQUEST_BYTES`,
read within :data:`READ_TIMEOUT_S`; at most :data:`MAX_CONNECTIONS` connections are served at
once (keep-alive is spoken). Every decision is logged on one line.
"""

from __future__ import annotations

import hashlib
import logging
import re
import signal
import socket
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from common.clock import now_ms
from protocol import note
from protocol import witness as wire
from witness import core
from witness.core import Cosigned, Refused
from witness.state import Identity, State, StateError

log = logging.getLogger("witness")

READ_TIMEOUT_S = 30
MAX_CONNECTIONS = 64
TEXT = "text/plain; charset=utf-8"
_LENGTH = re.compile(r"[0-9]{1,9}")
_MONITOR = re.compile(r"/([0-9a-f]{64})/checkpoint")


class Witness:
    """The witness: its state, its key, and the log keys it trusts, by origin."""

    def __init__(self, state: State, identity: Identity, logs: Mapping[str, Sequence[note.Verifier]],
                 clock: Callable[[], int] = now_ms) -> None:
        self.state = state
        self.identity = identity
        self.logs = {origin: tuple(keys) for origin, keys in logs.items()}
        self._by_hash = {hashlib.sha256(o.encode("utf-8")).hexdigest(): o for o in self.logs}
        self._clock = clock
        self._lock = threading.Lock()

    def add_checkpoint(self, body: bytes, client: str = "-") -> bytes:
        """The cosignature lines for the request ``body``, the new checkpoint recorded first;
        raise :class:`Refused`. One line is logged either way."""
        try:
            sub = core.open_submission(body, self.logs)
        except Refused as refused:
            log.info("add-checkpoint from %s: %d %s", client, refused.status, refused.reason)
            raise
        what = f"add-checkpoint from {client}: {sub.origin} old {sub.old_size} size {sub.size}"
        with self._lock:
            record = self.state.last(sub.origin)
            last = record.cosigned if record else None
            try:
                core.check(sub, last)
            except Refused as refused:
                if refused.evidence:
                    kept = self.state.keep_refused(sub.origin, refused.reason, body, self._clock())
                    log.warning("%s: %d %s (a log-signed checkpoint inconsistent with the cosigned one; "
                                "%s)", what, refused.status, refused.reason,
                                "kept in the state file" if kept else "not kept: enough are")
                else:
                    log.info("%s: %d %s", what, refused.status, refused.reason)
                raise
            at = self._clock()
            cosignature = note.cosign(sub.text, self.identity.name, self.identity.key, max(1, at // 1000))
            signed = note.Note(sub.text, (*sub.log_signatures, cosignature)).encode()
            if not self.state.advance(last, Cosigned(sub.origin, sub.size, sub.root), signed, at):
                now = self.state.last(sub.origin)
                size = now.cosigned.size if now else 0
                log.info("%s: 409 the cosigned size became %d meanwhile", what, size)
                raise Refused(core.CONFLICT, f"the last cosigned size is now {size}", size)
        log.info("%s: 200 cosigned", what)
        return wire.encode_cosignatures([cosignature])

    def checkpoint(self, origin_hash: str) -> str | None:
        """The last cosigned checkpoint of the log whose origin hashes to ``origin_hash``."""
        origin = self._by_hash.get(origin_hash)
        record = self.state.last(origin) if origin else None
        return record.note if record else None


class Handler(BaseHTTPRequestHandler):
    """One connection; its requests are answered in turn."""

    server: WitnessServer
    protocol_version = "HTTP/1.1"
    server_version = "odo-witness"
    sys_version = ""
    timeout = READ_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: :class:`Witness` logs each decision."""

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("http from %s: " + format, self.client_address[0], *args)

    def _send(self, status: int, body: bytes, content_type: str = TEXT, *, close: bool = False,
              allow: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if allow:
            self.send_header("Allow", allow)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, message: str, *, close: bool = False, allow: str | None = None) -> None:
        self._send(status, (message + "\n").encode("utf-8"), close=close, allow=allow)

    def _body(self) -> bytes | None:
        """The request body, bounded; None if refused (the answer is sent) or cut short."""
        if self.headers.get("Transfer-Encoding") is not None:
            self._text(411, "a Content-Length is required (no Transfer-Encoding)", close=True)
            return None
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            self._text(411, "a Content-Length is required", close=True)
            return None
        if len(lengths) > 1 or not _LENGTH.fullmatch(lengths[0].strip()):
            self._text(400, "Content-Length must be one decimal number", close=True)
            return None
        length = int(lengths[0])
        if length > wire.MAX_REQUEST_BYTES:
            self._text(413, f"the body may hold at most {wire.MAX_REQUEST_BYTES} bytes", close=True)
            return None
        try:
            body = self.rfile.read(length)
        except OSError:                              # a timeout, or the client went away
            self.close_connection = True
            return None
        if len(body) != length:
            self.close_connection = True
            return None
        return body

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path != wire.PATH:
            self._text(404, f"no such endpoint; POST {wire.PATH}", close=True)
            return
        body = self._body()
        if body is None:
            return
        try:
            answer = self.server.witness.add_checkpoint(body, self.client_address[0])
        except Refused as refused:
            if refused.status == core.CONFLICT and refused.size is not None:
                self._send(core.CONFLICT, wire.encode_size(refused.size), wire.SIZE_CONTENT_TYPE)
            else:
                self._text(refused.status, refused.reason)
            return
        except StateError as exc:
            log.error("add-checkpoint from %s: 500 the state file failed: %s", self.client_address[0], exc)
            self._text(500, "the witness cannot use its state; nothing was cosigned", close=True)
            return
        self._send(200, answer)

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == wire.PATH:
            self._text(405, f"use POST {wire.PATH}", allow="POST")
            return
        match = _MONITOR.fullmatch(path)
        if not match:
            self._text(404, "not found")
            return
        try:
            text = self.server.witness.checkpoint(match[1])
        except StateError as exc:
            log.error("checkpoint: 500 the state file failed: %s", exc)
            self._text(500, "the witness cannot use its state", close=True)
            return
        if text is None:
            self._text(404, "no checkpoint of that log has been cosigned")
            return
        self._send(200, text.encode("utf-8"))

    do_HEAD = do_GET


class WitnessServer(ThreadingHTTPServer):
    """A threading HTTP server serving at most ``max_connections`` connections at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], witness: Witness,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.witness = witness
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("refused a connection from %s: %d are open", client_address[0], MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve(witness: Witness, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT; OSError if the address cannot be listened on."""
    server = WitnessServer((host, port), witness)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="witness-http", daemon=True)
    thread.start()
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("listening on http://%s:%d as %s, for %s", shown, bound_port, witness.identity.name,
             ", ".join(sorted(witness.logs)))
    try:
        while not stop.wait(1.0):
            pass
    finally:
        log.info("stopping")
        server.shutdown()
        server.server_close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("stopped")
