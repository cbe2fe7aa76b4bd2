"""Finite numbers or no step (trainer/finite_guard.py): 2 FSDP2 ranks and the trainer daemon; a
skip is collective (all_finite). Workers: ``python -c RUNNER test_trainer_nonfinite.py OUT``."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from tests.helpers_trainer import BufferStandIn

RUNNER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
WORKER_TIMEOUT_S = 480  # 9 kernels x 4 steps on 2 ranks of a loaded 2-core machine
KERNELS = ("ppo", "decoupled_ppo", "tis", "mis", "icepop", "gspo", "vespo", "vcpo", "oapl")
BAD = {"nan": math.nan, "-inf": -math.inf}


def poisoned(value: float, seed: int = 0, version: int = 0):
    """``synthetic_groups`` with ``value`` as the behaviour log-prob of one token of group 1."""
    import msgspec
    import numpy as np
    from test_trainer_invariance import synthetic_groups

    from areal_like.wire.trajectory import Trajectory

    groups = synthetic_groups(seed=seed, version=version)
    t = groups[1].trajectories[0]
    logp = np.array(t.behav_logp, dtype=np.float32)
    logp[0] = value
    bad = Trajectory.of(prompt_ids=t.prompt_ids, output_ids=t.output_ids, behav_logp=logp,
                        versions=t.versions, reward=t.reward, finish_reason=t.finish_reason)
    groups[1] = msgspec.structs.replace(groups[1], trajectories=[bad, *groups[1].trajectories[1:]])
    return groups


def _finite(state: dict) -> bool:
    import torch

    return all(bool(torch.isfinite(w).all()) for w in state.values())


def _same(a: dict, b: dict) -> bool:
    import torch

    return all(torch.equal(a[k], b[k]) for k in a)


def _step(policy, s, groups, before: dict) -> tuple[dict, dict]:
    """One ``train_step`` on ``groups``: what it did, and the weights after it."""
    from tests.helpers_trainer import full_state_dict
    from trainer.data import groups_to_batch
    from trainer.step import recompute_prox_logp, train_step

    batch = groups_to_batch(groups)
    stats = train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))
    after = full_state_dict(policy.model)
    adam = sorted({int(v["step"]) for v in policy.optimizer.state.values()})
    return {"skipped": stats["nonfinite_skipped"], "loss": stats["loss"],
            "grad_norm": stats["grad_norm"], "applied": stats["optimizer_steps"],
            "finite": _finite(after), "unchanged": _same(before, after), "adam_steps": adam}, after


def kernel_run(kernel: str):
    """One kernel: (NaN batch, clean batch, -inf batch, clean batch), each step's outcome."""
    from test_trainer_invariance import synthetic_groups

    from areal_like.settings.config import load_config
    from tests.helpers_trainer import full_state_dict
    from trainer.model import build_policy
    from trainer.step import StepSettings

    cfg = load_config(["trainer.lr=1e-2", "trainer.micro_batch_size=4", f"loss={kernel}"])
    policy, s = build_policy(cfg.model, cfg.trainer, adam_eps=1e-3), StepSettings.from_config(cfg)
    weights, out = full_state_dict(policy.model), []
    for value in BAD.values():
        for groups in (poisoned(value), synthetic_groups(seed=len(out) + 1)):
            got, weights = _step(policy, s, groups, weights)
            out.append(got)
    return out, policy


def _refused_save(policy, root: Path, rank: int) -> str:
    """Put a NaN in one rank's shard of one weight and try to checkpoint."""
    import torch

    from trainer.checkpoint import save_checkpoint
    from trainer.finite_guard import NonFiniteStateError

    with torch.no_grad():
        p = next(policy.model.parameters())
        local = p.to_local() if hasattr(p, "to_local") else p
        if rank == 1 and local.numel():
            local.view(-1)[0] = math.nan
    try:
        save_checkpoint(root, policy, 2)
        return "saved"
    except NonFiniteStateError as e:
        return str(e)


