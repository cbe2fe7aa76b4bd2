"""The buffer daemon's metrics. Every counter also lands in ``counts`` (``StatsRequest``); gauges
are read when scraped. All counting happens on the service's loop thread except ``refused`` (the
security monitor's threads).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable

from areal_like.net.metrics import Metrics
from areal_like.net.security import REFUSAL_REASONS

COUNTERS = ("groups_accepted", "groups_duplicate", "groups_consumed", "credits_granted",
            "credits_expired", "credits_reissued", "credits_released", "wal_bytes_written",
            "batches_redelivered", "groups_redelivered", "groups_deferred")
LABELLED = {"groups_dropped": ("stale", "equal_rewards", "max_tokens", "unreadable"),
            "rejected": ("decode", "frame_too_large", "invalid_group_id", "unknown_lease",
                         "lease_mismatch", "future_version", "negative_version", "not_trainer",
                         "reserved_id", "unexpected_type", "empty_prompt",
                         "no_room", "empty_output", "bad_loss_mask", "over_context",
                         "too_many_trajectories", "token_out_of_vocab", "nonfinite_logp",
                         "implausible_logp", "bad_process_rewards", "bad_routes", "peer_limit",
                         "role", "duplicate_id", "id_in_use")}


class BufferMetrics:
    def __init__(self, metrics: Metrics, groups: dict[str, Callable[[], float]],
                 gauges: dict[str, tuple[str, Callable[[], float]]]):
        """``groups``: state -> read (the ``buffer/groups`` gauge); ``gauges``: name -> (doc, read).
        Every metric is created up front so dashboards see zeros, not missing series."""
        self.counts: Counter[str] = Counter()
        self._counters = {name: metrics.counter(f"buffer/{name}", name.replace("_", " "),
                                                ("reason",) if name in LABELLED else ())
                          for name in (*COUNTERS, *LABELLED)}
        for name, reasons in LABELLED.items():
            for reason in reasons:
                self._counters[name].labels(reason=reason)
        by_state = metrics.gauge("buffer/groups", "groups by state", labels=("state",))
        for state, read in groups.items():
            by_state.labels(state=state).set_function(read)
        for name, (doc, read) in gauges.items():
            metrics.gauge(name, doc).set_function(read)
        self._latency = metrics.histogram("buffer/request_seconds", "request latency by type",
                                          ("type",))
        self._fsync = metrics.histogram("buffer/fsync_seconds", "WAL group commit latency (fsync)")
        self._staleness = metrics.histogram("buffer/staleness",
                                            "staleness of consumed groups (versions)",
                                            buckets=range(0, 17))
        refused = metrics.counter("buffer/auth_refused", "peers refused at the handshake "
                                  "(unknown_key, handshake) or for their key's role (role)",
                                  ("reason",))
        self._refused = {r: refused.labels(reason=r) for r in REFUSAL_REASONS}
        self._refused_lock = threading.Lock()
        # keys exist up front: the monitor thread never inserts into counts
        for reason in REFUSAL_REASONS:
            self.counts[f"auth_refused_{reason}"] = 0

    def refused(self, reason: str) -> None:
        """One refused handshake (``security.on_refused``; called from a monitor thread)."""
        with self._refused_lock:
            self.counts[f"auth_refused_{reason}"] += 1
        self._refused[reason].inc()

    def count(self, name: str, n: int = 1, **labels: str) -> None:
        if n:
            self.counts["_".join([name, *labels.values()])] += n
            counter = self._counters[name]
            (counter.labels(**labels) if labels else counter).inc(n)

    def latency(self, kind: str, seconds: float) -> None:
        self._latency.labels(type=kind).observe(seconds)

    def fsync(self, seconds: Iterable[float]) -> None:
        for s in seconds:
            self._fsync.observe(s)

    def staleness(self, versions: Iterable[int]) -> None:
        for v in versions:
            self._staleness.observe(v)


def service_gauges(svc) -> dict[str, tuple[str, Callable[[], float]]]:
    """The buffer service's gauges: name -> (doc, read when scraped)."""
    return {"buffer/trainer_version": ("", lambda: svc.control.version),
            "buffer/max_staleness": ("the staleness bound eta (for alerts)",
                                     lambda: svc.cfg.max_staleness),
            "buffer/roster_size": ("", lambda: len(svc.control.roster)),
            "buffer/started": ("admission counter (groups holding a slot)",
                               lambda: svc.ledger.started),
            "buffer/consumed": ("groups the trainer consumed (admission counts against them)",
                                lambda: svc.ledger.consumed),
            "buffer/stored_bytes": ("frame bytes of stored groups", lambda: svc.store.nbytes),
            "buffer/wal_bytes": ("bytes of WAL segments on disk", lambda: svc.wal.disk_bytes),
            "buffer/wal_corrupt_records": ("damaged WAL records skipped at the last start (each "
                                           "logged with its file and offset)",
                                           lambda: svc.wal.corrupt_records),
            "buffer/disk_full": ("1 while new groups are refused for lack of disk space (degraded)",
                                 lambda: float(svc.disk.degraded)),
            "buffer/disk_free_bytes": ("free bytes on the WAL's disk (estimated between sweeps)",
                                       lambda: svc.disk.free)}


def service_stats(svc) -> dict:
    """What a ``StatsRequest`` answers: every counter, the state's sizes and the leases each
    server holds."""
    return {**svc.instruments.counts, "policy_version": svc.control.version,
            "stored": len(svc.store),
            "in_transit": svc.handout.in_transit_groups(), "stored_bytes": svc.store.nbytes,
            "in_flight": svc.ledger.in_flight, "started": svc.ledger.started,
            "consumed": svc.ledger.consumed,
            "cursor_index": svc.ledger.next_index, "cursor_epoch": svc.ledger.epoch,
            "reissue_queue": len(svc.ledger.reissue), "roster_size": len(svc.control.roster),
            "pending_batches": len(svc.handout.pending), "wal_bytes": svc.wal.disk_bytes,
            "wal_corrupt_records": svc.wal.corrupt_records, "disk_full": int(svc.disk.degraded),
            **{f"leases_of_{sid}": n
               for sid, n in Counter(x.server_id for x in svc.ledger.leases.values()).items()}}
