"""TORCH_NCCL_NONBLOCKING_TIMEOUT (read once, at the first NCCL call; 30 minutes by default) is
set from trainer.weight_sync.deadline_s before the first process group (net/distributed.py)."""

from __future__ import annotations

import os

import pytest

from areal_like.net.distributed import NCCL_NONBLOCKING_TIMEOUT
from areal_like.settings.config import load_config


class FirstGroup(Exception):
    pass


@pytest.mark.parametrize(("deadline_s", "want"), [(60.0, "60"), (7.2, "8"), (0.3, "1")])
def test_the_timeout_is_in_the_environment_before_the_first_group(monkeypatch, deadline_s, want):
    import torch.distributed as dist

    from trainer import model

    monkeypatch.setenv(NCCL_NONBLOCKING_TIMEOUT, "1800")  # torch's default, as if a user had set it
    seen = []

    def first_group(*args, **kwargs):
        seen.append(os.environ.get(NCCL_NONBLOCKING_TIMEOUT))
        raise FirstGroup

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", first_group)
    cfg = load_config([f"trainer.weight_sync.deadline_s={deadline_s}"])
    for env in ({}, {"RANK": "0", "WORLD_SIZE": "1"}):  # plain `python -m trainer`, and torchrun
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(FirstGroup):
            model.init_distributed(cfg.trainer)
    assert seen == [want, want]

