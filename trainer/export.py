"""Hugging Face export: the policy as a directory that ``from_pretrained`` and SGLang load as is.

The layout is ``save_pretrained``'s (safetensors shards of at most ``shard_mb`` MiB and their
index), plus the tokenizer and ``areal_like_task.yaml`` (``export_yaml``: the task, eval.*, seed
and policy version, for ``areal-like eval`` of the export away from its run). Two
ways in: ``export_hf`` on the trainer's model during a run, and ``python -m trainer.export
CHECKPOINT OUT`` (``areal-like export``) from a DCP checkpoint, in one process.

Invariants:
- ``export_hf`` is a collective; parameters are gathered one at a time and rank 0 writes each
  shard as it fills: never a second copy of the model.
- Atomic: written into ``.tmp_<name>`` and renamed when complete.
- LoRA: the adapter in PEFT's layout, plus a streamed merged model with ``export.merged``. The
  adapter names its base by ``model.path``; with none (a model built from its config) only a
  merged export can be loaded, so ``main`` refuses another (``export_without_base``), as the
  preflight refuses such a run.
- A tied parameter is written once, under its first name, as ``save_pretrained`` does.
- The tokenizer files hold no argument it was loaded with (``save_tokenizer``: no
  ``local_files_only`` of an offline daemon for whoever loads the export elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from areal_like.settings.config import (
    EXPORT_TASK_FILE,
    LoraConfig,
    ModelConfig,
    RunConfig,
    TaskConfig,
    export_yaml,
)
from areal_like.weights.hf import checkpoint_layout, save_tokenizer, torch_dtype
from areal_like.weights.lora import (
    ADAPTER,
    add_adapters,
    base_name,
    export_without_base,
    has_adapters,
    is_adapter,
)
from trainer.checkpoint import (
    PREFIX,
    dcp_load,
    latest_checkpoint,
    load_data,
    open_tmp,
    publish,
    refuse_other_settings,
)
from trainer.ranks import barrier, rank_world
from trainer.ranks import full as full_tensor

log = logging.getLogger("trainer.export")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_NAME = "model-{k:05d}-of-{n:05d}.safetensors"
MIB = 2**20
ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's names (peft.utils.SAFETENSORS_WEIGHTS_NAME)
PEFT_PREFIX = "base_model.model."  # a PeftModel's prefix of the wrapped model's names
MERGED_DIR = "merged"


def _exported_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight, each storage once, in the same order on every rank."""
    keys = set(model.state_dict())
    yield from model.named_parameters()
    yield from ((name, b) for name, b in model.named_buffers() if name in keys)


def _merged_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of the base with each adapter folded in, ``W + scaling * B @ A``."""
    from peft.tuners.lora import LoraLayer

    layers = {f"{n}.base_layer.weight": m for n, m in model.named_modules()
              if isinstance(m, LoraLayer)}
    for name, t in _exported_tensors(model):
        if is_adapter(name):
            continue
        full = _gather(t)
        layer = layers.get(name)
        if layer is not None:
            a, b = (_gather(x[ADAPTER].weight).float() for x in (layer.lora_A, layer.lora_B))
            full = full.float() + (b @ a) * layer.scaling[ADAPTER]
        yield base_name(name), full


def save_adapter(out_dir: Path, named: dict[str, torch.Tensor], model: torch.nn.Module,
                 base_path: str | None) -> None:
    """Write the adapter ``named`` (full tensors by name) into ``out_dir`` in PEFT's layout."""
    from safetensors.torch import save_file

    tensors = {PEFT_PREFIX + n.replace(f".{ADAPTER}.", "."): t.detach().to("cpu").contiguous()
               for n, t in named.items()}
    save_file(tensors, str(Path(out_dir) / ADAPTER_FILE), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[ADAPTER])
    config.base_model_name_or_path = base_path
    config.task_type = "CAUSAL_LM"  # what AutoPeftModelForCausalLM and servers read
    config.inference_mode = True
    config.save_pretrained(str(out_dir))


