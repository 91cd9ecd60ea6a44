"""``odo-agent``: init, enroll, run, confirm, status, ui, pin, remind.

Exit statuses: 0 done; 1 failed; 2 bad flags; 3 enrolment not approved (yet);
78 bad configuration or no device key (systemd does not restart on it).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from agent import __version__, enrol, identity
from agent import pin as pins
from agent import summary as summ
from agent.buffer import Outbox
from agent.clock import Clock, boot_id
from agent.config import CONFIG_FILE, ENV_PREFIX, AgentConfig, build_table, load, write_file
from agent.errors import BrokerError, ClockError, ConfigError, Exit, IdentityError, StorageError
from agent.recorder import Recorder
from agent.state import CONFIRMATION_DUE, VEHICLE, VIN, ConfirmationDue
from common import units
from common.clock import now_ms
from protocol.identity import SigningKey
from protocol.messages import check_fleet_token, encode_enroll, sign_enrollment

log = logging.getLogger(__name__)

EX_PENDING = 3
EX_CONFIG = 78


def _km(text: str) -> int:
    try:
        return summ.parse_km(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _miles(text: str) -> int:
    try:
        return units.parse(text, "mi")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _wait(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 to 86400 seconds")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="odo-agent",
                                description="Signed odometer readings from the OBD-II port.")
    p.add_argument("--version", action="version", version=f"odo-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str,
                within: argparse._SubParsersAction[argparse.ArgumentParser] = sub) -> argparse.ArgumentParser:
        c = within.add_parser(name, help=help_text, description=help_text)
        c.add_argument("--state-dir", help="the agent's state directory (or ODO_STATE_DIR)")
        c.add_argument("--config", help=f"config file (default: STATE_DIR/{CONFIG_FILE}; or ODO_CONFIG)")
        c.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
        return c

    c = command("init", "make the device key and the config file; print the device id")
    c.add_argument("--obd-port", help="/dev/ttyUSB0, /dev/rfcomm0 or socket://HOST:PORT")
    c.add_argument("--obd-baudrate", type=int)
    c.add_argument("--broker", help="mqtt[s]://[user:password@]host:port")
    c.add_argument("--fleet-token")
    for name in ("--tls-ca", "--tls-cert", "--tls-key"):
        c.add_argument(name)
    c.add_argument("--mqtt-version", choices=("5", "3.1.1"))

    c = command("enroll", "ask the backend to approve this device; exit 0 once approved")
    c.add_argument("--wait", type=_wait, default=30.0, help="seconds to wait for the answer (default 30)")
    c.add_argument("--broker")
    c.add_argument("--fleet-token")

    c = command("run", "the daemon: read the car, sign, buffer and sync")
    c.add_argument("--obd-port")
    c.add_argument("--broker")

    c = command("confirm", "confirm the dashboard odometer for this week")
    figure = c.add_mutually_exclusive_group()
    figure.add_argument("--km", type=_km, help="the dashboard figure in km (e.g. 12345.6)")
    figure.add_argument("--miles", type=_miles, metavar="MI",
                        help="the dashboard figure in miles (e.g. 7671.2; stored as whole metres, "
                             "1 mi = 1609.344 m, to the nearest metre)")
    c.add_argument("--yes", action="store_true",
                   help="do not ask; with no --km or --miles, confirm the device's figure")

    c = command("status", "what the agent knows and how far sync got")
    c.add_argument("--json", action="store_true")

    c = command("ui", "the driver's local web page")
    c.add_argument("--listen", help="HOST:PORT (default: config ui_interface's address, else ui_listen, "
                                    "127.0.0.1:8080)")

    pin = sub.add_parser("pin", help="the driver's page's PIN", description="the driver's page's PIN")
    pin_sub = pin.add_subparsers(dest="pin_command", required=True, metavar="PIN_COMMAND")
    command("set", "set the PIN, read from the terminal or stdin (6 to 12 digits)", pin_sub)
    command("reset", "make a new random PIN and print it (for the dongle's label)", pin_sub)

    command("remind", "mark a confirmation as due when this ISO week has none (weekly timer)")
    return p


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    names = ("state_dir", "config", "log_level", "obd_port", "obd_baudrate", "broker", "fleet_token",
             "tls_ca", "tls_cert", "tls_key", "mqtt_version")
    flags = {n: getattr(args, n, None) for n in names}
    if getattr(args, "listen", None) is not None:
        flags["ui_listen"] = args.listen
    return flags


def _fleet_token(token: str | None) -> str | None:
    """The configured fleet token, checked before it is ever sent."""
    try:
        return check_fleet_token(token)
    except ValueError as exc:
        raise Exit(EX_CONFIG, f"fleet_token: {exc}") from None


def enroll_message(key: SigningKey, vin: str | None, fleet_token: str | None) -> str:
    """The ``enroll`` message: the enrolment signed now, and the fleet token beside it."""
    return encode_enroll(sign_enrollment(key, vin, now_ms()), fleet_token).decode("ascii")


def _open(cfg: AgentConfig) -> tuple[SigningKey, Outbox]:
    try:
        key = identity.load(cfg.state_dir)
    except IdentityError as exc:
        raise Exit(EX_CONFIG, str(exc)) from None
    try:
        return key, Outbox.open(cfg.db_path)
    except StorageError as exc:
        raise Exit(1, str(exc)) from None


# -- commands ---------------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace, cfg: AgentConfig) -> int:
    path = identity.key_path(cfg.state_dir)
    if path.exists():
        raise Exit(1, f"{path} already exists: this device is already initialised; "
                      "refusing to overwrite its key")
    key = identity.create(cfg.state_dir)
    conf = cfg.state_dir / CONFIG_FILE
    if conf.exists() or args.config:
        print(f"kept the existing config {args.config or conf}", file=sys.stderr)
    else:
        keep = ("obd_port", "obd_baudrate", "broker", "fleet_token", "tls_ca", "tls_cert", "tls_key",
                "mqtt_version")
        flags = _flags(args)
        # What was given, on the command line or in ODO_* variables, so the service finds it.
        given = {k: flags[k] if flags.get(k) is not None else os.environ.get(ENV_PREFIX + k.upper())
                 for k in keep}
        write_file(conf, given)
    Outbox.open(cfg.db_path).close()
    pin = pins.reset(cfg.state_dir)
    print(f"device key {path}; config {conf}", file=sys.stderr)
    print(f"driver's page PIN: {pin}  (put it on the dongle's label: only its hash is kept; "
          "`odo-agent pin reset` makes a new one)", file=sys.stderr)
    print(key.public.id)
    return 0


def cmd_enroll(args: argparse.Namespace, cfg: AgentConfig) -> int:
    from agent import daemon

    fleet_token = _fleet_token(cfg.fleet_token)
    key, outbox = _open(cfg)
    assert cfg.broker is not None
    dev = key.public.id
    if daemon.running(cfg.state_dir):
        # The broker takes one connection per client id: let the daemon send it.
        result = enrol.request_via_daemon(outbox, args.wait, fleet_token)
    else:
        from agent import sync  # paho: only without a daemon, which would otherwise send it

        try:
            result = sync.enroll(cfg.broker, key, vin=VIN.get(outbox), fleet_token=fleet_token,
                                 wait_s=args.wait)
        except BrokerError as exc:
            raise Exit(1, str(exc)) from None
        if result.status is not None:
            enrol.save_answer(outbox, result.status, result.reason)
    if result.status == "approved":
        print(f"device {dev} is approved")
        return 0
    if result.status == "rejected":
        raise Exit(1, f"device {dev} was rejected: {result.reason or 'no reason given'}")
    if result.status == "pending":
        print(f"device {dev} is pending: an operator must approve it (odo-backend devices approve {dev})")
    elif enrol.request_pending(outbox):
        print(f"the running daemon is not connected to the broker; it will send the enrolment of {dev} "
              "when it is")
    else:
        print(f"no answer from the backend within {args.wait:.0f} s; the enrolment was sent as device {dev}")
    return EX_PENDING


def cmd_run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    from agent import daemon
    from agent.obd_source import ObdSource
    from agent.power import PowerConfig, PowerPolicy
    from agent.sync import Syncer, SyncSettings
    from agent.vehicle import Vehicle, VehicleConfig

    vcfg = build_table(VehicleConfig, "vehicle", cfg.vehicle)
    pcfg = build_table(PowerConfig, "power", cfg.power)
    fleet_token = _fleet_token(cfg.fleet_token)
    key, outbox = _open(cfg)
    held = daemon.lock(cfg.state_dir)
    if held is None:
        raise Exit(1, f"another `odo-agent run` is using {cfg.state_dir}")
    assert cfg.obd_port is not None and cfg.broker is not None
    clock = Clock(cfg.clock)
    boot = boot_id()
    recorder = Recorder(outbox, key, clock=clock, boot=boot, max_records=cfg.max_records,
                        vin=VIN.get(outbox))
    vehicle = Vehicle(vcfg, VEHICLE.get(outbox))
    source = ObdSource(cfg.obd_port, baudrate=cfg.obd_baudrate)
    obd = daemon.ObdLoop(
        source, vehicle, PowerPolicy(pcfg), recorder, clock=clock, boot=boot,
        retention_days=cfg.retention_days, max_records=cfg.max_records, shutdown_command=cfg.shutdown_command,
    )
    syncer = Syncer(
        cfg.broker, key.public.id, outbox, obd_state=lambda: obd.obd_state, error=lambda: recorder.error,
        enrollment=lambda token: enroll_message(key, recorder.vin, token or fleet_token),
        settings=SyncSettings(resend_after_s=cfg.resend_after_s), boot=boot,
    )
    log.info("odo-agent %s: device %s, adapter %s, broker %s", __version__, key.public.id, cfg.obd_port,
             cfg.broker.display)
    try:
        return daemon.run(obd, syncer, threading.Event())
    finally:
        held.close()


def cmd_confirm(args: argparse.Namespace, cfg: AgentConfig) -> int:
    key, outbox = _open(cfg)
    clock = Clock(cfg.clock)
    s = summ.read(outbox, key.public.id, clock)
    device = s.odo_m
    given = args.km if args.km is not None else args.miles
    unit = "km" if args.km is not None else "mi" if args.miles is not None else cfg.display_unit
    if args.yes:
        odo = given if given is not None else device
        if odo is None:
            raise Exit(2, "the device has no odometer figure yet: give the dashboard figure with --km KM "
                          "or --miles MI")
    else:
        odo = _ask(s, given, cfg.tolerance_m, unit)
    if device is not None and abs(odo - device) > cfg.tolerance_m:
        print(f"warning: {units.show(odo, unit)} differs from the device's {units.show(device, unit)} by "
              f"more than {units.show(cfg.tolerance_m, unit)}", file=sys.stderr)
    if clock.state() != "synced":
        print("warning: the clock is not synchronised; the week may be wrong", file=sys.stderr)
    recorder = Recorder(outbox, key, clock=clock, boot=boot_id(), max_records=cfg.max_records,
                        vin=VIN.get(outbox))
    try:
        rec = recorder.confirm(odo, device)
    except StorageError as exc:
        raise Exit(1, f"not recorded: {exc}") from None
    print(f"confirmed {units.show(odo, unit)} for week {rec.fields['week']} (record {rec.seq}, {odo} m)")
    return 0


def _parse_figure(text: str, unit: str) -> int:
    """What the driver typed, in ``unit``, as metres (km as ``odo-agent confirm --km`` takes it)."""
    return summ.parse_km(text) if unit == "km" else units.parse(text, unit)


def _ask(s: summ.Summary, km_flag: int | None, tolerance_m: int, unit: str) -> int:
    def show(metres: int | None) -> str:
        return units.show(metres, unit)

    print(f"Device odometer:   {show(s.odo_m)}" + (f" ({s.src})" if s.src else ""))
    if s.confirmed:
        print(f"Last confirmed:    {show(s.confirmed.odo_m)} in week {s.confirmed.week}")
        print(f"Since then:        {show(s.since_confirmed_m)}")
    else:
        print("Last confirmed:    never")
    print(f"This week:         {s.week}" + ("" if s.confirmation_due else " (already confirmed)"))
    try:
        for _ in range(3):
            if km_flag is not None:
                odo = km_flag
            else:
                default = f" [Enter = {show(s.odo_m)}]" if s.odo_m is not None else ""
                answer = input(f"Dashboard odometer in {unit}{default}: ").strip()
                if not answer and s.odo_m is not None:
                    odo = s.odo_m
                else:
                    try:
                        odo = _parse_figure(answer, unit)
                    except ValueError as exc:
                        print(exc)
                        continue
            if s.odo_m is not None and abs(odo - s.odo_m) > tolerance_m:
                print(f"That differs from the device's {show(s.odo_m)} by {show(abs(odo - s.odo_m))}.")
            if input(f"Confirm {show(odo)}? [y/N] ").strip().lower() in ("y", "yes"):
                return odo
            if km_flag is not None:
                break
        raise Exit(1, "not confirmed")
    except EOFError:
        raise Exit(1, "not confirmed (no answer)") from None


def cmd_status(args: argparse.Namespace, cfg: AgentConfig) -> int:
    key, outbox = _open(cfg)
    s = summ.read(outbox, key.public.id, Clock(cfg.clock))
    print(json.dumps(s.as_json(), sort_keys=True) if args.json else summ.text(s))
    return 0


def cmd_ui(args: argparse.Namespace, cfg: AgentConfig) -> int:
    from agent import ui

    key, outbox = _open(cfg)
    try:
        return ui.serve(cfg, key, outbox, args.listen)
    except pins.PinError as exc:
        raise Exit(EX_CONFIG, str(exc)) from None
    except ui.ListenError as exc:
        raise Exit(1, str(exc)) from None


def _read_pin() -> str:
    """The new PIN: asked twice on a terminal, else the first line of stdin."""
    if sys.stdin.isatty():
        typed = getpass.getpass("New PIN for the driver's page (6 to 12 digits): ")
        if getpass.getpass("The same PIN again: ") != typed:
            raise Exit(1, "the two PINs differ; nothing changed")
    else:
        typed = sys.stdin.readline(64).strip()
    try:
        return pins.check_pin(typed)
    except pins.PinError as exc:
        raise Exit(2, f"{exc}; nothing changed") from None


def cmd_pin(args: argparse.Namespace, cfg: AgentConfig) -> int:
    try:
        identity.load(cfg.state_dir)          # a device's state directory, made by init
    except IdentityError as exc:
        raise Exit(EX_CONFIG, str(exc)) from None
    if args.pin_command == "set":
        pins.store(cfg.state_dir, _read_pin())
        print("PIN set; browsers signed in to the driver's page must sign in again", file=sys.stderr)
        return 0
    print(pins.reset(cfg.state_dir))
    print("a new PIN (put it on the dongle's label); browsers signed in to the driver's page must sign "
          "in again", file=sys.stderr)
    return 0


def cmd_remind(args: argparse.Namespace, cfg: AgentConfig) -> int:
    key, outbox = _open(cfg)
    s = summ.read(outbox, key.public.id, Clock(cfg.clock))
    if not s.confirmation_due:
        print(f"week {s.week} is already confirmed")
        return 0
    CONFIRMATION_DUE.put(outbox, ConfirmationDue(s.week, now_ms()))
    print(f"confirmation due for week {s.week}: run `odo-agent confirm` or open the driver's page")
    return 0


COMMANDS = {
    "init": (cmd_init, ("obd_port", "broker"), "flag"),
    "enroll": (cmd_enroll, ("broker",), "file"),
    "run": (cmd_run, ("obd_port", "broker"), "file"),
    "confirm": (cmd_confirm, (), "file"),
    "status": (cmd_status, (), "file"),
    "ui": (cmd_ui, (), "file"),
    "pin": (cmd_pin, (), "file"),
    "remind": (cmd_remind, (), "file"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    fn, require, missing_source = COMMANDS[args.command]
    try:
        cfg = load(_flags(args), require=require, missing_source=missing_source)
        level = cfg.log_level or ("info" if args.command in ("run", "ui") else "warning")
        logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
        return fn(args, cfg)
    except ConfigError as exc:
        where = {"flag": "", "env": " (from the environment)", "file": " (in the config file)"}[exc.source]
        print(f"odo-agent {args.command}: {exc}{where}", file=sys.stderr)
        return exc.exit_code
    except IdentityError as exc:
        print(f"odo-agent {args.command}: {exc}", file=sys.stderr)
        return EX_CONFIG
    except ClockError as exc:
        print(f"odo-agent {args.command}: {exc}", file=sys.stderr)
        return 1
    except Exit as exc:
        if str(exc):
            print(f"odo-agent {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
