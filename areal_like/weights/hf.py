"""Hugging Face models: find a model's local directory, and build or load the causal LM.

Invariants: ``resolve_model_path`` / ``resolve_models`` turn a hub id into a local directory ONCE,
in the launcher, before any daemon starts (the local cache first, a snapshot counting only when
it holds what the key needs; a download only without ``HF_HUB_OFFLINE``); daemons read
directories only and never download; a model built from config uses a fixed init seed, so every
process that builds it gets bit-identical weights. torch and huggingface_hub are imported lazily.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from areal_like.settings.config import ConfigError, ModelConfig, RunConfig
from areal_like.wire.weight_wire import torch_dtype  # re-exported: the model's dtype by name

# org/name, as the hub spells model repos (an existing local path of that shape wins)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# what a download skips: other frameworks' weights and exports that transformers never reads
DOWNLOAD_IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.gguf", "*.tflite",
                   "*.pth", "original/*", "onnx/*", "openvino/*", "coreml/*"]
# model.tokenizer values that name a built-in tokenizer, not a directory
TOKENIZER_NAMES = ("char", "bpe")
WEIGHT_GLOBS = ("*.safetensors", "*.bin")  # what from_pretrained loads (single or sharded)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # either makes a tokenizer directory
# how ``from_pretrained`` loaded a tokenizer, which transformers 5 keeps among its init arguments
# and writes into tokenizer_config.json: never a saved tokenizer's (``save_tokenizer``)
LOADER_KEYS = ("is_local", "local_files_only", "cache_dir", "force_download", "proxies",
               "revision", "subfolder", "token", "trust_remote_code", "_commit_hash")


def looks_like_hub_id(path: str) -> bool:
    return bool(HUB_ID.match(path)) and "--" not in path and ".." not in path


def _offline() -> bool:
    # read at call time: huggingface_hub reads it once at import, and tests set it per process
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model_path(path: str, key: str = "model.path",
                       needs: tuple[str, ...] = WEIGHT_GLOBS) -> str:
    """``path`` as a local directory: itself (absolute), the hub id's cached snapshot holding one
    of ``needs`` (globs), or downloaded (not with HF_HUB_OFFLINE); else one ConfigError line naming
    ``key``."""
    local = Path(path).expanduser()
    if local.is_dir():  # "~" expanded and absolute: a daemon or a resume elsewhere finds it too
        return str(local.absolute())
    here = "" if local.is_absolute() else f" at {local.absolute()}"  # relative: to where?
    if not looks_like_hub_id(path):
        what = "is a file, not a model directory" if local.exists() else f"does not exist{here}"
        raise ConfigError(f"{key}={path!r} {what} (and is not a hub id of the form org/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    partial = None  # a cached snapshot without the files the key needs
    try:
        snap = snapshot_download(path, local_files_only=True)
        if holds(snap, needs):
            return snap
        partial = snap
    # not cached (or known incomplete): download below, unless offline
    except LocalEntryNotFoundError as e:
        partial = getattr(e, "snapshot_path", None)
    except HFValidationError as e:
        raise ConfigError(f"{key}={path!r} is not a local directory nor a valid hub id: "
                          f"{_first_line(e)}") from None
    wanted = " or ".join(needs)
    where = (f"in the Hugging Face cache incompletely ({partial} has no {wanted})" if partial else
             f"not a local directory{here} and not in the Hugging Face cache "
             f"{constants.HF_HUB_CACHE}")
    if _offline():
        raise ConfigError(f"{key}={path!r} is {where}, and HF_HUB_OFFLINE is set (unset it to "
                          f"download, or give a local directory)")
    try:
        # tqdm progress bars on stderr
        snap = snapshot_download(path, ignore_patterns=DOWNLOAD_IGNORE)
    except Exception as e:  # network down, repo missing or gated: one line, not a traceback
        raise ConfigError(f"{key}={path!r} is {where}, and the download failed: "
                          f"{_first_line(e)}") from None
    # the Hub was unreachable and huggingface_hub fell back to the cached snapshot
    if not holds(snap, needs):
        raise ConfigError(f"{key}={path!r}: {snap} has no {wanted} after the download (the Hub "
                          "unreachable, or the repository has none)")
    return snap


def holds(directory: str | Path, globs: tuple[str, ...]) -> bool:
    """Whether ``directory`` has a file matching one of ``globs`` (at its top level)."""
    d = Path(directory)
    return any(next(d.glob(g), None) is not None for g in globs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def resolve_models(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with every model-valued key resolved to a local directory."""
    model, trainer = cfg.model, cfg.trainer
    if model.path:
        model = dataclasses.replace(model, path=resolve_model_path(model.path, "model.path"))
    if model.tokenizer not in TOKENIZER_NAMES:
        model = dataclasses.replace(model, tokenizer=resolve_model_path(
            model.tokenizer, "model.tokenizer", TOKENIZER_FILES))
    if trainer.ref_path:
        trainer = dataclasses.replace(trainer, ref_path=resolve_model_path(
            trainer.ref_path, "trainer.ref_path"))
    return dataclasses.replace(cfg, model=model, trainer=trainer)


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """``tokenizer.save_pretrained(directory)`` without the arguments it was loaded with
    (``LOADER_KEYS``) in tokenizer_config.json: whoever loads the directory elsewhere (an export)
    would inherit them, ``local_files_only`` of an offline daemon among them."""
    tokenizer.save_pretrained(str(directory))
    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    kept = {k: v for k, v in config.items() if k not in LOADER_KEYS}
    if kept != config:  # as save_pretrained writes it
        path.write_text(json.dumps(kept, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                        encoding="utf-8")


def qwen2_config(cfg: ModelConfig, tokenizer=None):
    """The Qwen2 config of a model built from ``cfg``, with the tokenizer's bos/eos/pad ids."""
    from transformers import Qwen2Config

    from areal_like.tasks.tokenizer import load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    return Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


SLIDING = "sliding_attention"


def layer_windows(config) -> dict[str, int | None] | int | None:
    """Each layer type's window (None: full attention) when ``config`` mixes layer types; else
    the one window every layer has (None: full)."""
    types = set(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if types and types != {"full_attention"}:
        return {t: window if t == SLIDING else None for t in types}
    return None if types else window  # layer_types all full: a leftover sliding_window is unused


def _local_model_dir(cfg: ModelConfig) -> Path:
    path = Path(cfg.path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.path!r} is not a local model directory "
                          "(no config.json); a daemon never downloads: `areal-like run` "
                          "resolves hub ids before it starts")
    return path


def hf_config(cfg: ModelConfig):
    """The Hugging Face config of ``cfg``: ``model.path``'s config.json, else the Qwen2 of the
    fields."""
    from transformers import AutoConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoConfig.from_pretrained(str(_local_model_dir(cfg))) if cfg.path else qwen2_config(cfg)


def attention(cfg: ModelConfig, config) -> str:
    """``model.attn_implementation`` for a model of ``config``, but eager where sdpa (the default)
    is asked of a family transformers has no SDPA for (GPT-OSS's attention sinks): a checkpoint as
    published, which names no attention implementation, starts."""
    if cfg.attn_implementation != "sdpa":
        return cfg.attn_implementation
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return "eager" if getattr(model_class, "_supports_sdpa", True) is False else "sdpa"


def build_meta_model(cfg: ModelConfig, dtype: str = "float32"):
    """The architecture of ``cfg`` on the meta device (weights: ``trainer/sharded_init.py``)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_config(cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype),
                                                attn_implementation=attention(cfg, config))


def build_model(cfg: ModelConfig, device: str = "cpu", dtype: str | None = None):
    """The model in eval mode on ``device`` with parameters in ``dtype`` (default cfg.dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dt = torch_dtype(dtype or cfg.dtype)
    if cfg.path:
        from transformers.utils import logging as hf_logging

        path = _local_model_dir(cfg)
        # transformers 5 draws a "Loading weights" bar per load: in every rollout server's log
        # (and at each weight update from disk) a line of carriage returns that says nothing
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dt, attn_implementation=attention(cfg, hf_config(cfg)))
        finally:
            if shown:
                hf_logging.enable_progress_bar()
    else:
        with torch.random.fork_rng(devices=[]):  # the caller's CPU generator is left as it was
            torch.manual_seed(cfg.init_seed)
            config = qwen2_config(cfg)
            model = AutoModelForCausalLM.from_config(config, dtype=dt,
                                                     attn_implementation=attention(cfg, config))
    return model.to(device).eval()


def checkpoint_layout(model, name: str, full) -> Iterator[tuple[str, object]]:
    """``name``'s tensor under the names a checkpoint of ``model`` has: transformers' own mapping
    reversed, as ``save_pretrained`` writes (a mixture's fused experts as one tensor per expert,
    which SGLang and vLLM load too); most parameters are unchanged. ``full`` may be on the meta
    device (the names and shapes alone)."""
    from transformers.core_model_loading import revert_weight_conversion

    yield from revert_weight_conversion(model, {name: full}).items()


def checkpoint_slices(model) -> dict[str, tuple[str, object]]:
    """Each checkpoint name ``model`` holds under another name (a mixture's per-expert tensors,
    which transformers 5 fuses) -> (the parameter holding it, the flat indices of its elements
    there, shaped as the checkpoint's tensor): how a module loads tensors sent under a
    checkpoint's names (``checkpoint_layout``). Empty for a model whose names are a checkpoint's."""
    import torch

    out = {}
    for name, p in model.named_parameters():
        meta = torch.empty(p.shape, device="meta")
        if [n for n, _ in checkpoint_layout(model, name, meta)] == [name]:
            continue
        index = torch.arange(p.numel()).view(p.shape)
        out.update((saved, (name, idx)) for saved, idx in checkpoint_layout(model, name, index))
    return out