def export_adapter(model: torch.nn.Module, out_dir: Path, *, model_cfg: ModelConfig, tokenizer,
                   shard_mb: int, dtype: str, task_file: str | None = None,
                   merged: bool = False) -> Path:
    """A LoRA policy's export (a collective): the adapter in PEFT's layout, the tokenizer and
    ``task_file``; with ``merged`` also ``out_dir/merged``, a plain HF model with the adapter
    folded in."""
    rank = rank_world()[0]
    tmp = open_tmp(out_dir)
    if merged:  # written into tmp/merged: the rename below publishes both at once
        _write_hf(model, _merged_tensors(model), tmp / MERGED_DIR, model_cfg=model_cfg,
                  tokenizer=tokenizer, shard_mb=shard_mb, dtype=dtype, task_file=task_file)
    adapter = {}
    for name, p in model.named_parameters():  # every rank, same order: full_tensor is a collective
        if is_adapter(name):
            full = _gather(p)
            if rank == 0:
                adapter[name] = full.to("cpu", torch_dtype(dtype)).contiguous()
    if rank == 0:
        save_adapter(tmp, adapter, model, model_cfg.path)
        save_tokenizer(tokenizer, tmp)
        _publish(tmp, out_dir, task_file)
        log.info("exported adapter %s (%d tensors%s)", out_dir, len(adapter), ", merged" * merged)
    barrier()
    return out_dir


def _publish(tmp: Path, out_dir: Path, task_file: str | None) -> None:
    """Rank 0: ``task_file`` (``EXPORT_TASK_FILE``), then ``tmp`` renamed over ``out_dir``."""
    if task_file is not None:
        (tmp / EXPORT_TASK_FILE).write_text(task_file)
    publish(tmp, out_dir)


def _gather(t: torch.Tensor) -> torch.Tensor:
    return full_tensor(t.detach())


class _ShardWriter:
    """Fills one shard at a time; writes it when the next tensor would overflow it."""

    def __init__(self, directory: Path, max_bytes: int):
        self.dir, self.max_bytes = directory, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        # (temporary file, tensor names) per written shard
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.total_params = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self.flush()
        self.current[name] = t
        self.current_bytes += size
        self.total_bytes += size
        self.total_params += t.numel()
        if self.current_bytes >= self.max_bytes:  # a tensor over the limit gets a shard of its own
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        path = self.dir / f"shard-{len(self.files):05d}.tmp"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> int:
        """Name the files as transformers does (and the index); returns the shard count."""
        self.flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.files[0][0], self.dir / SINGLE_FILE)
            return 1
        weight_map = {}
        for k, (path, names) in enumerate(self.files, start=1):
            final = SHARD_NAME.format(k=k, n=n)
            os.replace(path, self.dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_parameters": self.total_params,
                              "total_size": self.total_bytes},
                 "weight_map": weight_map}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return n


def generation_config(model_cfg: ModelConfig, tokenizer, model_config):
    """The model's generation defaults with the tokenizer's bos / pad ids, its eos id first."""
    from transformers import GenerationConfig

    src = Path(model_cfg.path) if model_cfg.path else None
    if src is not None and (src / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(src))
    else:
        gen = GenerationConfig.from_model_config(model_config)
    for key in ("bos_token_id", "pad_token_id"):
        if getattr(tokenizer, key, None) is not None:
            setattr(gen, key, getattr(tokenizer, key))
    eos = tokenizer.eos_token_id
    if eos is not None:
        old = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        # keep a chat model's other stop ids
        ids = [eos] + [i for i in old if i is not None and i != eos]
        gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    return gen


def _add_legacy_keys(path: Path) -> None:
    """Add the config keys transformers 4 reads (``torch_dtype``, ``rope_theta``,
    ``rope_scaling``) beside transformers 5's ``dtype`` and ``rope_parameters``."""
    config = json.loads(path.read_text())
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_metadata(model: torch.nn.Module, directory: Path, model_cfg: ModelConfig, tokenizer,
                    dtype: str) -> None:
    config = copy.deepcopy(model.config)
    # fully_shard swaps the class for a subclass named FSDP<Name>; the config must name the HF class
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config.dtype = dtype
    config.use_cache = True  # the trainer turns the KV cache off; inference wants it
    config.save_pretrained(str(directory))
    _add_legacy_keys(directory / "config.json")
    generation_config(model_cfg, tokenizer, config).save_pretrained(str(directory))
    save_tokenizer(tokenizer, directory)


