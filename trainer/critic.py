"""The critic of PPO with a value model (``trainer.critic``; trainer/LOSSES.md section 10).

A value model is a Hugging Face causal-LM backbone (the policy's architecture and weights, or the
``trainer.critic.model`` overrides of ``model.*``) built and sharded by the policy's own code
(``trainer/model.py`` ``shard_model``: FSDP2 on the trainer's ranks, no rank ever holding a full
copy), plus a scalar head ``Linear(hidden, 1)`` (zero-initialised: every value starts at 0). Its
own AdamW and learning rate. The backbone's ``lm_head`` is unused and frozen (a tied one is the
embedding and trains).

Per step (``Trainer.run``): ``critic_values`` (no grad, the critic as it is when the batch is
trained: V_old) -> ``critic_advantages`` (token rewards, GAE with the actor's lambda; returns with
the critic's) -> the policy's ``train_step`` with those advantages (every off-policy correction of
its kernel kept) -> ``train_critic`` (the clipped value loss, one optimizer step per minibatch).

Invariants:
- The critic's gradients reach only the critic: advantages and returns are detached constants,
  and the critic's optimizer holds only its own parameters.
- The critic is checkpointed with the policy (``trainer/checkpoint.py``) and never exported or
  pushed to the engines.
- Every rank computes the same calls in number (FSDP's collectives); each row's values come from
  the rank that holds it, summed over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from areal_like.settings.config import ModelConfig, TrainerConfig
from areal_like.settings.critic_schema import CriticConfig
from trainer.advantages import adaptive_lambda, gae, token_rewards, whiten
from trainer.data import TrainBatch
from trainer.losses import value_loss
from trainer.model import clip_gradients, evaluating, lr_lambda, mixed_precision, shard_model
from trainer.packing import plan_minibatch
from trainer.ranks import rank_world, several


@dataclass
class Critic:
    """The value model (``model``: a module holding ``backbone`` and ``head``), its optimizer and
    LR schedule; the same fields as ``trainer.model.Policy`` where checkpoints read them."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    world_size: int
    cfg: CriticConfig


class ValueModel(torch.nn.Module):
    """V(prefix) at each output token's position: the backbone's last hidden state there, through a
    scalar head."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.last_hidden(input_ids)
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.head(picked).squeeze(-1).float()


def _last_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model.get_decoder()(input_ids=input_ids).last_hidden_state


def build_critic(model_cfg: ModelConfig, trainer_cfg: TrainerConfig, *,
                 adam_eps: float = 1e-8) -> Critic:
    """The critic of ``trainer_cfg.critic`` for the policy of ``model_cfg`` (module docstring);
    ``adam_eps`` as ``build_policy``'s (tests)."""
    import types

    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    c = trainer_cfg.critic
    cfg = c.model_config(model_cfg)
    backbone = shard_model(cfg, trainer_cfg, checkpointing=trainer_cfg.activation_checkpointing)
    backbone.last_hidden = types.MethodType(_last_hidden, backbone)
    out, emb = backbone.get_output_embeddings(), backbone.get_input_embeddings()
    if out is not None and out.weight is not emb.weight:
        out.requires_grad_(False)
    device = next(backbone.parameters()).device
    head = torch.nn.Linear(backbone.config.hidden_size, 1, device=device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    sharded = dist.get_world_size() > 1 or mixed_precision(cfg) is not None
    if sharded:
        register_fsdp_forward_method(backbone, "last_hidden")
        mp = mixed_precision(cfg)
        fully_shard(head, **({"mp_policy": mp} if mp is not None else {}))
    model = ValueModel(backbone, head).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=c.lr, betas=tuple(trainer_cfg.betas),
                                  weight_decay=c.weight_decay, eps=adam_eps, foreach=True)
    total = trainer_cfg.steps * trainer_cfg.num_minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("constant", 0, total))
    return Critic(model, optimizer, scheduler, device, dist.get_world_size(), c)


def check_critic_tokenizer(model_cfg: ModelConfig, c: CriticConfig) -> None:
    """A critic from another ``path`` must read the policy's tokens: its tokenizer's vocabulary must
    be the policy's (``ValueError`` naming both, before anything is built)."""
    path = c.model.get("path")
    if not c.enabled or not path or path == model_cfg.path:
        return
    from areal_like.tasks.tokenizer import load_tokenizer

    mine = load_tokenizer(model_cfg).get_vocab()
    theirs = load_tokenizer(c.model_config(model_cfg)).get_vocab()
    if mine != theirs:
        raise ValueError(f"trainer.critic.model.path={path!r} has another tokenizer than the "
                         f"policy's ({model_cfg.path or model_cfg.tokenizer!r}; vocabularies of "
                         f"{len(theirs)} and {len(mine)} tokens differ): the critic scores the "
                         "policy's tokens, so it needs the same tokenizer")


