"""The trainer daemon: ``train(cfg)`` and the loop ``Trainer.run`` (areal_like/DESIGN.md section 5).

``python -m trainer --config-file run/config.yaml`` (or under torchrun). Rank 0 talks to the
buffer, serves ``/metrics`` and ``/health``, writes ``metrics/trainer.jsonl`` (one line per step,
holding the seconds of the phases that ran in that step) and ``samples.jsonl``.

Invariants:
- Order at a version boundary: optimizer step(s) -> v += 1 -> push -> version announced -> next
  batch; the initial weights are pushed and announced before the first batch. An overlapped push
  (``wait=False``) finishes in the background; the next batch request names its own version.
- Rank 0 decides when to stop and the decision reaches the others through the batch broadcast. A
  graceful stop saves a checkpoint.
- A step's record is written after its checkpoint (it holds the checkpoint's seconds) and also
  goes into it: a resume from that checkpoint writes the record when a kill came in between
  (the step is not trained again, so nothing else would).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property

import torch
import torch.distributed as dist

from areal_like.daemon import Daemon, StartRefused
from areal_like.job_facts import model_vocab_size
from areal_like.net.auth import ensure_key_file
from areal_like.net.security import Keys
from areal_like.net.store_gate import refused_total
from areal_like.settings.config import RunConfig, TrainerConfig, export_yaml
from areal_like.tasks.tokenizer import load_tokenizer
from areal_like.weights.lora import served_name
from areal_like.weights.routing import route_shape
from trainer.checkpoint import (
    TMP_PREFIX,
    AsyncSaver,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    state_checksums,
)
from trainer.critic import (
    build_critic,
    check_critic_tokenizer,
    critic_advantages,
    critic_values,
    explained_variance,
    train_critic,
)
from trainer.data import BatchSource, Quarantine, TrainBatch
from trainer.engine_drive import EngineDrive
from trainer.engine_lag import EngineSchedule
from trainer.export import export_hf, export_tokenizer, prune_exports
from trainer.facts import TrainerFacts
from trainer.finite_guard import SkipTracker
from trainer.learning_watch import LearningWatch
from trainer.logprob_guard import PROBE_TEXT, guard_tol, run_guard
from trainer.model import build_policy, build_reference, init_distributed, leave_distributed
from trainer.ranks import from_rank0
from trainer.samples import reward_fn_means, sample_rows
from trainer.step import (
    StepSettings,
    minibatches,
    recompute_prox_logp,
    reference_logp,
    train_step,
)
from trainer.weight_members import await_registered
from trainer.weight_sync import SyncReport, WeightBroadcaster

# the SyncReport fields of a step's record (metrics/trainer.jsonl "weight_sync")
SYNC_RECORD = ("version", "seconds", "blocked_s", "overlapped", "bytes", "transfer_s", "done",
               "dropped", "repushed", "pause_s", "error")


# the packing stats of a step's record (trainer/packing.py)
LAYOUT_STATS = ("padding_share", "tokens_per_micro_batch", "rank_token_spread",
                "packed_minibatches")


class StaleDataError(StartRefused):
    """The buffer handed out a group older than the trainer's staleness bound: a buffer started
    with a larger bound than the trainer's, or a bug; never a policy. One line, exit 2: a
    restart would be handed the same groups."""


def assert_fresh(batch: TrainBatch, version: int, max_staleness: int) -> None:
    """Consume-time guarantee (areal_like/DESIGN.md section 2): ``version - head <= eta``."""
    staleness = version - batch.head_versions
    if int(staleness.max()) > max_staleness:
        raise StaleDataError(
            f"the buffer handed out stale training data (not trained on): staleness "
            f"{int(staleness.max())} > max_staleness {max_staleness} (this trainer's "
            f"buffer.max_staleness) at policy_version {version}; was the buffer started with "
            "another buffer.max_staleness? Every daemon must read the same one")


def layout_metrics(stats: dict[str, float], phase_times: dict[str, float]) -> dict[str, float]:
    """The step's layout stats and ``trained_tokens_per_s``
    (real tokens per second of its passes)."""
    compute_s = sum(phase_times.get(k, 0.0) for k in ("recompute_prox", "ref_logp", "train_step"))
    return {"trained_tokens_per_s": stats.get("seq_tokens", 0.0) / max(compute_s, 1e-9),
            **{k: stats.get(k, 0.0) for k in LAYOUT_STATS}}


def train(cfg: RunConfig, keys: Keys | None = None) -> int:
    """Run the trainer to completion; returns the exit code."""
    return Trainer.from_run(cfg, keys).serve()


class Trainer(Daemon):
    name = "trainer"

    def __init__(self, t: TrainerConfig, facts: TrainerFacts):
        self.rank = int(os.environ.get("RANK", "0"))
        super().__init__(metrics_port=t.metrics_port if self.rank == 0 else None)
        self.cfg, self.facts = t, facts
        self.version = 0
        # version = steps_trained + rolled_back_steps (steps a crash lost: monotonic_version)
        self.steps_trained = self.rolled_back_steps = 0
        # most_lost() of the process that wrote the resumed checkpoint; None: none resumed
        self.saved_most_lost: int | None = None
        self.phase_times: dict[str, float] = {}
        self.ckpt_root = facts.checkpoint_dir
        self.exported_version: int | None = None
        self.completed = False
        self.jsonl = facts.run_dir / "metrics" / "trainer.jsonl"

    @classmethod
    def from_run(cls, cfg: RunConfig, keys: Keys | None = None) -> Trainer:
        return cls(cfg.trainer, TrainerFacts.from_run(cfg, keys))

    def start(self) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        torch.manual_seed(self.facts.seed)
        t, model_cfg = self.cfg, self.facts.model
        check_critic_tokenizer(model_cfg, t.critic)  # before anything is built
        if self.facts.engine_key is None:  # started by hand, first of its job: it makes the key
            self.facts = replace(self.facts, engine_key=ensure_key_file(self.facts.run_dir))
        self.rank, self.world_size = init_distributed(t)
        self.policy = build_policy(model_cfg, t)
        # the value model of PPO with a critic (trainer/critic.py); never exported nor pushed
        self.critic = build_critic(model_cfg, t) if t.critic.enabled else None
        kl_in_reward = self.critic is not None and t.critic.kl_coef > 0
        self.reference = (build_reference(model_cfg, t, self.policy)
                          if t.loss.kl_coef > 0 or kl_in_reward else None)
        self.settings = StepSettings.of(t, self.facts.task, self.facts.distill)
        self.watch = LearningWatch(t.learning_watch_steps, report=self.rank == 0)
        self.data = BatchSource(t.buffer_address, t.groups_per_step, keys=self.facts.keys,
                                wait_s=t.batch_wait_s, buffer_timeout_s=t.buffer_timeout_s,
                                rank=self.rank, should_stop=self.stop_requested.is_set,
                                vocab_size=model_vocab_size(model_cfg), context=self.facts.context,
                                route_shape=(route_shape(self.policy.model) if t.routing_replay
                                             else None))
        self.broadcaster = self.make_broadcaster()
        self.engines = EngineSchedule(t.weight_sync, self.broadcaster, self.policy.model, t.steps)
        self.metrics.count_refusals("weight_sync", refused_total)  # rank 0's store gate
        self.data.on_stall = lambda: self.engines.repush(self.version)
        self.saver = AsyncSaver(self.ckpt_root, t.keep_checkpoints) if t.checkpoint_async else None
        self.skips = SkipTracker(t.max_nonfinite_skips, self.metrics if self.rank == 0 else None)
        self.quarantine = Quarantine(self.rank, self.metrics if self.rank == 0 else None)
        ckpt = latest_checkpoint(self.ckpt_root) if t.resume else None
        if ckpt is not None:
            self.version, meta = load_checkpoint(ckpt, self.policy, self.critic)
            self.restore_extra(meta.get("extra", {}))
        self.warn_truncation()
        checkpoint_version = self.version
        self.version = self.monotonic_version(self.version)
        lost = self.version - checkpoint_version  # labels announced by weights the crash lost
        self.rolled_back_steps += lost
        # served from the start, not from the first step on: alerts TrainerNoStep and
        # WeightSyncDroppedEngines see a trainer that never steps, or drops an engine at once,
        # TrainerRolledBack a resume at once
        self.metrics.gauge("trainer/policy_version").set(self.version)
        self.metrics.counter("trainer/weight_sync_dropped")
        self.metrics.gauge("trainer/rolled_back_steps",
                           "steps lost to crashes (labels skipped at resume)").set(
            self.rolled_back_steps)
        if ckpt is not None or lost:
            self.record({"event": "resume", "policy_version": self.version,
                         "checkpoint_version": checkpoint_version,
                         "checkpoint": str(ckpt) if ckpt else None, "rolled_back_steps": lost,
                         "rolled_back_total": self.rolled_back_steps,
                         "steps_trained": self.steps_trained,
                         **({"saved_checksums": meta["checksums"],
                             "checksums": state_checksums(self.policy, self.critic)}
                            if ckpt is not None else {})})
        # a second crash before the next periodic checkpoint must not roll these labels back again;
        # nor may a later resume count a crash of ours against a most_lost smaller than ours
        if lost or ckpt is not None and self.most_lost() > self.saved_most_lost:
            self.checkpoint_now()

    def make_broadcaster(self) -> WeightBroadcaster:
        """Rank 0 drives every engine's weight sync, with the job's engine key."""
        f, t = self.facts, self.cfg
        drive = EngineDrive(kind=f.engine_kind, engine_key=f.engine_key, pause_mode=f.pause_mode,
                            lora=t.lora.enabled) if self.rank == 0 else None
        return WeightBroadcaster(t.weight_sync, buffer_address=t.buffer_address, keys=f.keys,
                                 rank=self.rank, device=self.policy.device,
                                 send_dtype=f.model.dtype, metrics=self.metrics,
                                 adapter_path=f.adapter_path, engine_key=f.engine_key, drive=drive)

    def compute(self, batch: TrainBatch) -> dict[str, float] | None:
        """The step's computation on ``batch``: its stats, or None on every rank when it raised on
        any (the batch quarantined: ``trainer.data.Quarantine``)."""
        error = None
        try:
            with self.phase("recompute_prox"):
                prox_logp = recompute_prox_logp(self.policy, batch, self.settings)
            with self.phase("ref_logp"):
                ref_logp = reference_logp(self.reference, batch, self.settings, self.policy.device)
            # the kernel's advantages (or the critic's), then the optimizer steps
            stats = self.train_batch(batch, prox_logp, ref_logp)
        except Exception as e:  # noqa: BLE001 - Quarantine.caught raises what is not the batch's
            error = Quarantine.caught(e)
        groups = [g.group_id for g in self.data.last_groups] if self.rank == 0 else []
        row = self.quarantine.skip(error, groups, self.version)
        if row is None:
            return stats
        for model in (self.policy, self.critic):  # a half-computed gradient is not applied
            if model is not None:
                model.optimizer.zero_grad(set_to_none=True)
        self.record(row)
        return None

    def train_batch(self, batch: TrainBatch, prox_logp: torch.Tensor | None,
                    ref_logp: torch.Tensor | None) -> dict[str, float]:
        """The policy's step on ``batch`` (with a critic: ``critic_step``); its stats."""
        if self.critic is not None:
            return self.critic_step(batch, prox_logp, ref_logp)
        with self.phase("train_step"):
            return train_step(self.policy, batch, self.settings, prox_logp, ref_logp)

    def critic_step(self, batch: TrainBatch, prox_logp: torch.Tensor | None,
                    ref_logp: torch.Tensor | None) -> dict[str, float]:
        """PPO with a critic (trainer/critic.py): V_old from the critic as it is now, GAE, the
        policy's step with those advantages (none during ``trainer.critic.warmup_steps``), then
        the critic's."""
        c, s = self.cfg.critic, self.settings
        with self.phase("critic_values"):
            values = critic_values(self.critic, batch, s.micro_batch_size)
            kl = None if ref_logp is None or not c.kl_coef else batch.behav_logp - ref_logp
            adv, returns = critic_advantages(c, batch, values, kl)
        # during the warm-up the policy does not move: no policy loss (as a step with no row)
        stats: dict[str, float] = {"actor_frozen": float(self.version < c.warmup_steps),
                                   "loss": 0.0, "policy_loss": 0.0}
        if not stats["actor_frozen"]:
            with self.phase("train_step"):
                stats |= train_step(self.policy, batch, s, prox_logp, ref_logp, advantages=adv)
            self.policy.optimizer.zero_grad(set_to_none=True)  # not held through the critic's
        with self.phase("critic_step"):
            stats |= train_critic(self.critic, batch, values, returns,
                                  minibatches(batch, s.num_minibatches), s.micro_batch_size)
        stats["critic_explained_variance"] = explained_variance(values, returns, batch.mask)
        return stats

    def checkpoint_now(self, record: dict | None = None) -> None:
        save_checkpoint(self.ckpt_root, self.policy, self.version, self.checkpoint_extra(record),
                        self.cfg.keep_checkpoints, critic=self.critic)

    def warn_truncation(self) -> None:
        task = self.facts.task
        if self.rank == 0 and (task.top_p < 1 or task.top_k > 0):
            self.log.warning("task.top_p=%g / task.top_k=%d truncate the sampler: "
                             "the tokens come from the truncated "
                             "distribution while the trainer scores them "
                             "with the untruncated one, so the "
                             "importance ratios are biased; use top_p=1, top_k=-1 for unbiased RL",
                             task.top_p, task.top_k)

    def guard_logprobs(self, sync: SyncReport) -> None:
        """A collective: ``LogprobGuardError`` on an engine off the convention
        (logprob_guard.py)."""
        tol = guard_tol(self.cfg.logprob_guard_tol, self.facts.model.dtype)
        if tol <= 0:
            return
        prompt = list(self.tokenizer.encode(PROBE_TEXT)) if self.rank == 0 else []
        passed, unchecked = run_guard(self.policy.model, self.policy.device, rank=self.rank,
                                      buffer=self.broadcaster.client, served=sync.done,
                                      api_key=self.facts.engine_key,
                                      engine_kind=self.facts.engine_kind, prompt_ids=prompt,
                                      temperature=self.facts.task.temperature, tol=tol,
                                      several_nodes=self.facts.nodes > 1,
                                      adapters={s: served_name(sync.version, p)
                                                for s, p in sync.loaded.items()}
                                      if self.cfg.lora.enabled else None)
        self.record({"event": "logprob_guard", "policy_version": self.version, "passed": passed,
                     "not_checked": unchecked, "tol": tol})

    def checkpoint_extra(self, record: dict | None = None) -> dict:
        """``record``: the step's line of trainer.jsonl, written after the checkpoint (its time in
        it): a resume writes it when a kill came first (``restore_extra``). As JSON text: data
        only, whatever the stats hold."""
        return {"last_batch_id": self.data.last_batch_id, "steps_trained": self.steps_trained,
                "rolled_back_steps": self.rolled_back_steps, "most_lost": self.most_lost(),
                "record": json.dumps(record) if record else None}

    def restore_extra(self, extra: dict) -> None:
        """What ``checkpoint_extra`` saved, back (after the checkpoint's version is restored)."""
        # acking the batch this checkpoint includes consumes it; a later, lost one goes back
        self.data.last_batch_id = extra.get("last_batch_id", "")
        self.rolled_back_steps = int(extra.get("rolled_back_steps", 0))
        self.steps_trained = int(extra.get("steps_trained", self.version))
        self.saved_most_lost = int(extra.get("most_lost", 0))
        row = json.loads(extra.get("record") or "{}") if self.rank == 0 else {}
        if row and not self.recorded(row["step"]):
            self.record(row)

    def most_lost(self) -> int:
        """The steps a crash of this process can lose: those since its last complete checkpoint
        (async: the last save may be unfinished)."""
        return self.cfg.checkpoint_every * (2 if self.cfg.checkpoint_async else 1)

    def monotonic_version(self, version: int) -> int:
        """Versions never go backwards: when the buffer announced a version past ours (steps lost
        with a crash) our weights take that label, so the buffer's counters and stored versions
        stay valid (the next label would age every stored group without a step trained)."""
        announced = from_rank0(self.broadcaster.announced_version(
            timeout_s=self.cfg.buffer_timeout_s) if self.rank == 0 else None)
        if announced is not None and announced > version:
            # the checkpoint's process may have run with another trainer.checkpoint_every; with no
            # checkpoint (killed before its first) nothing says which, so the label is taken
            saved = self.saved_most_lost
            most = max(self.most_lost(), saved or 0)
            if self.cfg.resume and saved is not None and announced > version + most:
                raise RuntimeError(f"buffer announced policy_version {announced} "
                                   "but our weights are version "
                                   f"{version}: a crash loses at most {most} steps "
                                   "(trainer.checkpoint_every, now and when it was saved), so "
                                   "that version is not ours; refusing to take it as trained")
            self.log.warning("buffer announced policy_version %d but our weights are version %d: "
                             "continuing as version %d (%d steps rolled back)",
                             announced, version, announced,
                             announced - version)
            return announced
        return version

    def initial_push(self) -> None:
        t = self.cfg
        if self.rank == 0 and t.first_engine_wait_s > 0 and not await_registered(
                self.broadcaster.client, t.first_engines, t.first_engine_wait_s,
                self.stop_requested.is_set) and not self.stop_requested.is_set():
            self.log.warning("fewer than %d rollout servers registered after %.0fs: the initial "
                             "push (and the log-prob guard) goes to those there are",
                             t.first_engines, t.first_engine_wait_s)
        with self.phase("weight_sync"):  # the other ranks wait in this collective
            sync = self.engines.after_step(self.version)
        if self.rank == 0:  # the others' reports name no engine (rank 0 talks to the buffer)
            self.log.info("serving policy_version %d to %s", sync.version,
                          sync.done or "no engines yet")
        with self.phase("logprob_guard"):
            self.guard_logprobs(sync)

    def run(self) -> None:
        t, model = self.cfg, self.policy.model
        self.initial_push()
        while self.version < t.steps:
            t_step = time.monotonic()
            # this step's phases only (the setup pushes and the last checkpoint are not)
            self.phase_times = {}
            with self.phase("fetch_batch"):
                batch = self.data.next_batch(self.version)
            if batch is None:
                break
            assert_fresh(batch, self.version, self.facts.max_staleness)
            if (stats := self.compute(batch)) is None:  # quarantined: the next batch acks it
                continue
            self.skips.observe(self.version + 1, stats)  # every rank alike: too many in a row stop
            self.watch.observe(self.version + 1, stats, float(batch.rewards.mean()))
            self.version += 1
            self.steps_trained += 1
            # a push (a small model's finishes in the background), or only the announcement
            with self.phase("weight_sync"):
                sync = self.engines.after_step(self.version, wait=not t.weight_sync.overlap)
            if self.version % t.checkpoint_every == 0:
                # built twice on purpose: the checkpoint's copy (a resume writes it when a kill came
                # before the line) precedes the checkpoint; the line (report) has its time in it
                self.checkpoint_step(self.step_row(batch, stats, sync, time.monotonic() - t_step)
                                     if self.rank == 0 else None)
            elif self.saver is not None:
                with self.phase("checkpoint"):
                    self.saver.poll()
            self.export_if_due()
            with self.phase("metrics"):
                self.report(batch, stats, sync, time.monotonic() - t_step)
        if self.saver is not None:
            self.saver.finish()
        if self.version % t.checkpoint_every != 0:  # graceful end or stop: keep what was trained
            with self.phase("checkpoint"):
                self.checkpoint_now()
        self.export_if_due(final=True)
        if self.version >= t.steps:  # an evaluating server may have missed the last pushes
            with self.phase("catch_up"):
                self.broadcaster.catch_up(model, self.version, self.facts.final_eval_timeout_s,
                                          should_stop=self.stop_requested.is_set,
                                          final_eval=self.facts.final_eval)
        self.record({"event": "done", "policy_version": self.version, "steps": t.steps,
                     # steps without a learning signal (trainer/learning_watch.py); None: off
                     "learning": self.watch.verdict(),
                     "steps_trained": self.steps_trained,
                     "rolled_back_steps": self.rolled_back_steps,
                     "labels_skipped": self.version - self.steps_trained,
                     # optimizer steps not applied (non-finite), in this process's run
                     "nonfinite_skipped": self.skips.total,
                     # batches whose step raised, skipped (trainer.data.Quarantine)
                     "batches_quarantined": self.quarantine.total})
        self.log.info("done at policy_version %d (%d steps trained, %d rolled back by crashes)",
                      self.version,
                      self.steps_trained, self.rolled_back_steps)
        # every rank got here: stop() may wait for the others before leaving the group
        self.completed = True

    def checkpoint_step(self, row: dict | None) -> None:
        """The periodic checkpoint, holding the step's record ``row`` (rank 0's); async: the state
        staged, and the previous save committed."""
        with self.phase("checkpoint"):
            if self.saver is not None:
                self.saver.save(self.policy, self.version, self.checkpoint_extra(row),
                                critic=self.critic)
            else:
                self.checkpoint_now(row)

    def export_if_due(self, final: bool = False) -> None:
        """Export (a collective) at multiples of ``export.every`` and at ``trainer.steps`` with
        ``export.at_end``, each version once. A stop does not export (too slow for its grace)."""
        e = self.facts.export
        if final:
            due = e.at_end and self.version >= self.cfg.steps
        else:
            due = e.every > 0 and self.version % e.every == 0
        if not due or self.exported_version == self.version:
            return
        root = self.facts.export_dir
        with self.phase("export"):
            # an export a crash interrupted (kill -9) left its temporary directory
            if self.rank == 0:
                for stale in root.glob(f"{TMP_PREFIX}*"):
                    shutil.rmtree(stale, ignore_errors=True)
            out = export_hf(self.policy.model, root / f"v{self.version:08d}",
                            model_cfg=self.facts.model,
                            tokenizer=export_tokenizer(self.facts.model, self.facts.task,
                                                       self.tokenizer),
                            shard_mb=e.shard_mb, dtype=self.facts.model.dtype,
                            task_file=export_yaml(self.facts.task, self.facts.eval,
                                                  self.facts.seed, self.version,
                                                  self.facts.run_dir / "config.yaml"),
                            merged=e.merged)
            if self.rank == 0 and e.keep:
                prune_exports(root, e.keep)
        self.exported_version = self.version
        self.record({"event": "export", "policy_version": self.version, "path": str(out)})

    def request_stop(self, *args) -> None:
        """Also a push in flight stops waiting on the members: the buffer may be gone with the
        launcher (PR_SET_PDEATHSIG), and run() waits for that push before it can stop."""
        super().request_stop(*args)
        if hasattr(self, "broadcaster"):
            self.broadcaster.stopping.set()

    def stop(self) -> None:
        for part in ("data", "broadcaster"):
            if hasattr(self, part):
                getattr(self, part).close()
        if self.completed:
            leave_distributed()
        elif dist.is_initialized():
            # after a failure a peer may be gone: a barrier would wait for its timeout
            dist.destroy_process_group()

    # ------------------------------------------------------------------ timing and metrics
    @contextmanager
    def phase(self, name: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            dt = time.monotonic() - t0
            self.phase_times[name] = self.phase_times.get(name, 0.0) + dt
            self.metrics.gauge("trainer/phase_seconds", "seconds of the last run of each phase",
                               ("phase",)).labels(phase=name).set(dt)

    def step_row(self, batch: TrainBatch, stats: dict[str, float], sync: SyncReport,
                 step_s: float) -> dict:
        """The step's line of trainer.jsonl (without its time)."""
        staleness = (self.version - 1) - batch.head_versions
        return {
            "step": self.version, "policy_version": self.version, "loss": stats.get("loss"),
            "reward_mean": float(batch.rewards.mean()),
            "staleness_mean": float(staleness.float().mean()),
            "staleness_max": int(staleness.max()), "tokens": batch.n_tokens, "seqs": batch.n_seqs,
            "tokens_per_s": batch.n_tokens / max(step_s, 1e-9), "step_seconds": step_s,
            "phase_seconds": dict(self.phase_times),
            "data_wait_seconds": self.phase_times.get("fetch_batch", 0.0),
            "weight_sync": {k: getattr(sync, k) for k in SYNC_RECORD},
            "stats": stats, "steps_trained": self.steps_trained,
            "rolled_back_steps": self.rolled_back_steps,
            "groups_dropped_bad_data": self.data.dropped_groups,
            **layout_metrics(stats, self.phase_times),
            # each task.reward_fn function's mean reward (none: the key is left out)
            **({"rewards": r} if (r := reward_fn_means(self.data.last_groups)) else {}),
        }

    def report(self, batch: TrainBatch, stats: dict[str, float], sync: SyncReport,
               step_s: float) -> None:
        if self.rank != 0:
            return
        row = self.step_row(batch, stats, sync, step_s)
        self.record(row)
        m = self.metrics
        for key in ("loss", "reward_mean", "staleness_mean", "staleness_max", "tokens_per_s",
                    "step_seconds",
                    "data_wait_seconds", "trained_tokens_per_s", *LAYOUT_STATS):
            m.gauge(f"trainer/{key}").set(float(row[key]))
        for key, value in stats.items():
            m.gauge(f"trainer/stat/{key}", f"kernel/step stat {key}").set(value)
        for name, value in row.get("rewards", {}).items():
            m.gauge("trainer/reward_fn_mean", "mean reward of each task.reward_fn function over "
                    "the step's batch", ("fn",)).labels(fn=name).set(value)
        m.gauge("trainer/policy_version").set(self.version)
        m.count_to("trainer/groups_dropped_bad_data",
                   "groups dropped from batches: what the buffer "
                   "refuses (areal_like/wire/group_checks.py)", self.data.dropped_groups)
        if "mismatch_kl" in stats:  # absent when no row was computed (trainer/step.py trained_rows)
            m.gauge("trainer/mismatch_kl").set(stats["mismatch_kl"])
        m.gauge("trainer/grad_norm").set(stats.get("grad_norm", 0.0))
        m.counter("trainer/tokens").inc(batch.n_tokens)
        m.gauge("trainer/weight_sync_seconds").set(sync.seconds)
        m.gauge("trainer/weight_sync_blocked_seconds",
                "the trainer's time inside the last push").set(sync.blocked_s)
        m.counter("trainer/weight_sync_bytes").inc(sync.bytes)
        m.counter("trainer/weight_sync_dropped").inc(len(sync.dropped))
        m.counter("trainer/weight_sync_repushed",
                  "members pushed a version again after another member was lost"
                  ).inc(len(sync.repushed))
        if sync.pause_s:
            m.gauge("trainer/weight_sync_pause_max_seconds").set(max(sync.pause_s.values()))
        self.log.info("v%d loss=%.4f reward=%.3f staleness=%.2f grad_norm=%.3f "
                      "step=%.2fs sync=%.2fs",
                      self.version, row["loss"] or 0.0, row["reward_mean"], row["staleness_mean"],
                      stats.get("grad_norm", 0.0), step_s, sync.seconds)
        self.record_samples()

    def record_samples(self) -> None:
        """Every ``tracking.sample_every`` steps (rank 0): a few decoded trajectories, one write."""
        every = self.facts.sample_every
        if self.rank != 0 or every == 0 or self.version % every != 0:
            return
        rows = sample_rows(self.data.last_groups, self.version - 1, self.facts.sample_k,
                           lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
        with (self.facts.run_dir / "samples.jsonl").open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.facts.model)

    def recorded(self, step: int) -> bool:
        """Whether the end of trainer.jsonl (its last MiB: hundreds of lines) records ``step`` or a
        later one."""
        try:
            with self.jsonl.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - (1 << 20)))
                lines = f.read().splitlines()
        except OSError:
            return False
        for line in lines:
            with contextlib.suppress(ValueError, AttributeError):  # cut by the seek, or torn
                if json.loads(line).get("step", -1) >= step:
                    return True
        return False

    def record(self, row: dict) -> None:
        if self.rank != 0:
            return
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"time": time.time(), **row}) + "\n")