def worker(out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from areal_like.settings.config import load_config
    from trainer.checkpoint import latest_checkpoint, save_checkpoint
    from trainer.finite_guard import all_finite
    from trainer.model import init_distributed, leave_distributed

    rank, _ = init_distributed(load_config([]).trainer)
    res: dict = {"one_rank_nan": all_finite(1.0, math.nan if rank == 1 else 2.0),
                 "all_ok": all_finite(1.0, 2.0)}
    for kernel in KERNELS:
        res[kernel], policy = kernel_run(kernel)
    root = Path(out).parent / "checkpoints"
    save_checkpoint(root, policy, 1)
    res["nonfinite_save"] = _refused_save(policy, root, rank)
    res["latest"] = latest_checkpoint(root).name
    res["tmp_dirs"] = sorted(x.name for x in root.iterdir() if x.name.startswith("."))
    if rank == 0:
        torch.save(res, out)
    leave_distributed()


def _check_kernel(kernel: str, steps: list[dict]) -> bool:
    """The kernel's four steps are as the module docstring says; True if a bad batch was skipped."""
    assert all(s["finite"] for s in steps), (kernel, steps)  # never a non-finite weight
    skipped = False
    for bad, clean in (steps[0], steps[1]), (steps[2], steps[3]):
        nonfinite = not (math.isfinite(bad["loss"]) and math.isfinite(bad["grad_norm"]))
        assert bad["skipped"] == float(nonfinite), (kernel, bad)  # skipped exactly when not finite
        if nonfinite:
            skipped = True
            assert bad["unchanged"] and bad["applied"] == 0, (kernel, bad)  # no update at all
        # the job goes on: the clean batch after it trains and moves the weights
        assert clean["skipped"] == 0 and clean["applied"] == 1, (kernel, clean)
        assert not clean["unchanged"], (kernel, clean)
        assert math.isfinite(clean["loss"]) and math.isfinite(clean["grad_norm"]), (kernel, clean)
    # Adam's step counter counts the applied steps only: a skipped one left its state untouched
    assert steps[-1]["adam_steps"] == [sum(int(s["applied"]) for s in steps)], (kernel, steps[-1])
    return skipped


def test_a_nonfinite_group_leaves_the_weights_finite_under_every_kernel_on_two_ranks(
        tmp_path, spawn_python, free_port):
    import torch

    ranks = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [spawn_python(RUNNER, [__file__, tmp_path / "out.pt"], capture=False,
                          env={**ranks, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    assert [p.wait(timeout=WORKER_TIMEOUT_S) for p in procs] == [0, 0]
    r = torch.load(tmp_path / "out.pt", weights_only=True)
    assert r["one_rank_nan"] is False and r["all_ok"] is True  # one rank's NaN: both ranks skip
    skipped = {kernel for kernel in KERNELS if _check_kernel(kernel, r[kernel])}
    # the kernels the issue found broken by one such group are among those the guard caught
    assert {"tis", "vcpo", "oapl"} <= skipped, skipped
    assert r["nonfinite_save"].startswith("the model's state holds NaN or inf"), r["nonfinite_save"]
    assert r["latest"] == "v00000001" and r["tmp_dirs"] == []  # nothing written; the good one stays


class CleanBuffer(BufferStandIn):
    """Buffer stand-in: clean synthetic batches, rosters without engines, version acks."""

    def answer(self, m):
        from test_trainer_invariance import synthetic_groups

        from areal_like.wire import protocol as P

        if isinstance(m, P.BatchRequest):
            v = m.trainer_version
            return P.Batch(groups=synthetic_groups(seed=v, version=v), trainer_version=v,
                           batch_id=f"b{v}")
        if isinstance(m, P.RosterRequest):
            return P.Roster(members=[], policy_version=0)
        return P.Ack(ref="", status="ok")


def test_the_trainer_skips_nonfinite_steps_and_stops_after_the_limit(tmp_path, spawn_python,
                                                                    free_port):
    """lr=1e30: non-finite steps are skipped and counted; the 3rd in a row stops the job."""
    import json

    import torch

    from areal_like.settings.config import load_config, to_yaml

    address = f"tcp://127.0.0.1:{free_port()}"
    cfg = load_config([f"run_dir={tmp_path}", "security.curve=false", f"buffer.address={address}",
                       "loss=oapl", "trainer.lr=1e30", "trainer.checkpoint_every=1",
                       "trainer.steps=50",
                       "trainer.micro_batch_size=4", "trainer.max_nonfinite_skips=3",
                       "trainer.logprob_guard_tol=0", "trainer.batch_wait_s=1"])
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(to_yaml(cfg))
    buffer = CleanBuffer(address)
    try:
        proc = spawn_python("trainer", ["--config-file", cfg_path])
        _, err = proc.communicate(timeout=WORKER_TIMEOUT_S)
    finally:
        buffer.close()
    assert proc.returncode != 0, err[-3000:]
    assert "3 trainer steps in a row (up to version 4) had a non-finite loss" in err, err[-3000:]
    assert "trainer.max_nonfinite_skips=3" in err, err[-3000:]
    assert "skipped 1 optimizer step(s)" in err, err[-3000:]  # the rate-limited warning
    lines = (tmp_path / "metrics" / "trainer.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if "step" in r]
    got = [(r["step"], r["stats"]["nonfinite_skipped"], r["stats"]["optimizer_steps"])
           for r in steps]
    assert got == [(1, 0.0, 1.0), (2, 1.0, 0.0), (3, 1.0, 0.0)]  # the 4th raised before its record
    ckpts = sorted((tmp_path / "checkpoints").glob("v*"))
    assert [p.name for p in ckpts] == ["v00000002", "v00000003"]  # trainer.keep_checkpoints=2
    meta = torch.load(ckpts[-1] / "meta.pt", weights_only=True)
    assert all(map(math.isfinite, meta["checksums"].values()))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    worker(sys.argv[2])  # argv: -c, this file, OUT (see RUNNER)
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
