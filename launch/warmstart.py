"""Supervised warm start: give a freshly built tiny model a learning signal before RL.

``ensure_warm_start(cfg)`` trains ``warm_start.steps`` steps of cross-entropy on the task's own
``(prompt, answer + <eos>)`` pairs (loss on the answer only), laid out as the rollout server lays
out prompts (``encode_prompt``), and returns the config with ``model.path`` at the saved Hugging
Face directory. It is cached under ``<warm_start.cache_dir>/<key>`` (``key`` hashes the model,
task and warm-start settings), written under a temporary name and renamed, so a crash never
leaves a half-written cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from areal_like.settings.config import ConfigError, RunConfig

LOG_EVERY = 100  # warm-start steps between progress lines
EVAL_PROMPTS = 128  # prompts for the before/after accuracy line (greedy and sampled)
# In the cache key: bumped when what a warm start saves changes, so older caches are not reused.
# 2: the char tokenizer spells whitespace byte-level (older ones lose it when AutoTokenizer
# reloads them).
CACHE_FORMAT = 3  # 3: a dataset's plain prompt column is plain text under chat_template=auto


def cache_key(cfg: RunConfig) -> str:
    ws = {k: v for k, v in dataclasses.asdict(cfg.warm_start).items() if k != "cache_dir"}
    task = {k: v for k, v in dataclasses.asdict(cfg.task).items() if k != "reward_model"}
    blob = json.dumps({"model": dataclasses.asdict(cfg.model), "task": task,
                       "ws": ws, "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(cfg: RunConfig) -> Path:
    base = Path(cfg.warm_start.cache_dir)
    if not base.is_absolute():
        base = Path(cfg.run_dir).resolve().parent / base
    return base / cache_key(cfg)


def ensure_warm_start(cfg: RunConfig, log: Callable[[str], None] = print) -> RunConfig:
    """``cfg`` with ``model.path`` set to the warm-started model (trained now or from the cache)."""
    if cfg.warm_start.steps <= 0:
        return cfg
    if cfg.model.path:
        log(f"model.path={cfg.model.path} is set; the warm start refines that model")
    out = cache_path(cfg)
    if (out / "config.json").is_file():
        log(f"cached: {out}")
    else:
        t0 = time.monotonic()
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        train_warm_start(cfg, tmp, log)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, out)
        except OSError:  # another run finished the same key first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"saved {out} in {time.monotonic() - t0:.0f}s")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(out)))


def _pairs(task, indices: list[int], tok) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + EOS) of the task's examples, as the rollout server lays them
    out."""
    from areal_like.tasks.task import encode_prompt

    if tok.eos_token_id is None:
        raise ValueError("the warm start needs a tokenizer with an EOS token "
                         "(the model learns to stop)")
    out = []
    for i in indices:
        ex = task.example(i, 0)
        answer = ([int(t) for t in tok(ex.answer, add_special_tokens=False)["input_ids"]]
                  + [int(tok.eos_token_id)])
        out.append((encode_prompt(tok, ex, task.cfg), answer))
    return out


def _demo_pairs(cfg: RunConfig, task, indices: list[int], tok,
                rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """Multi-turn tasks (``task.env``, or ``task.agent`` with a ``demo``): one (context ids,
    turn ids + EOS) pair per assistant turn of the ``demo`` conversations, laid out as the
    rollout server's episodes are (``areal_like.tasks.environment.ChatRenderer``)."""
    from areal_like.tasks.callables import import_function
    from areal_like.tasks.environment import ChatRenderer, env_template

    env_cls = import_function(cfg.task.env or cfg.task.agent)  # an agent may carry a .demo too
    if not callable(getattr(env_cls, "demo", None)):
        raise ConfigError(f"warm_start.steps > 0 with task.env={cfg.task.env!r} / task.agent="
                         f"{cfg.task.agent!r}: it has no "
                         "demo(example, rng) to learn from; set warm_start.steps=0")
    tools = [{"type": "function",
              "function": {k: t.get(k) for k in ("name", "description", "parameters")}}
             for t in getattr(env_cls, "tools", None) or []]
    renderer = ChatRenderer(tok, env_template(tok, cfg.task), tools or None)
    out = []
    for i in indices:
        demo = env_cls.demo(task.example(i, 0), rng)
        for k, m in enumerate(demo):
            if m["role"] == "assistant":
                out.append((renderer.prompt_ids(demo[:k]),
                            renderer.encode(m["content"]) + [int(tok.eos_token_id)]))
    return out


def _batch(pairs: list[tuple[list[int], list[int]]]):
    """Right-padded input ids, labels (-100 outside the answer) and attention mask."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    def padded(rows: list[list[int]], value: int):
        return pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True,
                            padding_value=value)

    return (padded([p + a for p, a in pairs], 0),
            padded([[-100] * len(p) + a for p, a in pairs], -100),
            padded([[1] * (len(p) + len(a)) for p, a in pairs], 0))


def train_warm_start(cfg: RunConfig, out: Path, log: Callable[[str], None] = print) -> None:
    import torch

    from areal_like.tasks.task import make_task
    from areal_like.tasks.tokenizer import load_tokenizer
    from areal_like.weights.hf import build_model, save_tokenizer

    torch.set_num_threads(max(1, cfg.launch.omp_threads))
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    task = make_task(cfg.task, tok)
    model = build_model(cfg.model, "cpu", "float32").train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warm_start.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed + 1)
    n, bs = len(task), cfg.warm_start.batch_size
    eval_idx = [rng.randrange(n) for _ in range(EVAL_PROMPTS)]
    episodes = cfg.task.env or cfg.task.agent
    for step in range(1, cfg.warm_start.steps + 1):
        picks = [rng.randrange(n) for _ in range(bs)]
        pairs = _demo_pairs(cfg, task, picks, tok, rng) if episodes else _pairs(task, picks, tok)
        ids, labels, mask = _batch(pairs)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % LOG_EVERY == 0 or step == cfg.warm_start.steps:
            log(f"step {step}/{cfg.warm_start.steps} loss {loss.item():.3f}")
    if episodes:  # the RL run's first steps measure the warm start
        greedy = sampled = None
    else:
        greedy, sampled = evaluate(model.eval(), tok, task, eval_idx, cfg.task.max_new_tokens,
                                   cfg.task.temperature)
        log(f"accuracy after warm start: greedy {greedy:.2f}, "
            f"sampled at T={cfg.task.temperature} {sampled:.2f}")
    out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar is noise in the run's output
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    (out / "warm_start.json").write_text(json.dumps({"key": out.name, "greedy_acc": greedy,
                                                     "sampled_acc": sampled,
                                                     "steps": cfg.warm_start.steps}))


def evaluate(model, tok, task, indices: list[int], max_new_tokens: int,
             temperature: float) -> tuple[float, float]:
    """(greedy accuracy, sampled accuracy at ``temperature``) over the given prompts."""
    import torch

    from areal_like.tasks.task import encode_prompt

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = [task.example(i, 0) for i in indices]
    scores = []
    # sampled = the full temperature-scaled distribution, as the engine samples (no top-k/top-p)
    for mode in ({"do_sample": False},
                 {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": 1.0}):
        hits = 0.0
        for ex in examples:  # one prompt at a time: no left-padding subtleties, and it is cheap
            ids = torch.tensor([encode_prompt(tok, ex, task.cfg)])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max_new_tokens,
                                     eos_token_id=tok.eos_token_id, pad_token_id=pad, **mode)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            hits += task.reward(text, ex)
        scores.append(hits / len(examples))
    return scores[0], scores[1]
