"""Trainer-side stand-in for weight-sync tests: group rank 0 broadcasting a model's tensors.

Run as ``python weight_sender.py '<json spec>'`` (tests pass its text to ``python -c``). Spec:
``model`` (ModelConfig fields), ``port``, ``group``, ``buckets`` (lists of parameter names, the
broadcast order), optional ``world_size`` (2: this rank and one engine rank), ``backend`` (gloo),
``device`` (cpu), ``timeout_s`` (120), ``key`` (required: the job's engine API key its store gate
asks for, which the engine's door proves),
``load_format`` (``"flattened_bucket"``: one packed broadcast per bucket with the trainer's
``BucketPipeline``, what ``apply_weight_sync`` announces; null: one broadcast per tensor),
``rounds`` (a list of ``{"seed": int, "dtype": str}``: push the buckets once per round, the model
built with that init seed and sent in that wire dtype; default one round of ``model`` in its own
dtype), ``stop_after`` (exit abruptly, as a crashed trainer, once that many buckets were broadcast),
``wait_for`` (a path: broadcast nothing until that file exists), ``state_file`` (instead of a model:
one round of the name -> tensor dict ``torch.save`` wrote there, e.g. a LoRA adapter). Prints
``ready`` once the model is built (before the rendezvous) and ``sent`` after the last tensor.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

torch.set_num_threads(1)
from areal_like.net.distributed import init_weight_group  # noqa: E402
from areal_like.settings.config import ModelConfig  # noqa: E402
from areal_like.weights.hf import build_model  # noqa: E402
from areal_like.wire.weight_wire import FLATTENED  # noqa: E402
from trainer.weight_buckets import BucketPipeline  # noqa: E402

spec = json.loads(sys.argv[1])
device = spec.get("device", "cpu")
states = [torch.load(spec["state_file"])] if spec.get("state_file") else []  # tensors the test made
for r in [] if states else spec.get("rounds") or [{}]:
    cfg = ModelConfig(**{**spec["model"], **({"init_seed": r["seed"]} if "seed" in r else {})})
    dtype = getattr(torch, r["dtype"]) if "dtype" in r else None
    states.append({n: t.to(dtype or t.dtype)
                   for n, t in build_model(cfg, device=device).state_dict().items()})
print("ready", flush=True)
pg = init_weight_group(spec.get("backend", "gloo"), "127.0.0.1", spec["port"],
                       spec.get("world_size", 2), 0, spec["group"], spec.get("timeout_s", 120),
                       key=spec["key"])
pipeline = BucketPipeline()
sent = 0
while spec.get("wait_for") and not os.path.exists(spec["wait_for"]):
    time.sleep(0.05)
for state in states:
    for names in spec["buckets"]:
        if sent == spec.get("stop_after", -1):
            pipeline.finish()
            print("crashing", flush=True)
            os._exit(3)
        sent += 1
        if spec.get("load_format", FLATTENED) == FLATTENED:
            pipeline.send([state[name] for name in names], pg)
        else:
            for name in names:
                dist.broadcast(state[name].contiguous(), group_src=0, group=pg)
pipeline.finish()
if device.startswith("cuda"):
    torch.cuda.synchronize()
print("sent", flush=True)
os._exit(0)  # skip interpreter teardown: destroying a gloo group at exit can abort the process
