"""The one-GPU ``tensor`` path on CPU (the same code takes CUDA IPC handles on a GPU): each bucket
is one shared buffer the sender keeps from push to push, mapped once and loaded with one copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import torch

from areal_like.settings.config import ModelConfig
from areal_like.weights.hf import build_model
from rollout_server.engine.scheduler import Scheduler
from rollout_server.engine.weights import WeightUpdater

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 120.0
SENDER = r"""
import json, sys, types, torch
from areal_like.settings.config import ModelConfig, WeightSyncConfig
from areal_like.weights.hf import build_model
from areal_like.weights.plan import plan_buckets
from trainer.weight_buckets import PushTensors
from trainer.weight_local import TensorSender

sender = TensorSender(WeightSyncConfig(), "gloo", 0, "float32")
for seed in (1, 2):
    model = build_model(ModelConfig(init_seed=seed))
    params = PushTensors(model)  # what WeightBroadcaster.push sends
    buckets = plan_buckets([(n, s, "float32") for n, s, _ in params.entries], 1 << 16)
    sender.stage(model, params, buckets, types.SimpleNamespace(bytes=0))
    print(json.dumps(sender.route(seed, [("e", 1, "")])["payloads"]), flush=True)
    sys.stdin.readline()  # the engine has loaded this push
    sender.done()
sender.close()
"""


def _answer(out) -> tuple[bool, str]:
    return out.result(WAIT_S) if isinstance(out, Future) else out


def test_buckets_map_once_and_load_with_one_copy_each(monkeypatch):
    torch.set_num_threads(1)
    model = build_model(ModelConfig())
    scheduler = Scheduler(model, max_running=2, max_total_tokens=4096, context_len=192,
                          weight_version="0").start()
    updater = WeightUpdater(scheduler, ModelConfig(), WAIT_S)
    opened, copies = [0], [0]
    new_shared, copy_ = torch.UntypedStorage._new_shared_filename_cpu, torch.Tensor.copy_

    def counted_open(*args, **kwargs):
        opened[0] += 1
        return new_shared(*args, **kwargs)

    def counted_copy(self, *args, **kwargs):
        copies[0] += 1
        return copy_(self, *args, **kwargs)
    monkeypatch.setattr(torch.UntypedStorage, "_new_shared_filename_cpu", counted_open)
    monkeypatch.setattr(torch.Tensor, "copy_", counted_copy)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    sender = subprocess.Popen([sys.executable, "-c", SENDER], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        per_push = []
        for seed in (1, 2):
            payloads = json.loads(sender.stdout.readline())
            assert len(payloads) >= 2  # several buckets
            opened[0] = copies[0] = 0
            for i, payload in enumerate(payloads):
                last = i == len(payloads) - 1
                ok, reason = _answer(updater.update_from_tensor(
                    [payload], None, str(seed) if last else None, False))
                assert ok, reason
            per_push.append((opened[0], copies[0], len(payloads)))
            expected = build_model(ModelConfig(init_seed=seed)).state_dict()
            got = scheduler.call(lambda s: {n: t.clone() for n, t in
                                            s.model.state_dict().items()}).result(WAIT_S)
            assert scheduler.weight_version == str(seed)
            assert all(torch.equal(got[n], t) for n, t in expected.items())
            sender.stdin.write("loaded\n")
            sender.stdin.flush()
        assert sender.wait(WAIT_S) == 0
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(WAIT_S)
        scheduler.stop()
        updater.close()
    (opened1, copies1, buckets), (opened2, copies2, _) = per_push
    assert opened1 >= 1 and opened2 == 0, per_push  # the second push finds its buffers mapped
    assert copies1 <= buckets and copies2 <= buckets, per_push  # one copy per bucket
