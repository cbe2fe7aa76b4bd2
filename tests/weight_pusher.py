"""A world-size-1 trainer for weight-sync tests: the real ``WeightBroadcaster`` pushing a tiny
model.

Run as ``python weight_pusher.py <config.yaml> <out_dir> '<json pushes>'``: this process drives the
members' engines (``trainer/engine_drive.py``), as a trainer does; each push is
``{"version": int, "members": int, "path": str (optional), "after": str (optional), "overlap": bool
(optional: ``push(wait=False)``, then every weight += 1000 at once, as an optimizer step would
move them while the push finishes)}``. Per push:
wait until ``<out_dir>/<after>`` exists (the test has checked the engines), until the buffer's
roster has ``members`` members, change every weight (``+= 0.01 * version``, so each version
differs), push with ``trainer.weight_sync.path`` set to ``path`` (default: the config's), and write
``<out_dir>/v<version>.json``: the ``SyncReport`` fields plus ``sha``, the SHA-256 of the weights
pushed (``test_trainer_weight_sync.weights_sha``); an overlapped push returns the PREVIOUS push's
report. Ends with the last push's report in ``<out_dir>/last.json`` and ``done`` in
``<out_dir>/pusher.done``.
"""
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))
from test_trainer_weight_sync import weights_sha  # noqa: E402

from areal_like.net.auth import engine_api_key  # noqa: E402
from areal_like.net.dealer import Client  # noqa: E402
from areal_like.settings.config import load_daemon_config  # noqa: E402
from areal_like.weights.hf import build_model  # noqa: E402
from areal_like.wire.protocol import RosterRequest  # noqa: E402
from trainer.engine_drive import EngineDrive  # noqa: E402
from trainer.weight_sync import WeightBroadcaster  # noqa: E402

# run directly, or through runpy (which leaves its own argv first)
cfg_path, out_dir, pushes = sys.argv[-3:]
cfg = load_daemon_config(["--config-file", cfg_path])
out = Path(out_dir)
# cuda: the tensor path's payloads are CUDA IPC handles
model = build_model(cfg.model, device=cfg.trainer.device)


def broadcaster(path: str) -> WeightBroadcaster:
    # the job's key (made by the first of its processes to ask, as a trainer makes it)
    key = engine_api_key(cfg.run_dir, make=True)
    engines = EngineDrive(kind=cfg.rollout.engine.kind, engine_key=key,
                          pause_mode=cfg.rollout.pause_mode, lora=cfg.trainer.lora.enabled)
    return WeightBroadcaster(replace(cfg.trainer.weight_sync, path=path),
                             buffer_address=cfg.buffer.address, rank=0,
                             device=torch.device(cfg.trainer.device), send_dtype=cfg.model.dtype,
                             engine_key=key, drive=engines)


path = cfg.trainer.weight_sync.path
wb = broadcaster(path)
roster = Client(cfg.buffer.address, timeout_s=10)
for push in json.loads(pushes):
    while push.get("after") and not (out / push["after"]).exists():
        time.sleep(0.05)
    while len(roster.request(RosterRequest()).members) != push["members"]:
        time.sleep(0.1)
    if "path" in push and push["path"] != path:  # as `run` would resolve it for a one-GPU placement
        wb.close()
        path = push["path"]
        wb = broadcaster(path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * push["version"])
    rep = wb.push(model, push["version"], wait=not push.get("overlap", False))
    sha = weights_sha(model.named_parameters())
    # the optimizer moves the weights while the push finishes in the background
    if push.get("overlap"):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1000.0)
    (out / f"v{push['version']}.tmp").write_text(json.dumps({**rep.__dict__, "sha": sha}))
    os.replace(out / f"v{push['version']}.tmp", out / f"v{push['version']}.json")
last = wb.join()  # an overlapped last push: its report
(out / "last.json").write_text(json.dumps(last.__dict__ if last is not None else {}))
(out / "pusher.done").write_text("done")
wb.close()
roster.close()
os._exit(0)  # skip interpreter teardown: destroying a gloo group at exit can abort the process
