"""Read the car through an ELM327 adapter: the only module that imports ``obd``.

python-OBD's ``ELM327`` class does the adapter set-up (ATZ, echo and headers,
protocol search) and its protocol classes parse CAN and legacy frames into
messages. We use no more of it than that, because as published (0.7.3) it:

- blocks for ~121 s on a silent adapter: every read waits on a 10 s serial
  timeout and ``__send`` retries empty reads for a second. ``_BoundedElm``
  replaces those two private methods: a whole query, retries included, gets
  ``query_timeout_s`` (default 2 s) to end with the ``>`` prompt, else the
  adapter counts as silent, every further query of the connection returns at
  once, and :attr:`ObdSource.state` becomes ``"lost"``. The one exception is the
  protocol search when the adapter has printed ``SEARCHING...``: it is alive, and
  a real search can take several seconds, so it gets ``search_timeout_s``.
- decodes ``NO DATA`` to a custom command as zero and never checks the reply's
  mode and PID: we decode replies ourselves and accept only ``41 <pid>`` frames
  of the right length, so ``NO DATA`` or the emulator's ``61 A6`` never becomes
  an odometer of 0 km.
- strips ``0``, ``1``, ``2`` and ``x`` off both ends of a VIN: we take the raw
  mode 09 PID 02 bytes and validate 17 characters of [A-HJ-NPR-Z0-9].
- adds its own stderr log handler on import: removed below (and its logger
  quietened: a parked car is not an error).

Nothing here raises because the car is off or the adapter is unplugged: such
outcomes are values (``Sample.connected`` / ``ecu`` false, fields None).
Not thread-safe: one daemon thread owns an ``ObdSource``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# python-OBD redefines some of pint's units on import, which pint logs as warnings
logging.getLogger("pint.util").setLevel(logging.ERROR)

import obd  # type: ignore[import-untyped]  # noqa: E402
import serial  # type: ignore[import-untyped]  # noqa: E402
from obd.elm327 import ELM327  # type: ignore[import-untyped]  # noqa: E402
from obd.protocols import ECU  # type: ignore[import-untyped]  # noqa: E402
from obd.utils import OBDStatus  # type: ignore[import-untyped]  # noqa: E402

log = logging.getLogger(__name__)

_obd_handler = getattr(obd, "console_handler", None)
if _obd_handler is not None:
    logging.getLogger("obd").removeHandler(_obd_handler)
# python-OBD logs a parked car ("ignition is off", "unable to connect") as errors, on every
# protocol search; this module reports the adapter's state itself.
logging.getLogger("obd").setLevel(logging.CRITICAL)

VIN_RE = re.compile(r"[A-HJ-NPR-Z0-9]{17}")
SOCKET_BAUDRATE = 38400          # pyserial's socket:// cannot detect a baud rate; any value works
_CAR_RETRY_S = 5.0               # how often to look for the ECU again while it does not answer
_A6_BIT = 0x04                   # PID A6 in the 01A0 bitmap: byte 0, 6th PID of A1-C0
_A6_INVALID = 0xFFFFFFFF


@dataclass(frozen=True)
class Sample:
    mono_ms: int                 # time.monotonic_ns() // 1_000_000 when taken
    connected: bool              # the adapter answered
    ecu: bool                    # the car's ECU answered (ignition on)
    speed_kph: int | None        # PID 0x0D
    rpm: int | None              # PID 0x0C
    odo_m: int | None            # PID 0xA6, validated; None when unsupported/NO DATA/bad
    dist_since_clear_km: int | None   # PID 0x31
    voltage_mv: int | None       # ATRV


def decode_vin(payload: bytes) -> str | None:
    """The VIN in a mode 09 PID 02 reply's bytes after ``49 02``, or None.

    CAN replies carry a message count byte then 17 characters; legacy ones pad
    with leading zeros; some ECUs pad at the end. Take the last 17 bytes before
    any trailing NUL padding and accept them only as a valid VIN.
    """
    body = bytes(payload).rstrip(b"\x00")
    if len(body) < 17:
        return None
    try:
        text = body[-17:].decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if VIN_RE.fullmatch(text) else None


def decode_voltage_mv(line: str) -> int | None:
    """``"12.3V"`` (ATRV) to millivolts, without floats; None if malformed."""
    m = re.fullmatch(r"\s*(\d{1,2})(?:\.(\d{1,3}))?\s*[Vv]?\s*", line)
    if not m:
        return None
    frac = (m.group(2) or "").ljust(3, "0")
    return int(m.group(1)) * 1000 + int(frac)


def pid_bytes(messages: Iterable[Any], pid: int, n: int) -> bytes | None:
    """The n data bytes of a mode 01 reply ``41 <pid> ...``, preferring the engine ECU.

    Anything else (``NO DATA``, a negative or other-mode reply such as ``61 A6``,
    a short frame) gives None.
    """
    found: list[tuple[bool, bytes]] = []
    for m in messages:
        data = bytes(m.data)
        if len(data) >= 2 + n and data[0] == 0x41 and data[1] == pid:
            found.append((m.ecu == ECU.ENGINE, data[2:2 + n]))
    if not found:
        return None
    found.sort(key=lambda f: not f[0])
    return found[0][1]


class _BoundedElm(ELM327):  # type: ignore[misc]
    """python-OBD's ELM327 with every query bounded in time (see the module docstring).

    ELM327's own methods call ``self.__send`` / ``self.__read``, which Python
    mangles to ``_ELM327__send`` / ``_ELM327__read``; defining those names here
    replaces them for the whole class, set-up included.
    """

    _ELM327__port: Any          # ELM327's private attributes, as mangled
    _ELM327__status: Any

    def __init__(self, port: str, baudrate: int | None, query_timeout_s: float,
                 search_timeout_s: float) -> None:
        self.query_timeout_s = query_timeout_s
        self.search_timeout_s = search_timeout_s
        self.silent = False
        # timeout=0.1 is python-OBD's own default: it only bounds each step of baud detection
        super().__init__(port, baudrate, None, 0.1, check_voltage=True, start_low_power=False)

    def _ELM327__send(self, cmd: bytes, delay: float | None = None,
                      end_marker: bytes = b">") -> list[str]:
        if self.silent:
            return []
        self._ELM327__write(cmd)
        # no fixed delays: we wait for the prompt, up to the deadline
        return self._ELM327__read(end_marker=end_marker)

    def _ELM327__read(self, end_marker: bytes = b">") -> list[str]:
        port = self._ELM327__port
        if port is None or self.silent:
            return []
        start = time.monotonic()
        deadline = start + self.query_timeout_s
        buf = bytearray()
        while end_marker not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if b"SEARCHING" in buf and deadline < start + self.search_timeout_s:
                    deadline = start + self.search_timeout_s
                    continue
                break
            try:
                port.timeout = remaining
                data = port.read(port.in_waiting or 1)
            except (serial.SerialException, OSError, ValueError, TypeError) as exc:
                log.warning("OBD adapter: I/O error (%s)", exc)
                self.drop()
                return []
            buf.extend(data)
        if end_marker not in buf:
            log.warning("OBD adapter: no answer within %.1f s (got %r)", time.monotonic() - start,
                        bytes(buf[:40]))
            self.silent = True
            return []
        text = bytes(buf).replace(b"\x00", b"").rstrip(b">").decode("ascii", "ignore")
        return [s.strip() for s in re.split("[\r\n]", text) if s.strip()]

    def close(self) -> None:
        """Close without python-OBD's parting ATZ (which fails on a vanished device)."""
        self.drop()

    def drop(self) -> None:
        """Forget the port without talking to the adapter again."""
        self.silent = True
        self._ELM327__status = OBDStatus.NOT_CONNECTED
        port, self._ELM327__port = self._ELM327__port, None
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError):
                pass

    def command(self, cmd: bytes) -> list[str]:
        """An adapter command (AT...): its answer lines, [] when silent or closed."""
        if self.status() == OBDStatus.NOT_CONNECTED:
            return []
        return self._ELM327__send(cmd)

    def query(self, cmd: bytes) -> list[Any]:
        """An OBD request: the parsed messages, [] when there is no car link."""
        if self.silent or self.status() != OBDStatus.CAR_CONNECTED:
            return []
        return list(self.send_and_parse(cmd) or [])

    def find_car(self) -> bool:
        """Search the protocol again (the ECU did not answer at set-up)."""
        if self.silent or self.status() == OBDStatus.NOT_CONNECTED:
            return False
        if self.set_protocol(None) and not self.silent:
            self._ELM327__status = OBDStatus.CAR_CONNECTED
            return True
        return False


