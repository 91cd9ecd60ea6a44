"""The fleet partner's rules file (docs/DESIGN.md §5), read once and validated strictly.

    version = "acme-2026-11"
    effective_from = 2027-01-01T00:00:00Z   # to publish: from when it decides credits (with an offset)
    max_speed_kph = 250
    max_clock_ahead_ms = 600000      # optional: a record dated later than its receipt by more is clock_ahead
    reward_backfill_days = 35        # optional: rewards for readings from this long before approval on
    rollback_tolerance_m = 100       # optional: a vehicle's odometer may read this much below its highest
    [[rule]]  id, on, and the keys of one of three kinds:
        weekly    per = "week", milli_tokens, tolerance_m?           (on = "confirmation" or "odometer")
        distance  milli_tokens_per_km, cap_milli_tokens_per_week?    (on = "trip")
        streak    every_weeks, milli_tokens, weekly?                 (on = as its weekly rule)
    [[catalogue]]  item, milli_tokens

A streak counts the weeks that its weekly rule rewarded (``weekly`` names that
rule; it may be left out when the file has exactly one weekly rule). Integers
only; an unknown key, a wrong type, a float or a negative amount is a
:class:`RulesError` naming the key.

``effective_from`` is a TOML offset datetime (a local datetime or a date, without an offset,
is refused: it would mean another instant on every host); kept as Unix milliseconds. A file
without it is still read (``Rules.effective_from`` is None): :mod:`backend.ledger.contracts`
publishes such a file as in force from the beginning of time, which only a first version can
be.
"""

from __future__ import annotations

import datetime
import logging
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from backend.errors import RulesError

log = logging.getLogger(__name__)

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}")
#: A rules version, as the file's ``version`` names it.
VERSION_RE = _VERSION
MAX_AMOUNT = 10**15
#: The largest rules file read: a few rules and a catalogue are a few KiB.
MAX_RULES_BYTES = 1024 * 1024
#: The latest ``effective_from``: times are Unix ms, JSON-safe integers.
MAX_EFFECTIVE_MS = 2**53 - 1
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


@dataclass(frozen=True)
class WeeklyRule:
    """At most one reward per device and ISO week: for a confirmation within tolerance, or
    (``on = "odometer"``) for a week in which the device sent a reading."""

    id: str
    on: str
    milli_tokens: int
    tolerance_m: int | None            # None: the figures are not compared


@dataclass(frozen=True)
class DistanceRule:
    """Per accepted trip, per km driven, capped per device and ISO week."""

    id: str
    on: str
    milli_tokens_per_km: int
    cap_milli_tokens_per_week: int | None


@dataclass(frozen=True)
class StreakRule:
    """A bonus for each run of ``every_weeks`` consecutive weeks rewarded by ``weekly``."""

    id: str
    on: str
    every_weeks: int
    milli_tokens: int
    weekly: str


Rule = WeeklyRule | DistanceRule | StreakRule


#: Defaults of the optional verification settings.
DEFAULT_MAX_CLOCK_AHEAD_MS = 10 * 60 * 1000
DEFAULT_REWARD_BACKFILL_DAYS = 35
DEFAULT_ROLLBACK_TOLERANCE_M = 100


@dataclass(frozen=True)
class Rules:
    version: str
    max_speed_kph: int
    rules: tuple[Rule, ...]
    catalogue: Mapping[str, int]
    source: str = ""
    max_clock_ahead_ms: int = DEFAULT_MAX_CLOCK_AHEAD_MS
    reward_backfill_days: int = DEFAULT_REWARD_BACKFILL_DAYS
    rollback_tolerance_m: int = DEFAULT_ROLLBACK_TOLERANCE_M
    #: The file's text, when read from one (:func:`load_rules`): what the log keeps of it.
    text: str = field(default="", repr=False, compare=False)
    #: From when it decides credits, Unix ms; None when the file does not say.
    effective_from: int | None = None

    def rule(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)


