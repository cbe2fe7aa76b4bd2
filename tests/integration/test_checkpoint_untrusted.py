"""A checkpoint loads data, never code (trainer/checkpoint.py): planted pickles and damaged files
are refused naming them. Worker: ``python test_checkpoint_untrusted.py OUT``."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

WORKER_TIMEOUT_S = 240
PLANTED = ("meta.pt", "rng_rank0.pt", ".metadata", "optim.param_groups.0.lr")
DAMAGED = ("meta.pt", "__0_0.distcp", ".metadata", "empty.metadata")  # cut short x2, missing, empty


class Planted:
    """Unpickling this runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def plant_value(directory: Path, fqn: str, marker: Path) -> None:
    """Make DCP stored non-tensor value fqn a planted pickle (shard and .metadata)."""
    import dataclasses
    import io
    import pickle

    import torch

    meta = pickle.loads((directory / ".metadata").read_bytes())  # our own file: read freely
    index, info = next((i, v) for i, v in meta.storage_data.items() if i.fqn == fqn)
    blob = io.BytesIO()
    torch.save(Planted(str(marker)), blob)
    shard = directory / info.relative_path
    offset = shard.stat().st_size
    with shard.open("ab") as f:
        f.write(blob.getvalue())
    meta.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(blob.getvalue()))
    (directory / ".metadata").write_bytes(pickle.dumps(meta))


def plant(directory: Path, name: str, marker: Path) -> None:
    import pickle

    import torch

    path = directory / name
    if name == ".metadata":
        path.write_bytes(pickle.dumps(Planted(str(marker))))
    elif name.startswith("optim."):
        plant_value(directory, name, marker)
    else:
        torch.save({"policy_version": 1, "evil": Planted(str(marker))}, path)


def _outcome(fn, marker: Path) -> dict:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001  (whatever happened; DCP's are BaseException)
        from areal_like.daemon import StartRefused

        # refused: the daemon exits 2, and its supervisor does not restart it
        return {"error": f"{type(e).__name__}: {e}", "ran": marker.exists(),
                "refused": isinstance(e, StartRefused)}
    return {"error": "", "ran": marker.exists()}


def worker(out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from areal_like.settings.config import load_config
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.export import load_checkpoint_model
    from trainer.model import build_policy, init_distributed, leave_distributed

    cfg = load_config([])
    init_distributed(cfg.trainer)
    policy = build_policy(cfg.model, cfg.trainer)
    base = Path(out).parent
    good = save_checkpoint(base / "good", policy, 1, {"last_batch_id": "b7"})
    res: dict = {}
    for name in PLANTED:
        bad = base / f"bad{name}" / good.name
        shutil.copytree(good, bad)
        marker = base / f"ran{name}"
        plant(bad, name, marker)
        fresh = build_policy(cfg.model, cfg.trainer)
        res[name] = _outcome(lambda: load_checkpoint(bad, fresh), marker)
        res[f"export{name}"] = _outcome(lambda: load_checkpoint_model(bad, cfg.model), marker)
    for name in DAMAGED:
        root = base / f"damaged{name}"
        shutil.copytree(good, root / good.name)
        bad = shutil.copytree(good, root / "v00000002")
        if name == ".metadata":
            (bad / name).unlink()
        else:  # an empty .metadata: damaged, not planted
            file = bad / name.removeprefix("empty")
            os.truncate(file, 0 if name.startswith("empty") else file.stat().st_size // 2)
        res[f"damaged{name}"] = _outcome(
            lambda: load_checkpoint(bad, build_policy(cfg.model, cfg.trainer)), root / "none")
    version, meta = load_checkpoint(good, build_policy(cfg.model, cfg.trainer))
    res["good"] = [version, meta["extra"]["last_batch_id"]]
    # a resume whose settings build another model: refused with its reason, not DCP's traceback
    for name, overrides in {"wider": ["model.intermediate_size=512"],
                            "lora": ["trainer.lora.rank=4"]}.items():
        other = load_config(overrides)
        res[name] = _outcome(lambda: load_checkpoint(good, build_policy(other.model,
                                                                        other.trainer)), good)
    Path(out).write_text(json.dumps(res))
    leave_distributed()


def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    from tests.conftest import run_json_worker

    r = run_json_worker(__file__, tmp_path / "out.json", WORKER_TIMEOUT_S)
    for name in PLANTED:
        got = r[name]
        assert not got["ran"], (name, got)  # the planted code never ran
        assert got["error"].startswith("UnsafeCheckpointError: "), (name, got)
        assert name in got["error"], (name, got)
        assert got["refused"], got  # exit 2, not a crash restarted into the same file
    # the export reads DCP's .metadata with the same allowlist, and not meta.pt, the rng files or
    # the optimizer's values at all (only the model's tensors)
    exported = r["export.metadata"]
    assert exported["error"].startswith("UnsafeCheckpointError: ") and not exported["ran"], exported
    for name in ("meta.pt", "rng_rank0.pt", "optim.param_groups.0.lr"):
        assert r[f"export{name}"] == {"error": "", "ran": False}, name
    assert r["good"] == [1, "b7"]  # a checkpoint of this trainer still resumes
    for name in DAMAGED:  # one line naming it and how to go on (exit 2 in the daemon: no restart)
        got = r[f"damaged{name}"]
        assert got["error"].startswith("StartRefused: checkpoint "), (name, got)
        assert "damaged{}/v00000002 cannot be read (".format(name) in got["error"], (name, got)
        assert got["error"].count("cannot be read") == 1, (name, got)
        assert got["error"].endswith("to resume from v00000001 before it, or use a new run_dir")
    # another model's settings (exit 2 in the daemon, which the launcher does not restart)
    assert r["wider"]["error"].startswith("StartRefused: "), r["wider"]
    assert "holds another model's weights" in r["wider"]["error"]
    assert "_proj.weight: saved (256, 128), this model (512, 128)" in r["wider"]["error"]
    assert r["lora"]["error"].startswith("StartRefused: ") and "saved None" in r["lora"]["error"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    worker(sys.argv[1])
    from areal_like.daemon import exit_process

    # as the trainer exits: FSDP's caches keep the gloo group's threads past
    # destroy_process_group, and the interpreter's teardown can abort on them (SIGABRT)
    exit_process(0)
