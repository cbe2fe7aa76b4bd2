"""The buffer daemon's metrics: counters, histograms and gauges (mixed into ``BufferService``).

Every counter also lands in ``counts`` (what ``StatsRequest`` returns). The ingest path counts
and observes per group, so metric children are looked up once and cached; gauges are read when
scraped (``set_function``), so the loop spends nothing on them.
"""

from __future__ import annotations

from collections import Counter


class BufferMetrics:
    """Needs ``self.metrics`` (``areal_like.metrics.Metrics``) and the state the gauges read."""

    def _declare_metrics(self) -> None:
        """Create every counter up front so dashboards see zeros, not missing series."""
        self.counts: Counter[str] = Counter()
        self._metric_children: dict[tuple, object] = {}  # (name, labels) -> metric child
        self._counters: dict[str, object] = {}  # key in self.counts -> its counter (child)
        self._latency: dict[str, object] = {}  # request type -> its request_seconds histogram child
        for name in ("groups_accepted", "groups_duplicate", "groups_consumed", "credits_granted", "credits_expired",
                     "credits_reissued", "wal_bytes_written", "batches_redelivered", "groups_redelivered"):
            self.metrics.counter(f"buffer/{name}", name.replace("_", " "))
        for name, reasons in (("groups_dropped", ("stale", "equal_rewards", "max_tokens", "unreadable")),
                              ("rejected", ("decode", "unknown_lease", "lease_mismatch", "future_version"))):
            counter = self.metrics.counter(f"buffer/{name}", name.replace("_", " "), ("reason",))
            for reason in reasons:
                counter.labels(reason=reason)
        self._declare_gauges()

    def _count(self, name: str, n: int = 1, **labels: str) -> None:
        if not n:
            return
        key = "_".join([name, *labels.values()]) if labels else name
        self.counts[key] += n
        if (counter := self._counters.get(key)) is None:  # the ingest path counts twice per group
            counter = self._counters[key] = self._metric_child("counter", f"buffer/{name}", name.replace("_", " "),
                                                               **labels)
        counter.inc(n)

    def _metric_child(self, kind: str, name: str, doc: str, buckets=None, **labels: str):
        """The metric (or its labelled child), looked up once: the ingest path counts per group."""
        key = (name, *labels.items())
        child = self._metric_children.get(key)
        if child is None:
            kw = {"buckets": buckets} if kind == "histogram" else {}
            metric = getattr(self.metrics, kind)(name, doc, tuple(labels), **kw)
            child = self._metric_children[key] = metric.labels(**labels) if labels else metric
        return child

    def _declare_gauges(self) -> None:
        """Gauges read the state when scraped (reads of ints, safe from the metrics thread), so the
        loop spends nothing on them per request."""
        groups = self.metrics.gauge("buffer/groups", "groups by state", labels=("state",))
        groups.labels(state="in_flight").set_function(lambda: self.ledger.in_flight)
        groups.labels(state="stored").set_function(lambda: len(self.store))
        groups.labels(state="in_transit").set_function(self._in_transit_groups)
        for name, doc, read in (
                ("buffer/trainer_version", "", lambda: self.version),
                ("buffer/max_staleness", "the staleness bound eta (for alerts)", lambda: self.cfg.max_staleness),
                ("buffer/roster_size", "", lambda: len(self.roster)),
                ("buffer/started", "admission counter (groups holding a slot)", lambda: self.ledger.started),
                ("buffer/stored_bytes", "frame bytes of stored groups", lambda: self.store.nbytes),
                ("buffer/wal_bytes", "bytes of WAL segments on disk", lambda: self.wal.disk_bytes)):
            self.metrics.gauge(name, doc).set_function(read)

    def _observe_latency(self, kind: str, seconds: float) -> None:
        if (latency := self._latency.get(kind)) is None:
            latency = self._latency[kind] = self._metric_child("histogram", "buffer/request_seconds",
                                                               "request latency by type", type=kind)
        latency.observe(seconds)