def _calls(batch: TrainBatch, rows: torch.Tensor, micro_batch_size: int):
    """This rank's right-padded calls over ``rows`` as (rows, real); every rank as many."""
    p = plan_minibatch(rows, batch.prompt_lens + batch.output_lens, rank_world()[1],
                       max_seqs=micro_batch_size, max_tokens=0, packed=False)
    for mb_rows in p.calls[rank_world()[0]]:
        yield (rows[:1], False) if mb_rows is None else (mb_rows, True)


def _positions(mb: TrainBatch) -> torch.Tensor:
    """The position whose hidden state is the state before output token t: P - 1 + t."""
    s, t_max = mb.input_ids.shape[1], mb.mask.shape[1]
    return (mb.prompt_lens[:, None] - 1
            + torch.arange(t_max, device=mb.input_ids.device)).clamp(max=s - 1)


@torch.no_grad()
def critic_values(critic: Critic, batch: TrainBatch, micro_batch_size: int) -> torch.Tensor:
    """V_old [N, T] (CPU, fp32, 0 off the mask): the critic's values of every row, as it is now."""
    out = torch.zeros_like(batch.mask)
    rows = torch.arange(batch.n_seqs)
    with evaluating(critic.model):
        for idx, real in _calls(batch, rows, micro_batch_size):
            mb = batch.select(idx).to(critic.device)
            v = critic.model(mb.input_ids, _positions(mb)).cpu()
            if real:
                out[idx, :v.shape[1]] = v
    if several():
        dist.all_reduce(out)
    return out * batch.mask


def critic_advantages(c: CriticConfig, batch: TrainBatch, values: torch.Tensor,
                      kl: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(actor advantages, critic returns) [N, T] fp32 for ``batch`` from V_old ``values``: outcome
    reward at the last token, a process reward model's step rewards at their tokens (the outcome
    is then the reward less their sum: the rule's share), minus ``c.kl_coef`` * ``kl`` per token;
    GAE with ``c.lambda_actor`` (VAPO's per-length lambda with ``c.adaptive_lambda``), whitened
    over the batch's tokens with ``c.whiten_advantages``; returns with ``c.lambda_critic``."""
    process = batch.process_rewards
    outcome = batch.rewards if process is None else batch.rewards - process.sum(-1)
    r = token_rewards(outcome, batch.mask, process=process, kl=kl, kl_coef=c.kl_coef)
    lam = adaptive_lambda(batch.mask.sum(-1), c.alpha) if c.adaptive_lambda else c.lambda_actor
    adv, _ = gae(r, values, batch.mask, gamma=c.gamma, lam=lam)
    _, returns = gae(r, values, batch.mask, gamma=c.gamma, lam=c.lambda_critic)
    if c.whiten_advantages:
        adv = whiten(adv, batch.mask)
    return adv.float(), returns.float()


def train_critic(critic: Critic, batch: TrainBatch, old_values: torch.Tensor,
                 returns: torch.Tensor, minibatch_rows: list[torch.Tensor],
                 micro_batch_size: int) -> dict[str, float]:
    """One optimizer step per minibatch (``minibatch_rows``) on the clipped value loss; the stats,
    averaged over the minibatches (``critic_`` keys)."""
    world = critic.world_size
    per_step: list[dict[str, float]] = []
    for rows in minibatch_rows:
        critic.optimizer.zero_grad(set_to_none=True)
        n_tok = float(batch.mask[rows].sum())
        sums: dict[str, torch.Tensor] = {}
        for idx, real in _calls(batch, rows, micro_batch_size):
            mb = batch.select(idx).to(critic.device)
            t = mb.mask.shape[1]
            mask = mb.mask if real else torch.zeros_like(mb.mask)
            v = critic.model(mb.input_ids, _positions(mb))
            loss, st = value_loss(v, old_values[idx, :t].to(critic.device),
                                  returns[idx, :t].to(critic.device), mask,
                                  clip=critic.cfg.value_clip, n_tokens_global=n_tok)
            (loss * world).backward()  # FSDP2 averages over ranks: the sum is the minibatch's
            for k, val in st.items():
                sums[k] = sums.get(k, 0.0) + val.detach().float().cpu()
        keys = sorted(sums)
        vals = torch.stack([sums[k].reshape(()) for k in keys])
        if several():
            dist.all_reduce(vals)
        out = {f"critic_{k}": float(v) for k, v in zip(keys, vals)}
        out["critic_grad_norm"] = clip_gradients(critic.model, critic.cfg.grad_clip)
        if torch.isfinite(torch.tensor([out["critic_grad_norm"], out["critic_value_loss"]])).all():
            critic.optimizer.step()
        critic.scheduler.step()
        per_step.append(out)
    critic.optimizer.zero_grad(set_to_none=True)  # not held through the policy's next step
    return {k: sum(d[k] for d in per_step) / len(per_step) for k in per_step[0]}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the valid tokens: 1 when the critic predicts the returns."""
    m = mask > 0
    r, v = returns[m].double(), values[m].double()
    var = r.var(unbiased=False)
    return float(1.0 - (r - v).var(unbiased=False) / var) if var > 0 else 0.0
