"""Resume: the trainer daemon (2 FSDP2 ranks) killed -9 resumes at its last complete checkpoint
bit-identical, re-announces it, trains on and stops on SIGTERM (buffer: a ROUTER stand-in).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer_invariance import synthetic_groups  # noqa: E402

from tests.helpers_trainer import BufferStandIn  # noqa: E402

STARTUP_S = 180.0  # cold torch + transformers imports of two ranks on a loaded 2-core machine


class ResumeBuffer(BufferStandIn):
    """Synthetic groups, no engines; records every VersionUpdate and each batch's ack."""

    def __init__(self, address: str):
        self.versions: list[int] = []
        self.acks: list[str] = []  # ack_batch of every BatchRequest, in order
        super().__init__(address)

    def answer(self, m):
        from areal_like.wire import protocol as P

        if isinstance(m, P.BatchRequest):
            self.acks.append(m.ack_batch)
            return P.Batch(groups=synthetic_groups(seed=m.trainer_version,
                                                   version=m.trainer_version),
                           trainer_version=m.trainer_version, batch_id=f"b{m.trainer_version}")
        if isinstance(m, P.RosterRequest):
            return P.Roster(members=[], policy_version=max(self.versions, default=0))
        if isinstance(m, P.VersionUpdate):
            self.versions.append(m.policy_version)
            return P.Ack(ref=str(m.policy_version), status="ok")
        return P.Ack(ref="", status="rejected",
                     reason=f"stand-in does not handle {type(m).__name__}")


def _lines(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


@pytest.mark.parametrize("async_save", [False, True])
def test_kill9_and_resume_restores_version_weights_and_optimizer(tmp_path, spawn_python, free_port,
                                                                 wait_until,
                                                                 async_save):
    import torch

    from areal_like.settings.config import load_config, to_yaml

    address, metrics_port = f"tcp://127.0.0.1:{free_port()}", free_port()
    cfg = load_config([f"run_dir={tmp_path}", "security.curve=false", f"buffer.address={address}",
                       "trainer.checkpoint_every=1", f"trainer.checkpoint_async={async_save}",
                       f"trainer.metrics_port={metrics_port}",
                       "trainer.steps=1000", "trainer.lr=1e-3", "trainer.micro_batch_size=4",
                       # the tiny recipe pads; this test reads packing
                       "trainer.pack_sequences=true", "trainer.pack_min_padding=0",
                       "trainer.batch_wait_s=1"])
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(to_yaml(cfg))
    jsonl = tmp_path / "metrics" / "trainer.jsonl"
    ckpts = tmp_path / "checkpoints"
    buffer = ResumeBuffer(address)

    def start_ranks():
        port = free_port()
        return [spawn_python("trainer", ["--config-file", cfg_path], capture=False,
                             env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                  "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": str(port)}) for r in (0, 1)]

    try:
        ranks = start_ranks()
        wait_until(lambda: len([x for x in _lines(jsonl) if "step" in x]) >= 3, STARTUP_S, 0.2,
                   "3 training steps")
        for p in ranks:
            os.kill(p.pid, signal.SIGKILL)
        for p in ranks:
            p.wait(timeout=30)
        done = sorted(p for p in ckpts.iterdir() if p.name.startswith("v"))
        assert done, list(ckpts.iterdir())
        latest = done[-1]
        version = int(latest.name[1:])
        saved = torch.load(latest / "meta.pt", weights_only=False)
        assert saved["policy_version"] == version >= 2

        n_before, n_acks = len(buffer.versions), len(buffer.acks)
        # the kill may land after announcing v+1 and before checkpointing it
        announced = max(buffer.versions)
        ranks = start_ranks()
        resume = wait_until(lambda: [x for x in _lines(jsonl) if x.get("event") == "resume"],
                            STARTUP_S, 0.2,
                            "the resume record")[0]
        assert resume["checkpoint_version"] == version
        # the first request after the restart acks the batch the checkpoint includes
        # (step version-1 -> version), so the buffer consumes it instead of handing it out again;
        # anything later is redelivered
        wait_until(lambda: len(buffer.acks) > n_acks, 60, 0.1, "a batch request after resume")
        assert buffer.acks[n_acks] == f"b{version - 1}"
        # versions never go backwards: weights older than an announced version take that label (no
        # label is skipped beyond the lost steps', so the buffer's stored groups keep their age)
        version = max(version, announced)
        assert resume["policy_version"] == version
        assert resume["checksums"] == saved["checksums"]  # bit-identical model and optimizer state
        assert resume["checksums"]["optim"] != 0.0
        # the resumed version is re-announced before training goes on, then training continues
        # from it
        wait_until(lambda: version in buffer.versions[n_before:], 60, 0.1, "re-announced version")
        after = wait_until(lambda: [x for x in _lines(jsonl) if x.get("step", 0) > version and
                                    x["time"] > resume["time"]], 120, 0.2, "a step after resume")
        assert after[0]["policy_version"] == version + 1
        # rank 0's /metrics: each phase's timing scope is its metric label
        from areal_like.net.metrics import scrape

        series = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        for phase in ("fetch_batch", "recompute_prox", "train_step", "weight_sync", "checkpoint"):
            assert f'areal_trainer_phase_seconds{{phase="{phase}"}}' in series, sorted(series)
        assert series["areal_trainer_policy_version"] >= version + 1
        assert "areal_trainer_grad_norm" in series and "areal_trainer_weight_sync_seconds" in series
        # packed micro-batches (the default) over two ranks: no padding computed, in both places
        row = after[0]
        assert row["padding_share"] == 0.0 and row["trained_tokens_per_s"] > 0, row
        assert row["tokens_per_micro_batch"] > 0 and 0 <= row["rank_token_spread"] < 1, row
        assert series["areal_trainer_padding_share"] == 0.0
        assert series["areal_trainer_trained_tokens_per_s"] > 0
        assert "areal_trainer_rank_token_spread" in series
        assert series['areal_refused_total{port="weight_sync"}'] == 0  # its store gate's strangers
        for p in ranks:  # graceful stop: exit 0 and a final checkpoint
            os.kill(p.pid, signal.SIGTERM)
        assert [p.wait(timeout=60) for p in ranks] == [0, 0]
        assert int(sorted(p.name for p in ckpts.iterdir()
                          if p.name.startswith("v"))[-1][1:]) > version
    finally:
        buffer.close()