def export_hf(model: torch.nn.Module, out_dir: Path, *, model_cfg: ModelConfig, tokenizer,
              shard_mb: int,
              dtype: str, task_file: str | None = None, merged: bool = False) -> Path:
    """Write ``model`` as an HF directory at ``out_dir`` in ``dtype`` (a collective; rank 0 writes;
    an existing ``out_dir`` is replaced), with ``task_file`` (``export_yaml``: what ``areal-like
    eval`` reads of the run) as ``EXPORT_TASK_FILE``. With LoRA adapters: ``export_adapter``."""
    if has_adapters(model):
        return export_adapter(model, out_dir, model_cfg=model_cfg, tokenizer=tokenizer,
                              shard_mb=shard_mb, dtype=dtype, task_file=task_file, merged=merged)
    full = ((name, _gather(t)) for name, t in _exported_tensors(model))
    return _write_hf(model, full, out_dir, model_cfg=model_cfg, tokenizer=tokenizer,
                     shard_mb=shard_mb, dtype=dtype, task_file=task_file)


def _write_hf(model: torch.nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path,
              *, model_cfg: ModelConfig, tokenizer, shard_mb: int, dtype: str,
              task_file: str | None) -> Path:
    """``export_hf``'s writer: ``tensors`` (name, full tensor) on every rank, written by rank 0."""
    rank = rank_world()[0]
    tmp = open_tmp(out_dir)
    writer = _ShardWriter(tmp, shard_mb * MIB) if rank == 0 else None
    dt = torch_dtype(dtype)
    for name, full in tensors:
        if writer is not None:  # in the checkpoint layout save_pretrained writes (per expert)
            for saved, t in checkpoint_layout(model, name, full):
                writer.add(saved, t.to("cpu", dt).contiguous())
        del full
    if writer is not None:
        n = writer.finish()
        _write_metadata(model, tmp, model_cfg, tokenizer, dtype)
        # what the umask gives (safetensors: 0600)
        mode = (tmp / "config.json").stat().st_mode & 0o777
        for weights in tmp.glob("*.safetensors"):
            os.chmod(weights, mode)
        _publish(tmp, out_dir, task_file)
        log.info("exported %s (%d shard%s, %.1f MiB, %s)", out_dir, n, "s" * (n > 1),
                 writer.total_bytes / MIB, dtype)
    barrier()
    return out_dir


