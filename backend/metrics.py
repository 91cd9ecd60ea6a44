"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand.

Counters and the histogram live in this process (:data:`REGISTRY`, fed by the ingest); the
fleet gauges are read from the database at each scrape::

    odo_records_total{status="accepted",reason=""} 1234
    odo_ingest_seconds_bucket{le="0.01"} 17
    odo_devices_online 12
    odo_backlog_total 40
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Registry:
    """The ingest's counters and its batch-time histogram; safe across threads."""

    def __init__(self, buckets: Sequence[float] = BUCKETS) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], int] = {}
        self._errors = 0
        self._buckets = tuple(buckets)
        self._counts = [0] * len(self._buckets)
        self._sum = 0.0
        self._n = 0

    def count_records(self, outcomes: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            for key in outcomes:
                self._records[key] = self._records.get(key, 0) + 1

    def count_error(self) -> None:
        with self._lock:
            self._errors += 1

    def observe_batch(self, seconds: float) -> None:
        with self._lock:
            self._n += 1
            self._sum += seconds
            for i, bound in enumerate(self._buckets):
                if seconds <= bound:
                    self._counts[i] += 1

    def records(self, status: str, reason: str = "") -> int:
        with self._lock:
            return self._records.get((status, reason), 0)

    def render(self, devices_online: int | None = None, backlog_total: int | None = None) -> str:
        with self._lock:
            records = sorted(self._records.items())
            counts, total, n, errors = list(self._counts), self._sum, self._n, self._errors
        out = ["# HELP odo_records_total Records handled by this process's ingest, by outcome.",
               "# TYPE odo_records_total counter"]
        out += [f'odo_records_total{{status="{_label(s)}",reason="{_label(r)}"}} {v}'
                for (s, r), v in records]
        out += ["# HELP odo_ingest_errors_total Batches that failed with an internal error (no ack sent).",
                "# TYPE odo_ingest_errors_total counter", f"odo_ingest_errors_total {errors}",
                "# HELP odo_ingest_seconds Time to verify, store and credit one batch of records.",
                "# TYPE odo_ingest_seconds histogram"]
        out += [f'odo_ingest_seconds_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self._buckets, counts,
                                                                                      strict=True)]
        out += [f'odo_ingest_seconds_bucket{{le="+Inf"}} {n}', f"odo_ingest_seconds_sum {_number(total)}",
                f"odo_ingest_seconds_count {n}"]
        if devices_online is not None:
            out += ["# HELP odo_devices_online Devices whose agent is connected (last status message).",
                    "# TYPE odo_devices_online gauge", f"odo_devices_online {devices_online}"]
        if backlog_total is not None:
            out += ["# HELP odo_backlog_total Records waiting on the agents, as they last reported.",
                    "# TYPE odo_backlog_total gauge", f"odo_backlog_total {backlog_total}"]
        return "\n".join(out) + "\n"


#: This process's metrics.
REGISTRY = Registry()
