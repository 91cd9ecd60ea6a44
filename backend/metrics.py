"""Prometheus metrics, through ``prometheus-client``.

Counters and the histogram live in this process (:data:`REGISTRY`, fed by the ingest); the
fleet gauges are read from the database at each scrape by :class:`FleetCollector`. Exposed::

    odo_records_total{reason="",status="accepted"} 1234.0
    odo_messages_refused_total{channel="records",reason="too_large"} 3.0
    odo_ingest_errors_total 0.0
    odo_mqtt_session_taken_over_total 0.0
    odo_ingest_seconds_bucket{le="0.01"} 17.0
    odo_ingest_queued 3.0
    odo_storage_failing 0.0
    odo_devices_online 12.0
    odo_backlog_total 40.0

Each :class:`Registry` has its own :class:`prometheus_client.CollectorRegistry`, never the
library's global one, so tests can make as many as they like.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# No ``*_created`` series: the metrics are exactly the ones listed above. (A process-wide switch
# of the library; this process exports nothing else.)
disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it unannotated

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4     # the text format every Prometheus reads
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Merge delay buckets, in seconds: the goal is a p99 of at most 2 s under full load.
MERGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)

@dataclass(frozen=True)
class FleetFigures:
    """What the database says of the fleet at a scrape."""

    online: int                     # devices whose agent is connected (last status message)
    backlog: int                    # records waiting on the agents, as they last reported
    held: int = 0                   # devices flagged for a rollback, rewards held
    evidence_kept: int = 0          # refused messages kept for operators
    evidence_dropped: int = 0       # refused messages past their budget: counted, not stored
    log_entries: int = 0            # entries in the transparency log
    log_queued: int = 0             # entries stored, waiting for the sequencer
    witness_lag: int = 0            # entries of the latest checkpoint not yet cosigned by every witness
    witnesses_failing: int = 0      # witnesses whose last push failed


#: Reads the fleet's figures from the database; blocking.
FleetSource = Callable[[], FleetFigures]

_GAUGES = {
    "odo_devices_online": ("online", "Devices whose agent is connected (last status message)."),
    "odo_backlog_total": ("backlog", "Records waiting on the agents, as they last reported."),
    "odo_devices_held": ("held", "Devices flagged for an odometer rollback: rewards wait for an operator."),
    "odo_evidence_kept": ("evidence_kept", "Refused messages kept for operators (within their budgets)."),
    "odo_evidence_dropped": ("evidence_dropped", "Refused messages past their budget: counted, not stored."),
    "odo_log_entries": ("log_entries", "Entries in the transparency log's tree."),
    "odo_log_queued": ("log_queued", "Log entries stored and waiting for the sequencer."),
    "odo_log_witness_lag": ("witness_lag",
                            "Entries of the latest checkpoint that not every witness has cosigned."),
    "odo_log_witnesses_failing": ("witnesses_failing", "Witnesses whose last push failed."),
}


class FleetCollector(Collector):
    """The fleet gauges, read through ``source`` at each scrape; none while there is no source.

    ``collect`` blocks on the database: call it (through ``generate_latest``) off the event loop.
    """

    def __init__(self, source: FleetSource | None = None) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        # What the registry checks for clashes, without touching the database.
        return [GaugeMetricFamily(name, text) for name, (_, text) in _GAUGES.items()]

    def collect(self) -> Iterable[Metric]:
        source = self.source
        if source is None:
            return
        figures = source()
        for name, (field_name, text) in _GAUGES.items():
            yield GaugeMetricFamily(name, text, value=getattr(figures, field_name))


class Registry:
    """The ingest's counters and its batch-time histogram, plus the fleet gauges; safe across threads."""

    def __init__(self, buckets: Sequence[float] = BUCKETS, fleet: FleetSource | None = None) -> None:
        self.registry = CollectorRegistry()
        # Counters are named as exposed: the library drops a trailing ``_total`` and adds it back on output.
        r = self.registry
        self._records = Counter("odo_records_total", "Records handled by this process's ingest, by outcome.",
                                ["status", "reason"], registry=r)
        self._refused = Counter("odo_messages_refused_total",
                                "Messages refused whole by this process's ingest, by topic and reason.",
                                ["channel", "reason"], registry=r)
        self._errors = Counter("odo_ingest_errors_total",
                               "Batches that failed with an internal error (no ack sent).", registry=r)
        self._taken_over = Counter("odo_mqtt_session_taken_over_total",
                                   "Times another client took this process's MQTT session (reason 142).",
                                   registry=r)
        self._seconds = Histogram("odo_ingest_seconds",
                                  "Time to verify, store and credit one batch of records.",
                                  buckets=tuple(buckets), registry=r)
        self._merge = Histogram("odo_log_merge_delay_seconds",
                                "Time from storing a log entry to integrating it into the tree.",
                                buckets=MERGE_BUCKETS, registry=r)
        self._queued = Gauge("odo_ingest_queued",
                             "Messages received and waiting in the ingest's worker queues.", registry=r)
        self._queued.set_function(lambda: 0)
        self._failing = Gauge("odo_storage_failing",
                              "1 while the database refuses writes (full disk, I/O error): nothing is acked.",
                              registry=r)
        self._storage_lock = threading.Lock()
        self.storage_problem: str | None = None
        self.fleet = FleetCollector(fleet)
        self.registry.register(self.fleet)

    def watch_queue(self, length: Callable[[], int]) -> None:
        """Read ``odo_ingest_queued`` through ``length`` from now on (the last call wins)."""
        self._queued.set_function(length)

    def storage_failed(self, reason: str) -> bool:
        """The database refused a write for ``reason``; True when it stored until now."""
        with self._storage_lock:
            first = self.storage_problem is None
            self.storage_problem = reason
            self._failing.set(1)
        return first

    def storage_works(self) -> bool:
        """A write went through; True when the database had been refusing them."""
        with self._storage_lock:
            was = self.storage_problem is not None
            self.storage_problem = None
            self._failing.set(0)
        return was

    def watch_fleet(self, source: FleetSource | None) -> None:
        """Read the fleet gauges through ``source`` from now on (the last call wins; ``None``: no gauges)."""
        self.fleet.source = source

    def count_records(self, outcomes: Iterable[tuple[str, str]]) -> None:
        for (status, reason), n in collections.Counter(outcomes).items():
            self._records.labels(status, reason).inc(n)

    def count_refused(self, channel: str, reason: str) -> None:
        self._refused.labels(channel, reason).inc()

    def count_error(self) -> None:
        self._errors.inc()

    def count_session_taken_over(self) -> None:
        self._taken_over.inc()

    def sessions_taken_over(self) -> int:
        """How many times this process's MQTT session was taken over."""
        return sum(int(sample.value) for family in self._taken_over.collect() for sample in family.samples
                   if sample.name == "odo_mqtt_session_taken_over_total")

    def observe_batch(self, seconds: float) -> None:
        self._seconds.observe(seconds)

    def observe_merge_delay(self, seconds: float) -> None:
        self._merge.observe(seconds)

    def records(self, status: str, reason: str = "") -> int:
        """How many records this process counted with that outcome (never reads the database)."""
        wanted = {"status": status, "reason": reason}
        return sum(int(sample.value) for family in self._records.collect() for sample in family.samples
                   if sample.name == "odo_records_total" and sample.labels == wanted)

    def refused(self, channel: str, reason: str) -> int:
        """How many messages of ``channel`` this process refused whole for ``reason``."""
        wanted = {"channel": channel, "reason": reason}
        return sum(int(sample.value) for family in self._refused.collect() for sample in family.samples
                   if sample.name == "odo_messages_refused_total" and sample.labels == wanted)

    def exposition(self) -> bytes:
        """The text exposition (:data:`CONTENT_TYPE`); reads the database if a fleet source is set."""
        return generate_latest(self.registry)


#: This process's metrics.
REGISTRY = Registry()