def prune_exports(root: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest exports ``v<version>`` under ``root``; returns them."""
    done = sorted((p for p in root.glob("v*") if p.name[1:].isdigit() and (
                   (p / "config.json").is_file() or (p / "adapter_config.json").is_file())),
                  key=lambda p: int(p.name[1:]))
    old = done[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


# ------------------------------------------------------------------ offline: DCP checkpoint -> HF
def load_checkpoint_model(checkpoint: Path, model_cfg: ModelConfig,
                          lora: LoraConfig | None = None) -> torch.nn.Module:
    """A fresh fp32 CPU model holding a trainer DCP checkpoint's model state (one process)."""
    from areal_like.weights.hf import build_model

    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a trainer checkpoint (no .metadata: expected "
                                "<run_dir>/checkpoints/v<version>)")
    lora = lora or LoraConfig()
    refuse_other_settings(checkpoint, model_cfg, lora, "export it with the model.* and "
                          "trainer.lora.* settings it was saved with (--config-file: a config.yaml "
                          "that has them)")
    model = build_model(model_cfg, device="cpu", dtype="float32")
    if lora.enabled:
        add_adapters(model, lora)
    state = {"model": model.state_dict()}
    # DCP warns that it loads in a single process: that is the point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp_load(state, checkpoint, no_dist=True)  # data only (trainer/checkpoint.py)
    model.load_state_dict(state["model"])
    return model


def export_tokenizer(model_cfg: ModelConfig, task: TaskConfig, tokenizer=None):
    """The run's tokenizer carrying the chat template the rollout servers prompt with, so an
    exported model is served as it was trained."""
    from areal_like.tasks.task import chat_template_of
    from areal_like.tasks.tokenizer import load_tokenizer

    # the caller's, when it has one
    tok = tokenizer if tokenizer is not None else load_tokenizer(model_cfg)
    template = chat_template_of(tok, task)
    if template and template != getattr(tok, "chat_template", None):
        tok = copy.deepcopy(tok)  # the built-in tokenizers are cached and shared: never change them
        tok.chat_template = template
    return tok


def export_checkpoint(checkpoint: Path, out_dir: Path, cfg: RunConfig, *,
                      shard_mb: int | None = None,
                      dtype: str | None = None, run_config: Path | None = None) -> Path:
    """``areal-like export``:
    a trainer DCP checkpoint directory -> an HF directory at ``out_dir``, whose task file names
    ``run_config`` (the config.yaml ``cfg`` came from), which ``areal-like eval`` reads."""
    model = load_checkpoint_model(Path(checkpoint), cfg.model, cfg.trainer.lora)
    version = _checkpoint_version(Path(checkpoint))
    return export_hf(model, Path(out_dir), model_cfg=cfg.model,
                     tokenizer=export_tokenizer(cfg.model, cfg.task),
                     shard_mb=shard_mb or cfg.export.shard_mb, dtype=dtype or cfg.model.dtype,
                     task_file=export_yaml(cfg.task, cfg.eval, cfg.seed, version, run_config),
                     merged=cfg.export.merged)


def _checkpoint_version(checkpoint: Path) -> int | None:
    """The policy version ``checkpoint`` holds, a label for ``eval`` (the weights are what the
    export needs): its meta.pt's, else its ``v%08d`` name's (a meta.pt missing, empty or not
    ours), else None."""
    try:
        return int(load_data(checkpoint / "meta.pt")["policy_version"])
    except Exception:  # noqa: BLE001 - no usable meta.pt: the name says it, by the layout
        number = checkpoint.name[len(PREFIX):]
        return int(number) if checkpoint.name.startswith(PREFIX) and number.isdigit() else None


def _resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a checkpoint root (its newest complete checkpoint)."""

    if (path / "meta.pt").is_file() or (path / ".metadata").is_file():
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise FileNotFoundError(f"{path} is neither a trainer checkpoint nor a directory of them")
    return newest


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.export CHECKPOINT OUT [--config-file FILE] [--shard-mb N] [--dtype D]``.
    """
    from areal_like.daemon import StartRefused
    from areal_like.settings.config import ConfigError, load_daemon_config
    from areal_like.settings.report_schema import ExportConfig

    p = argparse.ArgumentParser(prog="areal-like export",
                                description="Convert a trainer checkpoint into a Hugging Face "
                                            "model directory.")
    p.add_argument("checkpoint", type=Path, help="<run_dir>/checkpoints/v<version> "
                                                 "(or the checkpoints "
                                                 "directory: its newest)")
    p.add_argument("out", type=Path, help="the HF directory to write (must not exist)")
    p.add_argument("--config-file", type=Path, help="the run's config.yaml (default: "
                                                    "<run_dir>/config.yaml "
                                                    "beside the checkpoints directory)")
    p.add_argument("--shard-mb", type=int, help=f"largest shard in MiB (default export.shard_mb, "
                                                f"{ExportConfig().shard_mb})")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: model.dtype")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ckpt = None
    try:
        ckpt = _resolve_checkpoint(args.checkpoint.resolve())
        config_file = args.config_file or ckpt.parent.parent / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"no run config at {config_file}: "
                                    "pass --config-file <run_dir>/config.yaml")
        if args.out.exists():
            raise FileExistsError(f"{args.out} exists: choose a new directory "
                                  "(an export never overwrites one)")
        if args.shard_mb is not None and args.shard_mb < 1:
            raise ValueError(f"--shard-mb={args.shard_mb} is invalid: must be >= 1")
        cfg = load_daemon_config(["--config-file", str(config_file)])
        if why := export_without_base(cfg):
            raise ValueError(f"{config_file}: {why} there (or in a copy, with --config-file)")
        out = export_checkpoint(ckpt, args.out, cfg, shard_mb=args.shard_mb, dtype=args.dtype,
                                run_config=config_file)
    except (OSError, ValueError, ConfigError, StartRefused) as e:
        # StartRefused: damaged, or planted (UnsafeCheckpointError)
        gone = ckpt is not None and not ckpt.exists()  # a running job keeps only its newest
        print("error: " + (f"{ckpt} was deleted while it was read (a running job keeps its "
                           "trainer.keep_checkpoints newest): export a newer one" if gone
                           else str(e)), file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(ckpt), "out": str(out.resolve())}))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
