"""A departed rollout server's leases go back at once, not after ``buffer.lease_timeout_s``: when
it leaves the roster, never returns after a buffer restart, or comes back as a new process."""

from __future__ import annotations

import logging

from service_harness import Clock, start, step

from areal_like.settings.config import BufferConfig
from areal_like.wire import protocol as P
from buffer.instruments import service_stats
from buffer.service import BufferService

HEARTBEAT_S, LEASE_S = 15.0, 120.0


def _start(tmp_path, clock) -> BufferService:
    return start(tmp_path, BufferConfig(max_staleness=4, groups_per_step=2, max_inflight=32,
                                        capacity=64, lease_timeout_s=LEASE_S,
                                        heartbeat_timeout_s=HEARTBEAT_S), clock=clock)


def _step(svc: BufferService, msg: P.Message) -> P.Message:
    return step(svc, msg, peer=b"rollout")


def _join(svc: BufferService, sid: str, credits: int) -> list[int]:
    _step(svc, P.Register(server_id=sid, engine_url="http://x", policy_version=0))
    return [c.prompt_index
            for c in _step(svc, P.CreditRequest(server_id=sid, max_credits=credits)).credits]


def test_a_server_that_leaves_the_roster_releases_its_leases_at_once(tmp_path, caplog):
    """A stop on request is routine (INFO); a server gone silent is a fault (WARNING)."""
    clock = Clock()
    svc = _start(tmp_path, clock)
    caplog.set_level(logging.INFO, logger=svc.log.name)
    stopped, dead = _join(svc, "stopped", 3), _join(svc, "dead", 2)
    _join(svc, "live", 1)
    _step(svc, P.Heartbeat(server_id="stopped", policy_version=0, leaving=True))
    assert svc.instruments.counts["credits_released"] == 3
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "re-issuing" in r.getMessage()]
    assert said == [(logging.INFO, "re-issuing 3 leases of stopped: stopped stopped on request")]
    caplog.clear()
    clock.t += HEARTBEAT_S + 1  # "dead" went silent; "live" heartbeats
    _step(svc, P.Heartbeat(server_id="live", policy_version=0))
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "re-issuing" in r.getMessage()]
    assert said == [(logging.WARNING, "re-issuing 2 leases of dead: gone from the roster")]
    assert sorted(svc.control.roster) == ["live"] and svc.ledger.in_flight == 1
    assert svc.instruments.counts["credits_released"] == 5 and svc.ledger.started == 1
    # long before lease_timeout_s, the departed servers' prompts go out again, first
    again = _step(svc, P.CreditRequest(server_id="live", max_credits=5)).credits
    assert [c.prompt_index for c in again] == [*stopped, *dead]
    svc.wal.close()


def test_after_a_restart_leases_of_a_server_that_never_returns_are_released(tmp_path):
    clock = Clock()
    svc = _start(tmp_path, clock)
    dead = _join(svc, "dead", 3)
    _join(svc, "live", 2)
    svc.wal.close()
    svc = _start(tmp_path, clock)  # the restart restores all 5 leases with a fresh timeout
    assert svc.ledger.in_flight == 5 and not svc.control.roster
    _step(svc, P.Register(server_id="live", engine_url="http://x", policy_version=0))
    clock.t += HEARTBEAT_S / 2
    _step(svc, P.Heartbeat(server_id="live", policy_version=0))
    assert svc.ledger.in_flight == 5  # within the heartbeat timeout: "dead" may still come back
    clock.t += HEARTBEAT_S / 2 + 1
    _step(svc, P.Heartbeat(server_id="live", policy_version=0))
    assert (svc.ledger.in_flight == 2
            and {x.server_id for x in svc.ledger.leases.values()} == {"live"})
    assert svc.instruments.counts["credits_released"] == 3
    assert [c.prompt_index
            for c in _step(svc, P.CreditRequest(server_id="live", max_credits=3)).credits] == dead
    svc.wal.close()


def test_a_server_restarted_within_the_heartbeat_timeout_releases_its_old_leases(tmp_path):
    clock = Clock()
    svc = _start(tmp_path, clock)
    old = _join(svc, "r0", 3)
    _join(svc, "r1", 2)
    clock.t += 1.0  # kill -9, restarted inside the heartbeat timeout: r0 never left the roster
    _step(svc, P.Register(server_id="r0", engine_url="http://x", policy_version=0))
    assert svc.ledger.in_flight == 5 and "credits_released" not in svc.instruments.counts
    assert (service_stats(svc)["leases_of_r0"], service_stats(svc)["leases_of_r1"]) == (3, 2)
    _step(svc, P.Register(server_id="r0", engine_url="http://x", policy_version=0, fresh=True))
    assert sorted(svc.control.roster) == ["r0", "r1"] and svc.ledger.in_flight == 2
    assert ({x.server_id for x in svc.ledger.leases.values()} == {"r1"}
            and "leases_of_r0" not in service_stats(svc))
    assert svc.instruments.counts["credits_released"] == 3
    # the old process's prompts go out again at once, first, to the new process
    assert [c.prompt_index
            for c in _step(svc, P.CreditRequest(server_id="r0", max_credits=3)).credits] == old
    svc.wal.close()


def test_a_process_is_told_by_its_incarnation_not_by_fresh_alone(tmp_path):
    """A retried first Register (``fresh``, same incarnation) is the same process: its leases stay.
    Another incarnation under the id is a new process: the leases go out again at once."""
    clock = Clock()
    svc = _start(tmp_path, clock)
    first = P.Register(server_id="r0", engine_url="http://x", policy_version=0, fresh=True,
                       incarnation="1111")
    _step(svc, first)
    ask = P.CreditRequest(server_id="r0", max_credits=3, incarnation="1111")
    old = [c.prompt_index for c in _step(svc, ask).credits]
    _step(svc, first)  # retried: the answer to the first attempt was lost
    assert svc.ledger.in_flight == 3 and "credits_released" not in svc.instruments.counts
    clock.t += HEARTBEAT_S + 1  # killed -9: another incarnation takes the id once it is silent
    _step(svc, P.Register(server_id="r0", engine_url="http://x", policy_version=0,
                          incarnation="2222"))  # restarted; a new process even without fresh
    assert svc.ledger.in_flight == 0 and svc.instruments.counts["credits_released"] == 3
    ask = P.CreditRequest(server_id="r0", max_credits=3, incarnation="2222")
    assert [c.prompt_index for c in _step(svc, ask).credits] == old
    svc.wal.close()
