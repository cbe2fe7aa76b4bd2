"""A one-rank checkpoint resumes on two ranks (scale trainer=2): DCP reshards model and optimizer
and the next step equals one rank's and the unstopped run's (1e-5). Worker: ``python -c RUNNER
test_trainer_reshard.py OUT_DIR`` (save, one or two); AdamW eps=1e-3 keeps steps linear.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

RUNNER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
WORKER_TIMEOUT_S = 300  # cold torch + transformers imports of three processes on 2 loaded cores
SETTINGS = ["trainer.lr=1e-2", "trainer.grad_clip=1e9", "trainer.micro_batch_size=2"]


def worker(out_dir: Path) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer_invariance import synthetic_groups

    from areal_like.settings.config import load_config
    from tests.helpers_trainer import full_state_dict
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.data import groups_to_batch
    from trainer.model import build_policy, init_distributed, leave_distributed
    from trainer.step import StepSettings, recompute_prox_logp, train_step

    cfg = load_config(SETTINGS)
    rank, _ = init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer, adam_eps=1e-3)
    s = StepSettings.from_config(cfg)

    def step(seed: int) -> dict:
        batch = groups_to_batch(synthetic_groups(seed=seed))
        return train_step(policy, batch, s, recompute_prox_logp(policy, batch, s))

    if out_dir.name == "save":
        step(1)
        save_checkpoint(out_dir / "ckpt", policy, 1)
    else:
        version, _ = load_checkpoint(out_dir.parent / "save" / "ckpt" / "v00000001", policy)
        assert version == 1
    at_checkpoint = full_state_dict(policy.model)
    res = {"stats": step(2), "weights": full_state_dict(policy.model)}
    # the second update: Adam's moments from the first step shape it
    res["update"] = {k: w - at_checkpoint[k] for k, w in res["weights"].items()}
    if rank == 0:
        torch.save(res, out_dir / "res.pt")
    leave_distributed()


@pytest.mark.slow
@pytest.mark.timeout(2 * WORKER_TIMEOUT_S + 60)
def test_a_one_rank_checkpoint_resumes_on_two_ranks_with_the_same_loss(tmp_path, spawn_python,
                                                                        free_port):
    import torch

    save = tmp_path / "save"
    save.mkdir()
    assert spawn_python(RUNNER, [__file__, save], capture=False).wait(WORKER_TIMEOUT_S) == 0
    one, two = spawn_python.one_and_two_ranks(RUNNER, __file__, tmp_path, free_port(),
                                              WORKER_TIMEOUT_S)
    kept, one, two = (torch.load(d / "res.pt") for d in (save, one, two))
    for res in (one, two):
        for key in ("loss", "grad_norm"):
            assert abs(res["stats"][key] - kept["stats"][key]) <= 1e-5 * (
                1 + abs(kept["stats"][key])), (key, res["stats"][key], kept["stats"][key])
        assert res["weights"].keys() == kept["weights"].keys()
        for k, w in kept["weights"].items():
            torch.testing.assert_close(res["weights"][k], w, rtol=0, atol=1e-5, msg=k)
            want, got = kept["update"][k], res["update"][k]
            # relative to the update itself, which can be far smaller than the weights
            assert (got - want).abs().max() <= 1e-3 * want.abs().max() + 1e-9, (
                k, float((got - want).abs().max()), float(want.abs().max()))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(Path(sys.argv[2]))  # argv: -c, this file, OUT_DIR (see RUNNER)
    from areal_like.daemon import exit_process

    exit_process(0)