class _Table:
    """One TOML table being read: every key must be used, with the right type."""

    def __init__(self, where: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise RulesError(f"{where}: must be a table")
        self.where = where
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def _value(self, key: str, required: bool) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise RulesError(f"{self.where}{key}: missing")
            return None
        return self.data[key]

    def string(self, key: str, pattern: re.Pattern[str], required: bool = True) -> str | None:
        value = self._value(key, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise RulesError(f"{self.where}{key}: must be a string, got {_show(value)}")
        if not pattern.fullmatch(value):
            raise RulesError(f"{self.where}{key}: {value!r} is not a valid name")
        return value

    def integer(self, key: str, minimum: int, required: bool = True) -> int | None:
        value = self._value(key, required)
        if value is None:
            return None
        if isinstance(value, float):
            raise RulesError(f"{self.where}{key}: must be an integer, not a float ({value}); "
                             "amounts are milli-tokens and distances metres")
        if not isinstance(value, int) or isinstance(value, bool):
            raise RulesError(f"{self.where}{key}: must be an integer, got {_show(value)}")
        if value < minimum:
            what = "negative" if value < 0 else "too small"
            raise RulesError(f"{self.where}{key}: {value} is {what} (at least {minimum})")
        if value > MAX_AMOUNT:
            raise RulesError(f"{self.where}{key}: {value} is too large")
        return value

    def instant(self, key: str) -> int | None:
        """An optional TOML offset datetime, as Unix milliseconds."""
        value = self._value(key, False)
        if value is None:
            return None
        example = "e.g. 2027-01-01T00:00:00Z"
        if isinstance(value, str):
            raise RulesError(f"{self.where}{key}: must be a TOML datetime, not a string ({value!r}); "
                             f"write it without quotes, {example}")
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None or value.utcoffset() is None:
                raise RulesError(f"{self.where}{key}: {value.isoformat()} has no offset; give one "
                                 f"(Z for UTC), {example}")
            if value.microsecond % 1000:
                raise RulesError(f"{self.where}{key}: {value.isoformat()} is finer than a millisecond")
            ms = (value - _EPOCH) // datetime.timedelta(milliseconds=1)
            if not 0 <= ms <= MAX_EFFECTIVE_MS:
                raise RulesError(f"{self.where}{key}: {value.isoformat()} is before 1970 or too far ahead")
            return ms
        if isinstance(value, datetime.date | datetime.time):
            raise RulesError(f"{self.where}{key}: {value.isoformat()} is a date or a time alone; give a "
                             f"date and time with an offset, {example}")
        raise RulesError(f"{self.where}{key}: must be a datetime with an offset, got {_show(value)}")

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise RulesError(f"{self.where}{unknown[0]}: unknown key")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _req(value: Any) -> Any:
    assert value is not None
    return value


def _rule(i: int, data: Any) -> Rule:
    t = _Table(f"rule[{i}].", data)
    rule_id = _req(t.string("id", _NAME))
    t.where = f"rule[{i}] ({rule_id}): "
    on = t.data.get("on")
    t.used.add("on")
    if on not in ("confirmation", "trip", "odometer"):
        raise RulesError(f"{t.where}on: must be \"confirmation\", \"trip\" or \"odometer\", got {on!r}")
    rule: Rule
    if "per" in t.data:
        per = t.data["per"]
        t.used.add("per")
        if per != "week":
            raise RulesError(f"{t.where}per: only \"week\" is supported, got {per!r}")
        if on == "trip":
            raise RulesError(f"{t.where}on: a weekly rule applies to \"confirmation\" or \"odometer\" "
                             "records, not 'trip'")
        if on != "confirmation" and "tolerance_m" in t.data:
            raise RulesError(f"{t.where}tolerance_m: only a rule on confirmations compares figures")
        rule = WeeklyRule(rule_id, on, _req(t.integer("milli_tokens", 1)), t.integer("tolerance_m", 0, False))
    elif "milli_tokens_per_km" in t.data:
        _need_on(t, on, "trip", "a distance rule")
        rule = DistanceRule(rule_id, on, _req(t.integer("milli_tokens_per_km", 1)),
                            t.integer("cap_milli_tokens_per_week", 1, False))
    elif "every_weeks" in t.data:
        weekly = t.string("weekly", _NAME, False) or ""
        rule = StreakRule(rule_id, on, _req(t.integer("every_weeks", 1)), _req(t.integer("milli_tokens", 1)),
                          weekly)
    else:
        raise RulesError(f"{t.where}needs per = \"week\", milli_tokens_per_km or every_weeks "
                         "(a weekly, distance or streak rule)")
    t.finish()
    return rule


def _need_on(t: _Table, on: str, wanted: str, what: str) -> None:
    if on != wanted:
        raise RulesError(f"{t.where}on: {what} applies to {wanted!r} records, not {on!r}")


def parse(data: Mapping[str, Any], source: str = "rules") -> Rules:
    """Validate a decoded TOML document into :class:`Rules`."""
    try:
        return _parse(dict(data), source)
    except RulesError as exc:
        raise RulesError(f"{source}: {exc}") from None


def _parse(data: dict[str, Any], source: str) -> Rules:
    top = _Table("", data)
    version = _req(top.string("version", _VERSION))
    effective_from = top.instant("effective_from")
    max_speed = _req(top.integer("max_speed_kph", 1))
    ahead = top.integer("max_clock_ahead_ms", 0, False)
    backfill = top.integer("reward_backfill_days", 0, False)
    tolerance = top.integer("rollback_tolerance_m", 0, False)
    raw_rules = top._value("rule", False) or []
    if not isinstance(raw_rules, list):
        raise RulesError("rule: must be an array of tables ([[rule]])")
    rules = [_rule(i, r) for i, r in enumerate(raw_rules)]
    ids = [r.id for r in rules]
    for i, rid in enumerate(ids):
        if rid in ids[:i]:
            raise RulesError(f"rule[{i}].id: {rid!r} is used twice")
    weeklies = [r.id for r in rules if isinstance(r, WeeklyRule)]
    for i, r in enumerate(rules):
        if not isinstance(r, StreakRule):
            continue
        if not r.weekly:
            if len(weeklies) != 1:
                raise RulesError(f"rule[{i}] ({r.id}): weekly: missing; name the weekly rule whose "
                                 f"weeks the streak counts (rules: {', '.join(weeklies) or 'none'})")
            rules[i] = StreakRule(r.id, r.on, r.every_weeks, r.milli_tokens, weeklies[0])
        elif r.weekly not in weeklies:
            raise RulesError(f"rule[{i}] ({r.id}): weekly: {r.weekly!r} is not a weekly rule of this file")
        streak = rules[i]
        assert isinstance(streak, StreakRule)
        counted = next(w for w in rules if w.id == streak.weekly)
        if counted.on != r.on:
            raise RulesError(f"rule[{i}] ({r.id}): on: must be {counted.on!r}, as its weekly rule "
                             f"{counted.id!r}")
    raw_cat = top._value("catalogue", False) or []
    if not isinstance(raw_cat, list):
        raise RulesError("catalogue: must be an array of tables ([[catalogue]])")
    catalogue: dict[str, int] = {}
    for i, item in enumerate(raw_cat):
        t = _Table(f"catalogue[{i}].", item)
        name = _req(t.string("item", _NAME))
        if name in catalogue:
            raise RulesError(f"catalogue[{i}].item: {name!r} is listed twice")
        catalogue[name] = _req(t.integer("milli_tokens", 1))
        t.finish()
    top.finish()
    return Rules(version, max_speed, tuple(rules), MappingProxyType(catalogue), source,
                 DEFAULT_MAX_CLOCK_AHEAD_MS if ahead is None else ahead,
                 DEFAULT_REWARD_BACKFILL_DAYS if backfill is None else backfill,
                 DEFAULT_ROLLBACK_TOLERANCE_M if tolerance is None else tolerance,
                 effective_from=effective_from)


def load_rules(path: str | Path) -> Rules:
    """Read and validate a rules file; raise :class:`RulesError` naming what is wrong."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_RULES_BYTES + 1)
        if len(data) > MAX_RULES_BYTES:
            raise RulesError(f"{p}: larger than {MAX_RULES_BYTES} bytes")
        text = data.decode("utf-8")
    except OSError as exc:
        raise RulesError(f"{p}: cannot read the rules file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise RulesError(f"{p}: not UTF-8") from None
    rules = loads(text, str(p))
    log.info("rules %s from %s: %d rules, %d catalogue items", rules.version, p, len(rules.rules),
             len(rules.catalogue))
    return rules


def loads(text: str, source: str = "rules") -> Rules:
    """Validate the text of a rules file (as stored when it was published); it is kept in
    ``Rules.text``."""
    if len(text.encode("utf-8")) > MAX_RULES_BYTES:
        raise RulesError(f"{source}: larger than {MAX_RULES_BYTES} bytes")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{source}: not valid TOML: {exc}") from None
    except (ValueError, RecursionError) as exc:        # what tomllib itself cannot take
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RulesError(f"{source}: not valid TOML: {why}") from None
    return replace(parse(document, source), text=text)
