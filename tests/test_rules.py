from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.ledger.rules import DistanceRule, RulesError, StreakRule, WeeklyRule, load_rules, parse
from tests.ledger_support import RULES_DOC

EXAMPLE = Path(__file__).resolve().parent.parent / "rules" / "example.toml"


def test_example_file_loads() -> None:
    rules = load_rules(EXAMPLE)
    assert rules.version == "example-2026-11"
    assert rules.max_speed_kph == 250
    weekly, distance, streak = rules.rules
    assert weekly == WeeklyRule("weekly-confirmation", "confirmation", 10000, 2000)
    assert distance == DistanceRule("distance", "trip", 10, 5000)
    assert streak == StreakRule("streak", "confirmation", 4, 20000, "weekly-confirmation")
    assert rules.catalogue["tyre-voucher"] == 500000
    with pytest.raises(TypeError):
        rules.catalogue["free"] = 1  # type: ignore[index]


def test_streak_takes_the_only_weekly_rule() -> None:
    rules = parse(RULES_DOC)
    streak = rules.rule("streak")
    assert isinstance(streak, StreakRule) and streak.weekly == "weekly-confirmation"


def _doc(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(RULES_DOC)
    for path, value in changes.items():
        target: Any = doc
        parts = path.split("__")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is _DELETE:
            del target[parts[-1]]
        else:
            target[parts[-1]] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(("changes", "named"), [
    ({"colour": "blue"}, "colour: unknown key"),
    ({"version": _DELETE}, "version: missing"),
    ({"version": 3}, "version: must be a string"),
    ({"max_speed_kph": 250.0}, "max_speed_kph: must be an integer, not a float"),
    ({"max_speed_kph": "fast"}, "max_speed_kph: must be an integer"),
    ({"max_speed_kph": True}, "max_speed_kph: must be an integer"),
    ({"rule__0__milli_tokens": 10.5},
     "rule[0] (weekly-confirmation): milli_tokens: must be an integer, not a float"),
    ({"rule__0__milli_tokens": -5}, "rule[0] (weekly-confirmation): milli_tokens: -5 is negative"),
    ({"rule__0__tolerance_m": -1}, "tolerance_m: -1 is negative"),
    ({"rule__0__bonus": 1}, "rule[0] (weekly-confirmation): bonus: unknown key"),
    ({"rule__0__per": "day"}, "per: only \"week\""),
    ({"rule__0__on": "trip"}, "rule[0] (weekly-confirmation): on:"),
    ({"rule__0__on": "event"}, "on: must be"),
    ({"rule__1__on": "confirmation"}, "rule[1] (distance): on: a distance rule applies to 'trip'"),
    ({"rule__1__milli_tokens_per_km": -10}, "rule[1] (distance): milli_tokens_per_km: -10 is negative"),
    ({"rule__1__cap_milli_tokens_per_week": 5e3},
     "cap_milli_tokens_per_week: must be an integer, not a float"),
    ({"rule__1__id": "weekly-confirmation"}, "rule[1].id: 'weekly-confirmation' is used twice"),
    ({"rule__1__id": "Bad Name"}, "rule[1].id: 'Bad Name' is not a valid name"),
    ({"rule__2__weekly": "distance"}, "rule[2] (streak): weekly: 'distance' is not a weekly rule"),
    ({"rule__2__every_weeks": 0}, "every_weeks: 0 is too small"),
    ({"rule__2__milli_tokens": _DELETE}, "rule[2] (streak): milli_tokens: missing"),
    ({"rule": {"id": "x"}}, "rule: must be an array of tables"),
    ({"catalogue__0__milli_tokens": -1}, "catalogue[0].milli_tokens: -1 is negative"),
    ({"catalogue__1__item": "tyre-voucher"}, "catalogue[1].item: 'tyre-voucher' is listed twice"),
    ({"catalogue__0__price": 3}, "catalogue[0].price: unknown key"),
])
def test_errors_name_the_key(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(RulesError) as err:
        parse(_doc(**changes), "fleet.toml")
    assert named in str(err.value)
    assert str(err.value).startswith("fleet.toml: ")


def test_a_streak_needs_a_named_weekly_rule_when_there_are_two() -> None:
    doc = copy.deepcopy(RULES_DOC)
    doc["rule"].append({"id": "weekly-2", "on": "confirmation", "per": "week", "milli_tokens": 1})
    with pytest.raises(RulesError, match=r"rule\[2\] \(streak\): weekly: missing"):
        parse(doc)
    doc["rule"][2]["weekly"] = "weekly-2"
    streak = parse(doc).rule("streak")
    assert isinstance(streak, StreakRule) and streak.weekly == "weekly-2"


def test_weekly_on_odometer_cannot_compare_figures() -> None:
    doc = _doc(rule__0__on="odometer")
    with pytest.raises(RulesError, match="tolerance_m: only a rule on confirmations"):
        parse(doc)
    del doc["rule"][0]["tolerance_m"]
    with pytest.raises(RulesError, match=r"rule\[2\] \(streak\): on: must be 'odometer'"):
        parse(doc)
    doc["rule"][2]["on"] = "odometer"
    weekly = parse(doc).rule("weekly-confirmation")
    assert weekly == WeeklyRule("weekly-confirmation", "odometer", 10000, None)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read the rules file"):
        load_rules(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('version = "v1"\nmax_speed_kph = 250\n[[rule]\n')
    with pytest.raises(RulesError, match=r"bad.toml: not valid TOML: .*line 3"):
        load_rules(bad)
    floats = tmp_path / "floats.toml"
    floats.write_text('version = "v1"\nmax_speed_kph = 250\n[[catalogue]]\nitem = "x"\nmilli_tokens = 1.5\n')
    with pytest.raises(RulesError, match=r"floats.toml: catalogue\[0\].milli_tokens: must be an integer"):
        load_rules(floats)


@given(st.sampled_from(["rule__0__milli_tokens", "rule__1__milli_tokens_per_km",
                        "rule__1__cap_milli_tokens_per_week", "rule__2__milli_tokens",
                        "catalogue__0__milli_tokens", "rule__0__tolerance_m"]),
       st.one_of(st.floats(allow_nan=False), st.integers(max_value=-1), st.text(max_size=3), st.booleans()))
def test_any_non_integer_or_negative_amount_is_refused(path: str, value: Any) -> None:
    key = path.split("__")[-1]
    with pytest.raises(RulesError, match=key):
        parse(_doc(**{path: value}))
