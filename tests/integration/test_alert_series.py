"""The series the alert rules read (launch/observability/alerts.yml) exist from a daemon's start,
not from its first event: else TrainerNoStep and EngineNotGenerating cannot fire for a trainer
that never stepped or an engine that never generated, exactly the stalls they describe."""

from __future__ import annotations

from areal_like.net.metrics import scrape
from areal_like.settings.config import load_config, to_yaml
from rollout_server.server import RolloutServer
from tests.helpers_trainer import BufferStandIn

STARTUP_S = 180.0  # cold torch + transformers imports on a loaded 2-core machine


class StarvedBuffer(BufferStandIn):
    """A buffer with nothing to hand out: empty batches, no engines."""

    def __init__(self, address: str):
        self.batch_requests = 0
        super().__init__(address)

    def answer(self, m):
        from areal_like.wire import protocol as P

        if isinstance(m, P.BatchRequest):
            self.batch_requests += 1
            return P.Batch(groups=[], trainer_version=m.trainer_version)
        if isinstance(m, P.RosterRequest):
            return P.Roster(members=[], policy_version=0)
        return P.Ack(ref=str(getattr(m, "policy_version", "")), status="ok")


def test_a_starved_trainer_serves_its_version_before_its_first_step(tmp_path, spawn_python,
                                                                     free_port, wait_until):
    address, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    cfg = load_config([f"run_dir={tmp_path}", "security.curve=false", f"buffer.address={address}",
                       f"trainer.metrics_port={port}", "trainer.batch_wait_s=0.2"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    buffer = StarvedBuffer(address)
    try:
        spawn_python("trainer", ["--config-file", tmp_path / "config.yaml"], capture=False)
        # asking for its first batch: past its start and its first weight push
        wait_until(lambda: buffer.batch_requests >= 3, STARTUP_S, 0.2, "the trainer's requests")
        series = scrape(f"http://127.0.0.1:{port}/metrics")
        assert series.get("areal_trainer_policy_version") == 0, sorted(series)
        assert series.get("areal_trainer_weight_sync_dropped_total") == 0, sorted(series)
        assert series.get("areal_trainer_rolled_back_steps") == 0, sorted(series)  # a resume's
        assert "areal_trainer_step_seconds" not in series  # no step was made
    finally:
        buffer.close()


def test_a_rollout_server_serves_its_token_count_before_it_generates(tmp_run_dir):
    cfg = load_config([f"run_dir={tmp_run_dir}", "rollout.engine.max_running_requests=2",
                       "rollout.engine.max_total_tokens=1024", "task.reward_workers=0",
                       "security.curve=false", "trainer.logprob_guard_tol=0"])
    server = RolloutServer.from_run(cfg)
    server.start()
    try:
        for name in ("tokens_generated", "groups_resent", "aborted_resumed_requests"):
            value = server.metrics.registry.get_sample_value(f"areal_rollout_{name}_total")
            assert value == 0.0, name
    finally:
        server.stop()
