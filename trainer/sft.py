"""Supervised fine-tuning: ``areal-like sft`` and a job's warm start (``launch/warmstart.py``).

``train_sft(cfg, out)`` trains ``warm_start.steps`` optimizer steps of cross-entropy on answer
tokens and writes a Hugging Face directory at ``out``, the layout of the RL trainer's exports.
It runs on the RL trainer's own parts: ``build_policy`` (meta-device build, FSDP2 sharding on
several ranks, LoRA from ``trainer.lora.*``), ``plan_minibatch`` (micro-batches by
``trainer.micro_batch_size`` / ``trainer.max_tokens_per_micro_batch``, packed with
``trainer.pack_sequences``), ``output_logp`` (the log-probs RL trains) and ``export_hf``.

Data, one (prompt ids, target ids) pair per answer:
- the task's examples (a built-in task, or ``task=dataset`` rows with prompt or messages and
  answer columns): the prompt laid out as the rollout servers lay it out (``encode_prompt``), the
  target the answer and EOS, so RL samples from the layout SFT trained;
- multi-turn tasks (``task.env``, ``task.agent`` with a ``demo``): one pair per assistant turn of
  the demo conversations;
- ``warm_start.dataset_path``: rows of its own, either the task's prompt/answer columns or chat
  rows (a ``messages`` column, or ``task.messages_key``, with no answer column): one pair per
  assistant message, its context through the chat template.
The loss is the mean over target tokens of -log p (the prompt and padding carry none); the
target ends with EOS, so the model learns to stop.

Ranks: one process (``python -m trainer.sft``, ``areal-like sft``) or several under torchrun
(``torchrun --nproc-per-node K -m trainer.sft ...``): every rank draws the same examples and
computes its share of the micro-batches, as ``trainer/step.py`` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from areal_like.settings.config import ConfigError, RunConfig, export_yaml
from trainer.data import PAD_ID, TrainBatch
from trainer.export import MERGED_DIR, export_hf, export_tokenizer
from trainer.finite_guard import all_finite
from trainer.model import (
    Policy,
    build_policy,
    clip_gradients,
    init_distributed,
    leave_distributed,
)
from trainer.packing import plan_minibatch
from trainer.ranks import barrier, several
from trainer.step import apply_optimizer_step, output_logp, rank_calls

LOG_EVERY = 100  # steps between progress lines
SUMMARY_FILE = "warm_start.json"  # written into the model directory SFT saves

Pair = tuple[list[int], list[int]]  # (prompt ids, target ids ending with EOS)


# ------------------------------------------------------------------------------------ data
def chat_pairs(messages: list[dict], tok, template: str) -> list[Pair]:
    """One pair per assistant message of ``messages``: (the conversation before it through the
    chat template with the generation prompt, its content + EOS)."""
    from areal_like.tasks.environment import ChatRenderer

    renderer = ChatRenderer(tok, template)
    return [(renderer.prompt_ids(messages[:k]), renderer.encode(m["content"])
             + [int(tok.eos_token_id)])
            for k, m in enumerate(messages) if m["role"] == "assistant" and k > 0]


def example_pair(tok, example, task_cfg) -> Pair:
    from areal_like.tasks.task import encode_prompt

    target = [int(t) for t in tok(example.answer, add_special_tokens=False)["input_ids"]]
    return encode_prompt(tok, example, task_cfg), target + [int(tok.eos_token_id)]


def demo_pairs(cfg: RunConfig, task, tok) -> Callable[[int, random.Random], list[Pair]]:
    """Multi-turn tasks: the pairs of example i's ``demo`` conversation, laid out as the rollout
    server's episodes are (``areal_like.tasks.environment.ChatRenderer``)."""
    from areal_like.tasks.callables import import_function
    from areal_like.tasks.environment import ChatRenderer, env_template

    env_cls = import_function(cfg.task.agent or cfg.task.env)  # an agent may carry a .demo too
    if not callable(getattr(env_cls, "demo", None)):
        raise ConfigError(f"warm_start.steps > 0 with task.env={cfg.task.env!r} / task.agent="
                          f"{cfg.task.agent!r}: it has no "
                          "demo(example, rng) to learn from; set warm_start.steps=0")
    tools = [{"type": "function",
              "function": {k: t.get(k) for k in ("name", "description", "parameters")}}
             for t in getattr(env_cls, "tools", None) or []]
    renderer = ChatRenderer(tok, env_template(tok, cfg.task), tools or None)

    def pairs(i: int, rng: random.Random) -> list[Pair]:
        demo = env_cls.demo(task.example(i, 0), rng)
        return [(renderer.prompt_ids(demo[:k]),
                 renderer.encode(m["content"]) + [int(tok.eos_token_id)])
                for k, m in enumerate(demo) if m["role"] == "assistant"]
    return pairs


