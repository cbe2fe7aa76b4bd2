"""Facts of the job that its config implies but does not state: the model's vocabulary, context and
routing-replay shape, the largest frame a group can need, the prompts in one epoch of the task.

Invariants: above config loading (which imports no task, dataset or tokenizer); the vocabulary,
context and frame limit are read as JSON, never through torch or transformers (the buffer needs
them without either); a fact a setting prevents is a ``ConfigError`` naming that key.
"""

from __future__ import annotations

import json
from pathlib import Path

from areal_like.settings.config import ConfigError, ModelConfig, RunConfig, TaskConfig
from areal_like.tasks.task import SYNTHETIC, make_task
from areal_like.tasks.tokenizer import load_tokenizer


def model_json(model: ModelConfig, key: str) -> object:
    """``key`` of ``model.path``'s config.json, or of its ``text_config`` (a multimodal model's)."""
    path = Path(model.path).expanduser() / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise ConfigError(f"model.path={model.path!r}: cannot read config.json "
                          f"({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"model.path={model.path!r}: config.json is not a JSON object")
    text = cfg.get("text_config")
    return cfg.get(key) or (text.get(key) if isinstance(text, dict) else None)


def model_vocab_size(model: ModelConfig) -> int:
    """Entries in the model's embedding (``model.path``'s config.json, else
    ``model.vocab_size``)."""
    if not model.path:
        return model.vocab_size
    size = model_json(model, "vocab_size")
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"model.path={model.path!r}: config.json has no vocab_size")
    return size


def model_routes(cfg: RunConfig) -> tuple[int, int, int] | None:
    """``(layers, top_k, experts)`` of one token's routes under ``trainer.routing_replay``: the
    mixture layers of a Qwen3-MoE/Qwen2-MoE config.json (areal_like/weights/routing.py), the
    experts each token is routed to and the experts each layer has; None when routing replay is off
    or the config.json names no such mixture (preflight and the trainer refuse that job)."""
    if not cfg.trainer.routing_replay or not cfg.model.path:
        return None
    model = cfg.model
    top_k, layers = model_json(model, "num_experts_per_tok"), model_json(model, "num_hidden_layers")
    # transformers 5 saves Qwen3-MoE's num_experts under its attribute_map name
    experts = model_json(model, "num_experts") or model_json(model, "num_local_experts")
    if not all(isinstance(v, int) and v > 0 for v in (experts, top_k, layers)):
        return None
    dense = model_json(model, "mlp_only_layers") or []  # as the model builds its layers
    every = model_json(model, "decoder_sparse_step") or 1
    if not isinstance(dense, list) or not isinstance(every, int) or every < 1:
        return None
    moe = sum(1 for i in range(layers) if i not in dense and (i + 1) % every == 0)
    return (moe, top_k, experts) if moe else None


def model_context(model: ModelConfig, scaled: bool = True) -> int:
    """The model's context length as SGLang reads it: its config.json's, times a ``rope_scaling``
    factor that does not name its original length (128k when it names none); ``scaled=False``:
    the config.json's own, which the embedded engine serves."""
    if not model.path:
        return model.max_position_embeddings
    size = model_json(model, "max_position_embeddings")
    if not isinstance(size, int) or size < 1:
        return 128 * 1024
    rope = model_json(model, "rope_scaling")
    stretch = (scaled and isinstance(rope, dict) and "original_max_position_embeddings" not in rope
               and rope.get("rope_type") != "llama3")
    return int(size * rope.get("factor", 1)) if stretch else size


def trajectory_limit(cfg: RunConfig) -> int:
    """The most prompt and output tokens one trajectory of the job can hold: the context its
    engine serves (``served_context``)."""
    return served_context(cfg)[0]


def served_context(cfg: RunConfig) -> tuple[int, str]:
    """(the context the engine serves, the setting that makes it as ``key=value``): a slot of the
    embedded engine holds at most its KV budget, ``rollout.engine.max_total_tokens``
    (rollout_server/engine/ENGINE.md); SGLang serves the model's context, or
    ``rollout.engine.sglang.context_length`` where that is longer."""
    engine, model = cfg.rollout.engine, cfg.model
    own = (f"model.max_position_embeddings={model.max_position_embeddings}" if not model.path
           else f"the config.json of model.path={model.path!r}")
    if engine.kind == "embedded":
        positions = model_context(model, scaled=False)
        if (budget := engine.max_total_tokens) < positions:
            return budget, f"rollout.engine.max_total_tokens={budget}"
        return positions, own
    given, context = engine.sglang.get("context_length"), model_context(model)
    if isinstance(given, int) and given > context:
        return given, f"rollout.engine.sglang.context_length={given}"
    return context, own


# a group's frame per trajectory: 4 bytes a prompt token, 16 an output token, and metadata
PROMPT_TOKEN_BYTES, OUTPUT_TOKEN_BYTES, TRAJECTORY_METADATA_BYTES = 4, 16, 64 * 1024
FRAME_MARGIN = 2  # envelope, msgpack headers and what the estimate misses
# control messages too: a weight-sync plan lists every tensor (~65 bytes each)
MIN_FRAME_BYTES = 4 * 1024 * 1024


def request_frame_limit(cfg: RunConfig) -> int:
    """The largest frame the buffer accepts: ``buffer.max_frame_bytes`` when set, else
    ``FRAME_MARGIN`` x the biggest group the job can produce, at least ``MIN_FRAME_BYTES``."""
    if cfg.buffer.max_frame_bytes:
        return cfg.buffer.max_frame_bytes
    task = cfg.task
    prompt = task.max_prompt_tokens or model_context(cfg.model)
    # a multi-turn episode's output holds every turn and environment message
    output = max(task.max_new_tokens, task.max_episode_tokens) if task.env or task.agent else \
        task.max_new_tokens
    per_trajectory = (prompt * PROMPT_TOKEN_BYTES + output * OUTPUT_TOKEN_BYTES
                      + TRAJECTORY_METADATA_BYTES)
    return max(MIN_FRAME_BYTES, FRAME_MARGIN * group_trajectories(task) * per_trajectory)


def group_trajectories(task: TaskConfig) -> int:
    """The most trajectories one group of the job holds: ``task.group_size``, times
    ``task.max_turns`` for an agent task (up to one per call: rollout_server/agent_endpoint.py)."""
    return task.group_size * (task.max_turns if task.agent else 1)


def dataset_size(task: TaskConfig, model: ModelConfig) -> int:
    """Prompts in one epoch of the task's train split, after the ``task.max_prompt_tokens``
    filter."""
    if task.name in SYNTHETIC:
        return task.num_prompts
    tokenizer = load_tokenizer(model) if task.max_prompt_tokens > 0 else None
    return len(make_task(task, tokenizer))
