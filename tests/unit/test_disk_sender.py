"""``DiskSender``: an adapter's directory is what PEFT loads; a killed writer's are removed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from areal_like.settings.config import WeightSyncConfig, load_config
from areal_like.weights.hf import build_model
from areal_like.weights.lora import add_adapters
from trainer.weight_buckets import PushTensors
from trainer.weight_local import ROOT_PREFIX, DiskSender, remove_orphans
from trainer.weight_sync import SyncReport, push_buckets

CFG = load_config(["trainer.lora.rank=4"])


@pytest.fixture
def sender():
    sender = DiskSender(WeightSyncConfig(path="disk"), "gloo", 0, "float32")
    yield sender
    sender.close()


def test_an_adapter_push_writes_what_peft_loads_onto_the_base_as_it_was_staged(sender):
    """An adapter's push may finish in the background (``overlaps``) while the next step trains:
    the directory written then holds the adapter as it was staged. A full model never overlaps."""
    from peft import PeftModel

    model = add_adapters(build_model(CFG.model), CFG.trainer.lora).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)
    params = PushTensors(model)
    buckets = push_buckets(params, "float32", bucket_mb=0.001)
    full = push_buckets(PushTensors(build_model(CFG.model)), "float32", 64)
    assert sender.overlaps(buckets) and not sender.overlaps(full)
    sender.stage(model, params, buckets, SyncReport(version=3))
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        staged = model(ids).logits
        for _, p in params.params:  # the next step's optimizer, before the background write
            p.add_(1.0)
    route = sender.route(3, [("s", 1, "")])
    assert route["path"] == "disk" and len(buckets) == len(route["payloads"]) == 1
    loaded = PeftModel.from_pretrained(build_model(CFG.model), route["payloads"][0]).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, staged, rtol=0, atol=1e-6)


def test_a_killed_writers_directory_goes_and_a_live_ones_stays(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True,
                          text=True, check=True).stdout.strip()
    dead = tmp_path / f"{ROOT_PREFIX}{gone}_abc"
    live = tmp_path / f"{ROOT_PREFIX}{1}_abc"  # init: alive
    for d in (dead, live):
        (d / "v1-000000").mkdir(parents=True)
    assert remove_orphans(str(tmp_path)) == [dead]
    assert not dead.exists() and live.exists()