def file_pairs(cfg: RunConfig, tok) -> tuple[int, Callable[[int, random.Random], list[Pair]]]:
    """``warm_start.dataset_path``'s rows: chat rows (a messages column, no answer column) or the
    task's prompt/answer columns."""
    from areal_like.tasks.datasets import load_examples, load_table
    from areal_like.tasks.task import chat_template_of

    key, path = "warm_start.dataset_path", cfg.warm_start.dataset_path
    table = load_table(key, path)
    column = cfg.task.messages_key or "messages"
    if column in table.column_names and cfg.task.answer_key not in table.column_names:
        template = chat_template_of(tok, cfg.task)
        if not template:
            raise ConfigError(f"{key}={path!r} holds chat messages (column {column!r}) and the "
                              "tokenizer has no chat template: set task.chat_template")
        rows = [chat_row(r, i, column, path) for i, r in enumerate(table[column])]
        return len(rows), lambda i, _rng: chat_pairs(rows[i], tok, template)
    task_cfg = dataclasses.replace(cfg.task, name="dataset", dataset_path=path, eval_path=None,
                                   eval_fraction=0.0)
    examples = load_examples(task_cfg, key, path)
    return len(examples), lambda i, _rng: [example_pair(tok, examples[i], cfg.task)]


def chat_row(value, i: int, column: str, path: str) -> list[dict]:
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)
    if not ok or not any(m["role"] == "assistant" for m in value[1:]):
        raise ConfigError(f"warm_start.dataset_path={path!r}: row {i} (column {column!r}) is not "
                          "a list of {role, content} messages with an assistant message after "
                          f"the first: {str(value)[:120]}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def sft_source(cfg: RunConfig, tok) -> tuple[int, Callable[[int, random.Random], list[Pair]]]:
    """(number of examples, pairs of example i) of the SFT data (module docstring)."""
    if tok.eos_token_id is None:
        raise ConfigError("supervised fine-tuning needs a tokenizer with an EOS token (the model "
                          "learns to stop): set model.tokenizer or add one to model.path")
    if cfg.warm_start.dataset_path:
        return file_pairs(cfg, tok)
    from areal_like.tasks.task import make_task

    task = make_task(cfg.task, tok)
    if cfg.task.env or cfg.task.agent:
        return len(task), demo_pairs(cfg, task, tok)
    return len(task), lambda i, _rng: [example_pair(tok, task.example(i, 0), cfg.task)]


def pairs_batch(pairs: list[Pair]) -> TrainBatch:
    """Pairs as a right-padded ``TrainBatch`` (trainer/data.py's layout): ``mask`` 1 on the
    target tokens; one group per row."""
    n = len(pairs)
    p_lens = torch.tensor([len(p) for p, _ in pairs])
    o_lens = torch.tensor([len(a) for _, a in pairs])
    ids = torch.full((n, int((p_lens + o_lens).max())), PAD_ID, dtype=torch.long)
    mask = torch.zeros(n, int(o_lens.max()))
    for i, (p, a) in enumerate(pairs):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(a)] = 1.0
    return TrainBatch(input_ids=ids, prompt_lens=p_lens, output_lens=o_lens,
                      behav_logp=torch.zeros_like(mask), mask=mask, rewards=torch.zeros(n),
                      group_ids=torch.arange(n), head_versions=torch.zeros(n, dtype=torch.long))