class ObdSource:
    """One OBD-II adapter: serial, Bluetooth RFCOMM, or ``socket://host:port`` (Wi-Fi)."""

    def __init__(self, port: str, *, baudrate: int | None = None, query_timeout_s: float = 2.0) -> None:
        if not port:
            raise ValueError("OBD port: empty (expected e.g. /dev/ttyUSB0 or socket://host:35000)")
        if query_timeout_s <= 0:
            raise ValueError(f"query_timeout_s: {query_timeout_s} must be positive")
        self._port = port
        self._baudrate = baudrate if baudrate is not None or not port.startswith("socket://") \
            else SOCKET_BAUDRATE
        self._timeout_s = query_timeout_s
        self._search_timeout_s = max(query_timeout_s, 10.0)
        self._elm: _BoundedElm | None = None
        self._state = "closed"
        self.vin_reply: str | None = None   # a reply to 0902 that was not a VIN, hex
        self._a6: bool | None = None
        self._next_car_try = 0.0

    @property
    def state(self) -> str:
        """``connected`` | ``no_ecu`` | ``lost`` | ``closed``."""
        return self._state

    def open(self) -> bool:
        """(Re)connect; True when the adapter answered, even if the car did not."""
        self.close()
        try:
            elm = _BoundedElm(self._port, self._baudrate, self._timeout_s, self._search_timeout_s)
        except (serial.SerialException, OSError, ValueError) as exc:
            log.warning("OBD adapter %s: cannot open (%s)", self._port, exc)
            self._state = "lost"
            return False
        if elm.silent or elm.status() == OBDStatus.NOT_CONNECTED:
            elm.drop()
            log.info("OBD adapter %s: no answer", self._port)
            self._state = "lost"
            return False
        self._elm = elm
        self._state = "no_ecu"
        if elm.status() == OBDStatus.CAR_CONNECTED:
            self._on_car()
        else:
            self._next_car_try = time.monotonic() + _CAR_RETRY_S
        log.info("OBD adapter %s: %s", self._port, self._state)
        return self._state != "lost"

    def close(self) -> None:
        elm, self._elm = self._elm, None
        if elm is not None:
            elm.drop()
        self._state = "closed"

    def vin(self) -> str | None:
        """The VIN (mode 09 PID 02), decoded by us; None when unreadable. When the car answered
        something that is not a VIN (ISO 3779), :attr:`vin_reply` holds what it said (hex)."""
        self.vin_reply = None
        for m in self._query(b"0902"):
            data = bytes(m.data)
            if len(data) > 2 and data[0] == 0x49 and data[1] == 0x02:
                vin = decode_vin(data[2:])
                if vin is not None:
                    return vin
                self.vin_reply = data[2:].hex()[:80]
        return None

    def supports_a6(self) -> bool | None:
        """Whether the car advertises PID A6 (01A0 bitmap); None while unknown."""
        return self._a6

    def sample(self, *, engine_off: bool) -> Sample:
        """One reading of everything; light (voltage and RPM only) with ``engine_off``
        unless the ECU answers, in which case the rest is read as well."""
        mono_ms = time.monotonic_ns() // 1_000_000
        elm = self._elm
        if elm is None or self._state in ("closed", "lost"):
            return Sample(mono_ms, False, False, None, None, None, None, None)
        if elm.status() != OBDStatus.CAR_CONNECTED and time.monotonic() >= self._next_car_try:
            if elm.find_car():
                self._on_car()
            else:
                self._next_car_try = time.monotonic() + _CAR_RETRY_S
        speed = rpm = odo = dsc = None
        voltage = self._voltage() if engine_off else None
        if engine_off:
            rpm = self._rpm()
        if not engine_off or rpm is not None:
            speed = self._pid(b"010D", 0x0D, 1)
            if rpm is None:
                rpm = self._rpm()
            odo = self._odometer() if self._a6 is not False else None
            dsc = self._pid(b"0131", 0x31, 2)
            if voltage is None:
                voltage = self._voltage()
        if elm.silent:
            self._lost()
            return Sample(mono_ms, False, False, None, None, None, None, None)
        ecu = any(v is not None for v in (speed, rpm, odo, dsc))
        self._state = "connected" if ecu else "no_ecu"
        if ecu and self._a6 is None:
            self._probe_a6()
        return Sample(mono_ms, True, ecu, speed, rpm, odo, dsc, voltage)

    # -- internals ---------------------------------------------------------------------------

    def _lost(self) -> None:
        log.warning("OBD adapter %s: lost", self._port)
        if self._elm is not None:
            self._elm.drop()
        self._elm = None
        self._state = "lost"

    def _on_car(self) -> None:
        self._state = "no_ecu"
        self._probe_a6()
        if self._elm is not None and self._elm.silent:
            self._lost()

    def _query(self, cmd: bytes) -> list[Any]:
        return self._elm.query(cmd) if self._elm is not None else []

    def _pid(self, cmd: bytes, pid: int, n: int) -> int | None:
        raw = pid_bytes(self._query(cmd), pid, n)
        return int.from_bytes(raw, "big") if raw is not None else None

    def _rpm(self) -> int | None:
        raw = self._pid(b"010C", 0x0C, 2)
        return raw // 4 if raw is not None else None

    def _odometer(self) -> int | None:
        raw = self._pid(b"01A6", 0xA6, 4)
        if raw is None or raw == 0 or raw == _A6_INVALID:
            return None
        return raw * 100

    def _voltage(self) -> int | None:
        lines = self._elm.command(b"ATRV") if self._elm is not None else []
        return decode_voltage_mv(lines[0]) if len(lines) == 1 else None

    def _probe_a6(self) -> None:
        """01A0 says whether A6 is supported; no 01A0 while 0100 answers means no."""
        bitmap = pid_bytes(self._query(b"01A0"), 0xA0, 4)
        if bitmap is not None:
            self._a6 = bool(bitmap[0] & _A6_BIT)
        elif pid_bytes(self._query(b"0100"), 0x00, 4) is not None:
            self._a6 = False
        else:
            return   # the ECU is not answering: still unknown
        self._state = "connected"
        if not self._a6 and self._odometer() is not None:
            log.info("OBD: the car answers PID A6 without advertising it")
            self._a6 = True
        log.info("OBD: PID A6 (odometer) %s", "supported" if self._a6 else "not supported")
