"""What the fuzz tests share: how long they run, and how many cases they tried.

The suite's run is bounded (about a minute and a half for every fuzz test together on a
two-core machine); ``ODO_FUZZ_LONG=1`` runs each with many times the cases. The counts are
printed at the end of each fuzz module, so that a run shows what it covered."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator

import pytest

LONG = os.environ.get("ODO_FUZZ_LONG", "") not in ("", "0")
#: Cases tried, by what was fuzzed (a case is one input handed to the code under test).
COUNTS: Counter[str] = Counter()


def count(name: str, n: int = 1) -> None:
    COUNTS[name] += n


def report(request: pytest.FixtureRequest, prefix: str) -> Iterator[None]:
    """Yield, then print the counts whose names start with ``prefix`` (a module's fixture)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"fuzz cases: {name}: {n}" for name, n in sorted(COUNTS.items()) if name.startswith(prefix)]
    total = sum(n for name, n in COUNTS.items() if name.startswith(prefix))
    if reporter is None or not lines:
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.ensure_newline()
        for line in [*lines, f"fuzz cases: {prefix.strip()} in all: {total}"]:
            reporter.write_line(line)