# ------------------------------------------------------------------------------------ training
def sft_step(policy: Policy, batch: TrainBatch, cfg: RunConfig) -> tuple[float, float]:
    """One optimizer step of mean token cross-entropy on ``batch``'s targets; (loss, grad norm).
    Every rank holds the batch and runs its share of the micro-batches (``trainer/step.py``)."""
    t = cfg.trainer
    rows = torch.arange(batch.n_seqs)
    plan = plan_minibatch(rows, batch.prompt_lens + batch.output_lens, policy.world_size,
                          max_seqs=t.micro_batch_size, max_tokens=t.max_tokens_per_micro_batch,
                          packed=t.pack_sequences)
    n_tokens = float(batch.mask.sum())
    policy.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for idx, real in rank_calls(plan, rows):
        mb = batch.select(idx)
        if not real:  # a call only for the count every rank runs (FSDP's collectives)
            mb.mask = torch.zeros_like(mb.mask)
        mb = mb.to(policy.device)
        logp = output_logp(policy.model, mb, 1.0, t.logprob_chunk_tokens, plan.packed)
        loss = -torch.where(mb.mask > 0, logp.float(), 0.0).sum() / n_tokens
        (loss * policy.world_size).backward()  # FSDP2 averages over ranks
        total += loss.detach().cpu()
    if several():
        dist.all_reduce(total)
    grad_norm = clip_gradients(policy.model, t.grad_clip)
    if all_finite(float(total), grad_norm):
        apply_optimizer_step(policy, 1.0)
    else:  # never applied; the same decision on every rank
        policy.optimizer.zero_grad(set_to_none=True)
    return float(total), grad_norm


def sft_trainer(cfg: RunConfig):
    """The RL trainer's settings with the SFT's optimizer: ``warm_start.lr`` constant, no weight
    decay, one optimizer step per batch."""
    ws = cfg.warm_start
    return dataclasses.replace(cfg.trainer, lr=ws.lr, steps=ws.steps, lr_schedule="constant",
                               warmup_steps=0, weight_decay=0.0, num_minibatches=1)


def train_sft(cfg: RunConfig, out: Path, log: Callable[[str], None] = print) -> dict:
    """Train and write the model at ``out`` (with LoRA: the adapter there, the merged model in
    ``out/merged``); on rank 0 the summary (also ``SUMMARY_FILE`` in the model directory)."""
    t0 = time.monotonic()
    init_distributed(cfg.trainer)
    try:
        return _train(cfg, out, log, t0)
    finally:
        leave_distributed()


def _train(cfg: RunConfig, out: Path, log: Callable[[str], None], t0: float) -> dict:
    from areal_like.tasks.tokenizer import load_tokenizer

    torch.set_num_threads(max(1, cfg.launch.omp_threads))
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    n, pairs_of = sft_source(cfg, tok)
    cfg = dataclasses.replace(cfg, trainer=sft_trainer(cfg))
    policy = build_policy(cfg.model, cfg.trainer)
    rank = policy.rank
    context = int(getattr(policy.model.config, "max_position_embeddings", 0) or 1 << 30)
    rng = random.Random(cfg.seed + 1)  # the same draws on every rank
    losses, order, steps, dropped = [], [], cfg.warm_start.steps, 0
    for step in range(1, steps + 1):
        pairs = []
        while len(pairs) < cfg.warm_start.batch_size:
            if not order:  # a new epoch: every example once, shuffled
                order = rng.sample(range(n), n)
            drawn = pairs_of(order.pop(), rng)
            pairs += [p for p in drawn if len(p[0]) + len(p[1]) <= context]
            dropped += sum(len(p[0]) + len(p[1]) > context for p in drawn)
            if dropped > 10 * cfg.warm_start.batch_size and not pairs:
                raise ConfigError(f"every example is longer than the model's context ({context} "
                                  "tokens, max_position_embeddings)")
        loss, grad_norm = sft_step(policy, pairs_batch(pairs), cfg)
        losses.append(loss)
        if rank == 0 and (step % LOG_EVERY == 0 or step in (1, steps)):
            log(f"step {step}/{steps} loss {loss:.4f} grad_norm {grad_norm:.3f}")
    if rank == 0 and dropped:
        log(f"{dropped} examples longer than the model's context ({context} tokens) left out")
    export_hf(policy.model, out, model_cfg=cfg.model,
              tokenizer=export_tokenizer(cfg.model, cfg.task, tok),
              shard_mb=cfg.export.shard_mb, dtype=cfg.model.dtype,
              task_file=export_yaml(cfg.task, cfg.eval, cfg.seed, 0),
              merged=cfg.trainer.lora.enabled)
    model_dir = out / MERGED_DIR if cfg.trainer.lora.enabled else out
    summary = {"ok": True, "steps": steps, "examples": n, "loss_first": round(losses[0], 4),
               "loss_last": round(losses[-1], 4), "out": str(out), "model": str(model_dir),
               "greedy_acc": None, "sampled_acc": None}
    if rank == 0:
        summary.update(accuracy(cfg, model_dir, tok, log))
        summary["seconds"] = round(time.monotonic() - t0, 1)
        (model_dir / SUMMARY_FILE).write_text(json.dumps(summary) + "\n")
    barrier()
    return summary


