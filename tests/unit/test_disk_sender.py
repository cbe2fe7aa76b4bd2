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


def test_an_adapter_push_writes_what_peft_loads_onto_the_base(sender):
    from peft import PeftModel

    model = add_adapters(build_model(CFG.model), CFG.trainer.lora).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)
    params = PushTensors(model)
    buckets = push_buckets(params, "float32", bucket_mb=0.001)
    sender.stage(model, params, buckets, SyncReport(version=3))
    route = sender.route(3, [("s", 1, "")])
    assert route["path"] == "disk" and len(buckets) == len(route["payloads"]) == 1
    loaded = PeftModel.from_pretrained(build_model(CFG.model), route["payloads"][0]).eval()
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_an_adapter_push_overlaps_and_writes_the_staged_values_not_later_ones(sender):
    """An adapter's push may finish in the background (``overlaps``) while the next step trains:
    the directory written then holds the adapter as it was staged. A full model never overlaps."""
    from safetensors.torch import load_file

    model = add_adapters(build_model(CFG.model), CFG.trainer.lora)
    params = PushTensors(model)
    buckets = push_buckets(params, "float32", bucket_mb=64)
    full = push_buckets(PushTensors(build_model(CFG.model)), "float32", 64)
    assert sender.overlaps(buckets) and not sender.overlaps(full)
    sender.stage(model, params, buckets, SyncReport(version=1))
    staged = {n: p.detach().clone() for n, p in params.params}
    with torch.no_grad():  # the next step's optimizer, before the background write
        for _, p in params.params:
            p.add_(1.0)
    out = sender.route(1, [("s", 1, "")])["payloads"][0]
    written = load_file(f"{out}/adapter_model.safetensors")
    assert len(written) == len(staged)
    for name, t in staged.items():
        key = next(k for k in written if k.endswith(name.replace(".default.", ".")))
        torch.testing.assert_close(written[key], t, rtol=0, atol=0)


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