def test_a_kill_between_the_checkpoint_and_its_record_loses_no_record(tmp_path, spawn_python,
                                                                        free_port, wait_until):
    """kill -9 after step 1's checkpoint, before its record: the resume writes it."""
    from areal_like.settings.config import load_config, to_yaml

    address = f"tcp://127.0.0.1:{free_port()}"
    cfg = load_config([f"run_dir={tmp_path}", "security.curve=false", f"buffer.address={address}",
                       "trainer.checkpoint_every=1", "trainer.steps=1", "trainer.batch_wait_s=1",
                       "trainer.logprob_guard_tol=0", "export.at_end=false"])
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(to_yaml(cfg))
    jsonl = tmp_path / "metrics" / "trainer.jsonl"
    jsonl.parent.mkdir()
    os.mkfifo(jsonl)
    buffer = ResumeBuffer(address)
    try:
        trainer = spawn_python("trainer", ["--config-file", cfg_path], capture=False)
        wait_until(lambda: (tmp_path / "checkpoints" / "v00000001" / "meta.pt").is_file(),
                   STARTUP_S, 0.1, "step 1's checkpoint")
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=30)
        jsonl.unlink()  # nothing was written: a FIFO holds no data
        again = spawn_python("trainer", ["--config-file", cfg_path], capture=False)
        assert again.wait(timeout=STARTUP_S) == 0
    finally:
        buffer.close()
    records = _lines(jsonl)
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [1], records
    assert steps[0]["loss"] is not None and steps[0]["steps_trained"] == 1, steps[0]
    assert [r.get("event") for r in records] == [None, "resume", "done"], records


def test_checkpoint_every_raised_then_lowered_still_takes_the_label(tmp_path, spawn_python,
                                                                      free_port, wait_until):
    """checkpoint_every 1, then 100 (killed), then 2: the third takes the second's label."""
    from areal_like.settings.config import load_config, to_yaml

    address = f"tcp://127.0.0.1:{free_port()}"
    cfg_path = tmp_path / "config.yaml"
    jsonl = tmp_path / "metrics" / "trainer.jsonl"

    def trainer(every: int, steps: int):
        cfg_path.write_text(to_yaml(load_config([
            f"run_dir={tmp_path}", "security.curve=false", f"buffer.address={address}",
            f"trainer.checkpoint_every={every}", f"trainer.steps={steps}",
            "trainer.batch_wait_s=1", "trainer.logprob_guard_tol=0", "export.at_end=false"])))
        return spawn_python("trainer", ["--config-file", cfg_path], capture=False)

    buffer = ResumeBuffer(address)
    try:
        assert trainer(every=1, steps=1).wait(timeout=STARTUP_S) == 0
        second = trainer(every=100, steps=1000)
        wait_until(lambda: max(buffer.versions) >= 12, STARTUP_S, 0.1, "the second run's steps")
        os.kill(second.pid, signal.SIGKILL)
        second.wait(timeout=30)
        announced = max(buffer.versions)
        third = trainer(every=2, steps=1000)

        def resumed():
            return [r for r in _lines(jsonl) if r.get("event") == "resume"
                    and r["checkpoint_version"] == 1 and r["rolled_back_steps"]]
        wait_until(lambda: resumed() or third.poll() is not None, STARTUP_S, 0.2,
                   "the third run's resume record")
        assert third.poll() is None, "the third run refused the label and exited"
        assert resumed()[0]["policy_version"] == announced, resumed()
        os.kill(third.pid, signal.SIGTERM)
        assert third.wait(timeout=60) == 0
    finally:
        buffer.close()