# ------------------------------------------------------------------------------------ evaluation
def accuracy(cfg: RunConfig, model_dir: Path, tok, log: Callable[[str], None]) -> dict:
    """Greedy and sampled accuracy of the saved model on ``warm_start.eval_prompts`` prompts of
    the task's eval split (its train split when it has none); nothing for multi-turn tasks, whose
    RL run measures the model."""
    if cfg.task.env or cfg.task.agent or cfg.warm_start.eval_prompts == 0:
        return {}
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from areal_like.tasks.callables import import_function
    from areal_like.tasks.task import has_eval_split, make_task

    split = "eval" if has_eval_split(cfg.task) else "train"
    task = make_task(cfg.task, tok, split=split)
    indices = list(range(min(cfg.warm_start.eval_prompts, len(task))))
    reward = import_function(cfg.task.reward_fn) if cfg.task.reward_fn else task.reward
    hf_logging.disable_progress_bar()  # a "Loading weights" bar is noise in the log
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    greedy, sampled = evaluate(model, tok, task, indices, cfg.task.max_new_tokens,
                               cfg.task.temperature, reward)
    log(f"accuracy on {len(indices)} {split} prompts: greedy {greedy:.3f}, "
        f"sampled at T={cfg.task.temperature} {sampled:.3f}")
    return {"greedy_acc": round(greedy, 4), "sampled_acc": round(sampled, 4),
            "eval_prompts": len(indices), "eval_split": split}


def evaluate(model, tok, task, indices: list[int], max_new_tokens: int, temperature: float,
             reward: Callable | None = None) -> tuple[float, float]:
    """(greedy accuracy, sampled accuracy at ``temperature``) of ``model`` (a transformers model)
    over the task's prompts at ``indices``; correct = reward >= 1."""
    from areal_like.tasks.task import encode_prompt

    reward = reward or task.reward
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = [task.example(i, 0) for i in indices]
    scores = []
    # sampled = the full temperature-scaled distribution, as the engine samples (no top-k/top-p)
    for mode in ({"do_sample": False},
                 {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": 1.0}):
        hits = 0
        for ex in examples:  # one prompt at a time: no left-padding subtleties, and it is cheap
            ids = torch.tensor([encode_prompt(tok, ex, task.cfg)])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max_new_tokens,
                                     eos_token_id=tok.eos_token_id, pad_token_id=pad, **mode)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            hits += float(reward(text, ex)) >= 1.0
        scores.append(hits / max(1, len(examples)))
    return scores[0], scores[1]


# ------------------------------------------------------------------------------------ entry point
def main(argv: list[str]) -> int:
    """``python -m trainer.sft --out DIR [--config-file P] [overrides]`` (under torchrun: several
    ranks); prints the summary as one JSON line (rank 0)."""
    from areal_like.settings.config import load_daemon_config

    if "--out" not in argv[:-1]:
        print("error: --out DIR is required (the model directory to write)", file=sys.stderr)
        return 2
    i = argv.index("--out")
    out, overrides = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    try:
        cfg = load_daemon_config(overrides)  # [--config-file P] overrides
        if cfg.warm_start.steps <= 0:
            raise ConfigError("warm_start.steps=0: set warm_start.steps=N, the SFT's optimizer "
                              "steps")
        summary = train_sft(cfg, out, log=lambda m: print(f"[sft] {m}", file=sys.stderr,
                                                          flush=True))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
