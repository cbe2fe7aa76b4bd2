"""The whole system on loopback: buffer + 2 rollout servers (embedded engines) + a 2-rank FSDP2
trainer under torchrun, started by the real supervisor.

Shown: versions advance one per step; every trained group had staleness <= eta (trainer's
per-step record and the buffer's staleness histogram); after syncs every engine's weights equal
the trainer's (checksum of the engine's full parameters read over SGLang's /get_weights_by_name
against the trainer checkpoint of the same version) and every sync reports both engines done,
none dropped; the reward
mean rises; nothing is left running.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import pytest
from system_harness import (
    RunningSystem,
    checkpoint_checksum,
    checksum,
    engine_weights,
    system_config,
    warm_model,
)

STEPS = 24
ETA = 2
WARM_CACHE = Path(tempfile.gettempdir()) / "areal-like-test-warmstart"  # keyed by config hash inside


def _param_names(model_dir: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


class WeightWatcher(threading.Thread):
    """Reads each engine's full weights at a stable version and compares with the trainer's checkpoint."""

    def __init__(self, system: RunningSystem, engines: dict[str, str], names: list[str]):
        super().__init__(daemon=True)
        self.system, self.engines, self.names = system, engines, names
        self.matched: dict[str, set[int]] = {s: set() for s in engines}
        self.mismatched: list[tuple] = []
        self.buffer_metrics: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for server, url in self.engines.items():
                try:
                    got = engine_weights(url, self.names)
                    self.buffer_metrics = self.system.metrics("buffer")
                except Exception:
                    continue  # the job is shutting down
                if got is None:
                    continue
                version, params = got
                engine_sum = checksum(params)
                deadline = time.monotonic() + 10  # the checkpoint of a version is written after its sync
                while (trainer_sum := checkpoint_checksum(self.system.run_dir, version)) is None:
                    if time.monotonic() > deadline or self.stop.is_set():
                        break
                    time.sleep(0.1)
                if trainer_sum is None:
                    continue  # rotated away (KEEP=2) before we looked: no evidence either way
                if abs(engine_sum - trainer_sum) <= 1e-9 * max(1.0, abs(trainer_sum)):
                    self.matched[server].add(version)
                else:
                    self.mismatched.append((server, version, engine_sum, trainer_sum))
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_async_system_learns_with_bounded_staleness_and_synced_weights(tmp_path):
    model = warm_model(WARM_CACHE)
    cfg = system_config(tmp_path / "run", model, f"trainer.steps={STEPS}", f"buffer.max_staleness={ETA}")
    with RunningSystem(cfg) as system:
        roster = system.wait_for(lambda: (r := system.roster()) and len(r) == 2 and r, 180, "2 rollout servers")
        watcher = WeightWatcher(system, {s: m.engine_url for s, m in roster.items()}, _param_names(model))
        watcher.start()
        try:
            system.wait_for(system.completed.is_set, 300, "the trainer to finish")
        finally:
            watcher.stop.set()
            watcher.join(timeout=60)
        # the job is complete and its daemons still up: every engine serves the last version, exactly
        final_sum = checkpoint_checksum(system.run_dir, STEPS)
        for server, entry in roster.items():
            got = engine_weights(entry.engine_url, watcher.names)
            assert got is not None and got[0] == STEPS, (server, got and got[0])
            assert checksum(got[1]) == pytest.approx(final_sum, rel=1e-9), server
        system.release.set()
        system.wait_for(system.finished, 120, "the job to stop")
    assert system.code == 0, system.tail()

    steps = system.steps()
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["policy_version"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["staleness_max"] <= ETA for r in steps), [r["staleness_max"] for r in steps]
    assert max(r["staleness_max"] for r in steps) >= 1  # the run really was asynchronous
    assert all(not r["weight_sync"]["dropped"] and sorted(r["weight_sync"]["done"]) == ["rollout-0", "rollout-1"]
               for r in steps), [r["weight_sync"] for r in steps]

    hist = watcher.buffer_metrics
    total = hist.get("areal_buffer_staleness_count", 0)
    assert total > 0 and hist[f'areal_buffer_staleness_bucket{{le="{float(ETA)}"}}'] == total

    # every read during the run that caught an engine at a stable version matched the trainer's
    # checkpoint of that version (a read is ~1 s of JSON: it fits between two syncs only sometimes)
    assert not watcher.mismatched, watcher.mismatched

    rewards = [r["reward_mean"] for r in steps]
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.05, rewards
