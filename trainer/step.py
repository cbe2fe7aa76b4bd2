"""One policy version's update: ``train_step`` -> minibatches -> ``forward_backward(microbatch)``.

Formulas live in ``trainer/losses.py`` and ``trainer/advantages.py``; this module decides what
each call sees. Invariants (the invariance tests check them):
- A minibatch is a contiguous run of WHOLE groups and one optimizer step; its layout
  (``trainer/packing.py``) is the same for every pass (training, prox, reference, VCPO).
  So ``trainer.num_minibatches`` is at most ``buffer.groups_per_step`` (refused at config load).
- Every call gets the minibatch-GLOBAL counts (computed locally: every rank holds the batch), and
  the local loss is scaled by the world size: loss and weights do not depend on micro-batch size
  or rank count. All ranks run the same number of passes.
- With reference == policy the KL term is exactly 0 (same micro-batches).
- Advantages once on the whole batch, except ``Kernel.per_minibatch`` (vcpo).
  (VCPO's one-sequence passes follow ``pack_sequences``: one sequence has no padding.)
- pi_prox is the policy at the start of the step: with one minibatch each micro-batch's own
  detached log-probs (``fuse_prox``), else a separate no-grad pass; the same numbers (so with
  LoRA dropout always the separate pass: it computes without dropout).
- A non-finite step is skipped on every rank alike (``trainer/finite_guard.py``).
- Rows left out by ``trained_rows`` (every advantage exactly 0) change neither loss nor gradient;
  the stats other than the loss describe the rows computed.
- VCPO: one extra backward per trajectory for its score norms; the LR is ESS-scaled for that
  optimizer step only.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from areal_like.settings.config import LossConfig, RunConfig, TaskConfig, TrainerConfig
from areal_like.settings.distill_schema import DistillConfig
from areal_like.weights.lora import adapters_disabled
from areal_like.weights.routing import replaying
from trainer.advantages import AdvantageInputs, Advantages, distill_advantages
from trainer.data import TrainBatch
from trainer.experts import expert_load
from trainer.finite_guard import SKIPPED, all_finite
from trainer.logprobs import CHUNK_TOKENS
from trainer.loss_terms import norms
from trainer.losses import (
    KERNELS,
    Kernel,
    accumulate_stats,
    compute_policy_loss,
    finalize_stats,
    vcpo_is_weights,
)
from trainer.model import Policy, clip_gradients, evaluating
from trainer.packed_attention import Packing
from trainer.packing import Plan, plan_minibatch
from trainer.ranks import local, rank_world, several


@dataclass(frozen=True)
class StepSettings:
    loss: LossConfig
    estimator: str
    micro_batch_size: int
    num_minibatches: int
    grad_clip: float
    temperature: float
    chunk_tokens: int = CHUNK_TOKENS  # trainer.logprob_chunk_tokens
    head: str = "chunked"  # trainer.logprob_head
    # task.max_new_tokens: Dr.GRPO's constant C when none is configured
    max_new_tokens: int | None = None
    pack_sequences: bool = False  # trainer.pack_sequences
    pack_min_padding: float = 0.0  # trainer.pack_min_padding (0: every minibatch packed)
    max_tokens_per_micro_batch: int = 0  # trainer.max_tokens_per_micro_batch (0: micro_batch_size)
    skip_zero_advantage: bool = False  # trainer.skip_zero_advantage
    lora_dropout: float = 0.0  # trainer.lora.dropout: the training forward's only
    distill: DistillConfig | None = None  # distill (None: off): the teachers' term in advantages

    @classmethod
    def of(cls, t: TrainerConfig, task: TaskConfig,
           distill: DistillConfig | None = None) -> StepSettings:
        return cls(loss=t.loss, estimator=t.estimator, micro_batch_size=t.micro_batch_size,
                   num_minibatches=t.num_minibatches, grad_clip=t.grad_clip,
                   temperature=task.temperature,
                   chunk_tokens=t.logprob_chunk_tokens, head=t.logprob_head,
                   max_new_tokens=task.max_new_tokens,
                   pack_sequences=t.pack_sequences, pack_min_padding=t.pack_min_padding,
                   max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
                   skip_zero_advantage=t.skip_zero_advantage, lora_dropout=t.lora.dropout,
                   distill=distill)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> StepSettings:
        return cls.of(cfg.trainer, cfg.task, cfg.distill if cfg.distill.enabled else None)

    @property
    def kernel(self) -> Kernel:
        return KERNELS[self.loss.kernel]

    @property
    def fuse_prox(self) -> bool:
        """pi_prox is the training forward's own log-probs, detached (module docstring): not with
        LoRA dropout, which that forward has and pi_prox must not (the engines have none)."""
        return self.kernel.needs_prox and self.num_minibatches == 1 and not self.lora_dropout

    def loss_config(self, batch: TrainBatch) -> LossConfig:
        if self.loss.loss_scale_factor is not None:
            return self.loss
        # Dr.GRPO's C: the task's longest response, so the scale does not move with each batch
        c = self.max_new_tokens if self.max_new_tokens is not None else batch.mask.shape[1]
        return replace(self.loss, loss_scale_factor=float(c))


def output_logp(model: torch.nn.Module, mb: TrainBatch, temperature: float,
                chunk_tokens: int = CHUNK_TOKENS, packed: bool = False,
                head: str = "chunked") -> torch.Tensor:
    """log pi(output token t) [n, T] under ``model`` (fp32): the logits at position P - 1 + t;
    garbage on padding (0 when ``packed``); ``head`` as trainer/logprobs.py's."""
    if packed:
        return packed_output_logp(model, mb, temperature, chunk_tokens, head)
    s, t_max = mb.input_ids.shape[1], mb.mask.shape[1]
    pos = (mb.prompt_lens[:, None] - 1
           + torch.arange(t_max, device=mb.input_ids.device)).clamp(max=s - 2)
    with replay(model, None if mb.routes is None else mb.routes.flatten(0, 1)):
        return model.policy_logprobs(mb.input_ids, pos, temperature, chunk_tokens, head=head)


def replay(model: torch.nn.Module, routes: torch.Tensor | None) -> AbstractContextManager:
    """The forward routes to ``routes`` [tokens, layers, top_k] (trainer.routing_replay), or
    freely when None."""
    return contextlib.nullcontext() if routes is None else replaying(model, routes)


def packed_output_logp(model: torch.nn.Module, mb: TrainBatch, temperature: float,
                       chunk_tokens: int = CHUNK_TOKENS, head: str = "chunked") -> torch.Tensor:
    """``output_logp`` with the rows packed into one row: row i at offset ``o_i``, its output
    token t predicted at ``o_i + P_i - 1 + t``; only output tokens reach the lm_head. The lengths
    are read back once (the micro-batch's one host sync); every index is built on the host from
    them and copied to the device without waiting, and the layers get them as a ``Packing``."""
    dev = mb.input_ids.device
    n, t_max = mb.mask.shape
    prompt, output = torch.stack([mb.prompt_lens, mb.output_lens]).tolist()
    lens = [p + o for p, o in zip(prompt, output)]
    starts = [0, *itertools.accumulate(lens)][:-1]
    width = mb.input_ids.shape[1]
    flat = torch.cat([torch.arange(k) + i * width for i, k in enumerate(lens)])
    ids = mb.input_ids.reshape(-1)[flat.to(dev, non_blocking=True)][None]
    row = torch.repeat_interleave(torch.arange(n), torch.tensor(output, dtype=torch.long))
    t = torch.cat([torch.arange(o) for o in output])
    pos = torch.tensor(starts)[row] + torch.tensor(prompt)[row] - 1 + t
    if len(pos) == 0:  # no output token: one throwaway position keeps the graph (and FSDP) alike
        pos = torch.zeros(1, dtype=torch.long)
    packing = Packing.of(lens, dev)
    routes = None if mb.routes is None else mb.routes.flatten(0, 1)[flat.to(dev)]
    with replay(model, routes):
        lp = model.policy_logprobs(ids, pos[None].to(dev, non_blocking=True), temperature,
                                   chunk_tokens, packing, head=head)[0]
    out = torch.zeros(n, t_max, dtype=lp.dtype, device=dev)
    if len(row) == 0:
        return out + 0.0 * lp.sum()
    return out.index_put((row.to(dev, non_blocking=True), t.to(dev, non_blocking=True)), lp)


def minibatches(batch: TrainBatch, n: int) -> list[torch.Tensor]:
    """Split the groups into ``n`` contiguous runs
    (sizes differ by at most one group); row indices."""
    n_groups = int(batch.head_versions.numel())
    bounds = [round(k * n_groups / n) for k in range(n + 1)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        rows = ((batch.group_ids >= a) & (batch.group_ids < b)).nonzero().flatten()
        if len(rows):
            out.append(rows)
    return out


def plan(batch: TrainBatch, rows: torch.Tensor, s: StepSettings) -> Plan:
    """Every rank's micro-batches of the minibatch ``rows`` (``trainer/packing.py``): packed with
    ``pack_sequences`` unless every padded call would waste less than ``pack_min_padding``."""
    def make(packed: bool) -> Plan:
        return plan_minibatch(rows, batch.prompt_lens + batch.output_lens, rank_world()[1],
                              max_seqs=s.micro_batch_size, max_tokens=s.max_tokens_per_micro_batch,
                              packed=packed)
    if not s.pack_sequences:
        return make(False)
    if s.pack_min_padding > 0:
        padded = make(False)
        if padded.worst_padding() < s.pack_min_padding:
            return padded
    return make(True)


def rank_calls(p: Plan, rows: torch.Tensor) -> Iterator[tuple[torch.Tensor, bool]]:
    """This rank's calls of ``p`` as (rows, real): a call that only pads to the count every rank
    runs (FSDP's collectives) runs ``rows[:1]`` at zero weight."""
    for mb_rows in p.calls[rank_world()[0]]:
        yield (rows[:1], False) if mb_rows is None else (mb_rows, True)


@torch.no_grad()
def batch_logp(model: torch.nn.Module, batch: TrainBatch, s: StepSettings,
               device: torch.device) -> torch.Tensor:
    """log-probs [N, T] (CPU, fp32) of this rank's rows, over ``train_step``'s micro-batches."""
    out = torch.zeros_like(batch.behav_logp)
    with evaluating(model):  # no dropout: what the engines compute
        for rows in minibatches(batch, s.num_minibatches):
            p = plan(batch, rows, s)
            for idx, real in rank_calls(p, rows):
                lp = output_logp(model, batch.select(idx).to(device), s.temperature, s.chunk_tokens,
                                 p.packed, head=s.head)
                if real:
                    out[idx, :lp.shape[1]] = lp.float().cpu()
    return out


def recompute_prox_logp(policy: Policy, batch: TrainBatch, s: StepSettings) -> torch.Tensor | None:
    """pi_prox of this rank's rows; None when not needed or ``fuse_prox``."""
    if not s.kernel.needs_prox or s.fuse_prox:
        return None
    return batch_logp(policy.model, batch, s, policy.device)


def reference_logp(reference: torch.nn.Module | None, batch: TrainBatch, s: StepSettings,
                   device: torch.device) -> torch.Tensor | None:
    """pi_ref of this rank's rows (None without a reference); LoRA: the adapters off."""
    if reference is None:
        return None
    with adapters_disabled(reference):
        return batch_logp(reference, batch, s, device)


def minibatch_advantages(policy: Policy, batch: TrainBatch, rows: torch.Tensor,
                         s: StepSettings) -> Advantages:
    """The kernel's advantages for one minibatch (whole groups), at the weights it starts from."""
    a = AdvantageInputs(batch.rewards[rows], batch.group_ids[rows], batch.mask[rows], s.estimator,
                        score_terms=lambda: sequence_score_terms(policy, batch, rows, s))
    return s.kernel.advantages(a, s.loss.params)


def batch_advantages(batch: TrainBatch, s: StepSettings) -> Advantages | None:
    """The kernel's advantages over the WHOLE batch;
    None when they need each minibatch's weights."""
    if s.kernel.per_minibatch:
        return None
    a = AdvantageInputs(batch.rewards, batch.group_ids, batch.mask, s.estimator)
    return s.kernel.advantages(a, s.loss.params)


def with_teacher(adv: Advantages, batch: TrainBatch, rows: torch.Tensor,
                 s: StepSettings) -> Advantages:
    """``adv`` with the teacher's term of on-policy distillation on the rows that carry its
    log-probs (``distill_advantages``; LOSSES.md section 11), and the sampled reverse KL
    (log pi_behav - log pi_teacher, per token of those rows) among its stats; ``adv`` itself when
    distillation is off or no row has a teacher's log-probs."""
    if s.distill is None or batch.teacher_logp is None:
        return adv
    d, mask, has = s.distill, batch.mask[rows], batch.has_teacher[rows]
    teacher, behav = batch.teacher_logp[rows], batch.behav_logp[rows]
    values = distill_advantages(adv.values, teacher, behav, mask, has, kl_weight=d.kl_weight,
                                task_reward_weight=d.task_reward_weight,
                                group_ids=batch.group_ids[rows] if d.kl_baseline == "group"
                                else None)
    m = mask * has[:, None]
    kl = float(((behav - teacher) * m).sum() / m.sum().clamp(min=1.0))
    return adv._replace(values=values, stats=adv.stats | {"distill_reverse_kl": kl,
                                                          "distill_rows": float(has.sum())})


def forward_backward(policy: Policy, mb: TrainBatch, advantages: torch.Tensor,
                     prox_logp: torch.Tensor | None,
                     s: StepSettings, loss_cfg: LossConfig, n_tokens: float, n_seqs: float,
                     ref_logp: torch.Tensor | None = None, *, packed: bool,
                     share: float = 1.0) -> dict:
    """Loss and gradient of one micro-batch (on the device; ``packed``: its plan's layout); the
    kernel's stats. ``n_tokens`` / ``n_seqs`` count the rows computed, which are ``share`` of the
    minibatch's loss normaliser (``trained_rows``): loss and gradient are scaled by it."""
    logp = output_logp(policy.model, mb, s.temperature, s.chunk_tokens, packed, head=s.head)
    if prox_logp is None and s.kernel.needs_prox:
        prox_logp = logp.detach()
    loss, stats = compute_policy_loss(
        loss_cfg, logp=logp, prox_logp=prox_logp, behav_logp=mb.behav_logp, advantages=advantages,
        mask=mb.mask,
        n_tokens_global=n_tokens, n_seqs_global=n_seqs, ref_logp=ref_logp)
    if (aux := getattr(policy.model, "router_aux_loss", None)) is not None:  # a mixture's, if on
        loss, policy.model.router_aux_loss = loss + policy.model.router_aux_loss_coef * aux, None
    (loss * (policy.world_size * share)).backward()  # FSDP2 averages over ranks (module docstring)
    if share != 1.0:
        stats = stats | {k: stats[k] * share for k in ("loss", "policy_loss")}
    return stats


def trained_rows(rows: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 s: StepSettings) -> torch.Tensor:
    """The rows of a minibatch that are computed: those with an advantage other than exactly 0 when
    ``skip_zero_advantage``, the kernel's loss is 0 with a zero gradient at A = 0
    (``Kernel.zero_at_zero_advantage``), and neither a KL term nor a separate pi_prox pass needs
    every row in the same layout; else all. A skipped row adds exactly nothing to the loss or the
    gradient, so the update is the one computing every row."""
    separate_prox = s.kernel.needs_prox and not s.fuse_prox
    allowed = s.skip_zero_advantage and s.kernel.zero_at_zero_advantage
    if not allowed or s.loss.kl_coef or separate_prox:
        return rows
    return rows[((advantages[rows] != 0) & (mask[rows] > 0)).any(-1)]


def loss_share(cfg: LossConfig, mask: torch.Tensor, trained: torch.Tensor, n_tokens: float,
               n_seqs: float) -> tuple[float, float, float]:
    """(tokens, sequences) of the ``trained`` rows, and their share of the minibatch's normaliser
    under ``cfg.agg``: 1.0 when every row is trained or the normaliser is a constant."""
    t_tokens, t_seqs = norms(mask[trained], None, None)  # 1 and 1 when none: their calls are masked
    agg = getattr(cfg.params, "fixed_agg", cfg.agg)  # gspo and vcpo aggregate one way only
    if agg == "seq-mean-token-sum-norm":
        return t_tokens, t_seqs, 1.0
    # floored as norms() floors: a minibatch without a loss token trains nothing, and divides by 1
    share = (t_seqs / max(n_seqs, 1.0) if agg.startswith("seq-mean")
             else t_tokens / max(n_tokens, 1.0))
    return t_tokens, t_seqs, share


def _reduce_stats(stats: dict) -> dict[str, float]:
    keys = sorted(stats)
    sums = [k for k in keys if not k.endswith("_max")]
    maxes = [k for k in keys if k.endswith("_max")]
    vs = torch.stack([stats[k].float().cpu().reshape(()) for k in sums]) if sums else torch.zeros(0)
    vm = (torch.stack([stats[k].float().cpu().reshape(()) for k in maxes]) if maxes
          else torch.zeros(0))
    if several():
        dist.all_reduce(vs)
        dist.all_reduce(vm, op=dist.ReduceOp.MAX)
    out = dict(zip(sums, vs)) | dict(zip(maxes, vm))
    return {k: float(v) for k, v in finalize_stats(out).items()}


def sequence_score_terms(policy: Policy, batch: TrainBatch, rows: torch.Tensor,
                         s: StepSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-trajectory (w_i, ||grad sum_t logp_it||^2) for VCPO's baseline, one backward each;
    trajectory k is rank k % world's, the others run it at weight 0."""
    rank, world = rank_world()
    w = torch.zeros(len(rows), dtype=torch.float64)
    g2 = torch.zeros(len(rows), dtype=torch.float64)
    for k, j in enumerate(rows.tolist()):
        mine = k % world == rank
        mb = batch.select([j]).to(policy.device)
        policy.optimizer.zero_grad(set_to_none=True)
        logp = output_logp(policy.model, mb, s.temperature, s.chunk_tokens, s.pack_sequences,
                           head=s.head)
        score = torch.where(mb.mask > 0, logp.float(), torch.zeros_like(mb.mask)).sum()
        (score * (world if mine else 0.0)).backward()
        # Read after the backward: FSDP2 swaps sharded and unsharded parameters.
        params = [p for p in policy.model.parameters() if p.requires_grad]
        g2[k] = sum(float(local(p.grad).double().pow(2).sum())
                    for p in params if p.grad is not None)
        if mine:
            # unclipped w
            w[k] = float(vcpo_is_weights(logp.detach(), mb.behav_logp, mb.mask)[0][0])
    policy.optimizer.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(g2)
        dist.all_reduce(w)
    return w, g2


def train_step(policy: Policy, batch: TrainBatch, s: StepSettings, prox_logp: torch.Tensor | None,
               ref_logp: torch.Tensor | None = None,
               advantages: torch.Tensor | None = None) -> dict[str, float]:
    """``num_minibatches`` optimizer steps on ``batch``; returns stats averaged over them.
    ``advantages`` [N, T]: given (a critic's GAE, ``trainer/critic.py``) instead of the kernel's."""
    if prox_logp is None and s.kernel.needs_prox and not s.fuse_prox:
        raise ValueError(f"trainer.loss.kernel={s.loss.kernel} with "
                         f"trainer.num_minibatches={s.num_minibatches} "
                         "needs the proximal log-probs recomputed before the step "
                         "(recompute_prox_logp)")
    loss_cfg = s.loss_config(batch)
    whole = batch_advantages(batch, s) if advantages is None else Advantages(advantages)
    advantages = torch.zeros_like(batch.mask)
    per_step: list[dict[str, float]] = []
    for rows in minibatches(batch, s.num_minibatches):
        n_tokens = float(batch.mask[rows].sum())
        n_seqs = float((batch.mask[rows].sum(-1) > 0).sum())
        if whole is None:
            adv = minibatch_advantages(policy, batch, rows, s)
        else:
            adv = whole._replace(values=whole.values[rows])
        adv = with_teacher(adv, batch, rows, s)
        advantages[rows] = adv.values.to(advantages.device)
        policy.optimizer.zero_grad(set_to_none=True)
        trained = trained_rows(rows, advantages, batch.mask, s)
        # no row to train: one runs at zero weight, so the gradients are zeros made by FSDP's usual
        # passes and the optimizer steps as after any backward (momentum, weight decay)
        run = trained if len(trained) else rows[:1]
        mb_plan = plan(batch, run, s)
        t_tokens, t_seqs, share = loss_share(loss_cfg, batch.mask, trained, n_tokens, n_seqs)
        stats: dict = {}
        load: dict = {}  # a mixture's expert load (trainer/experts.py)
        with expert_load(policy.model, load):
            for idx, real in rank_calls(mb_plan, run):
                mb = batch.select(idx)
                if not (real and len(trained)):
                    mb.mask = torch.zeros_like(mb.mask)
                t = mb.mask.shape[1]
                prox = None if prox_logp is None else prox_logp[idx, :t].to(policy.device)
                ref = None if ref_logp is None else ref_logp[idx, :t].to(policy.device)
                adv_t = advantages[idx, :t].to(policy.device)
                mbs = forward_backward(policy, mb.to(policy.device), adv_t, prox, s, loss_cfg,
                                       t_tokens, t_seqs, ref, packed=mb_plan.packed, share=share)
                stats = accumulate_stats(stats, mbs)
        out = {"loss": 0.0, "policy_loss": 0.0}  # the stats of a row at zero weight mean nothing
        if len(trained):
            out = _reduce_stats(stats) | layout_stats(mb_plan) | load
        out["zero_adv_skip_frac"] = 1.0 - len(trained) / len(rows)
        out["grad_norm"] = clip_gradients(policy.model, s.grad_clip)
        out[SKIPPED] = 0.0 if all_finite(out["loss"], out["grad_norm"], adv.lr_scale) else 1.0
        if out[SKIPPED]:  # never applied; the same decision on every rank (trainer/finite_guard.py)
            policy.optimizer.zero_grad(set_to_none=True)
        else:
            out["lr"] = apply_optimizer_step(policy, adv.lr_scale)
        per_step.append(out | adv.stats | {"tokens": n_tokens, "seqs": n_seqs})
    return _combine(per_step)


def apply_optimizer_step(policy: Policy, lr_scale: float) -> float:
    """One optimizer and scheduler step at ``lr_scale`` times the scheduled LR; the LR applied."""
    base_lrs = [g["lr"] for g in policy.optimizer.param_groups]
    for g in policy.optimizer.param_groups:
        g["lr"] *= lr_scale
    lr = policy.optimizer.param_groups[0]["lr"]
    policy.optimizer.step()
    for g, base in zip(policy.optimizer.param_groups, base_lrs):
        g["lr"] = base
    policy.scheduler.step()
    return lr


# Stats of the layout, not of the loss: padded and packed runs differ in them by design.
LAYOUT_STATS = ("seq_tokens", "computed_tokens", "micro_batches", "rank_token_spread",
                "padding_share", "tokens_per_micro_batch", "packed_minibatches")
_SUMMED = ("tokens", "seqs", "distill_rows", SKIPPED, "seq_tokens", "computed_tokens",
           "micro_batches", "packed_minibatches")


def layout_stats(p: Plan) -> dict[str, float]:
    """One minibatch's layout stats; the rank token spread is (max - min) / mean."""
    st = p.stats()
    mean = st["seq_tokens"] / len(p.calls)
    spread = (st["rank_tokens_max"] - st["rank_tokens_min"]) / mean if mean else 0.0
    return {k: st[k] for k in _SUMMED if k in st} | {"rank_token_spread": spread,
                                                     "packed_minibatches": float(p.packed)}


def _combine(per_step: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for d in per_step for k in d):  # a minibatch may have computed no row
        vals = [d[k] for d in per_step if k in d]
        total_or_mean = sum(vals) if k in _SUMMED else sum(vals) / len(vals)
        out[k] = max(vals) if k.endswith("_max") else total_or_mean
    out["optimizer_steps"] = float(len(per_step)) - out.get(SKIPPED, 0.0)  # the ones applied
    if out.get("computed_tokens"):
        out["padding_share"] = 1.0 - out["seq_tokens"] / out["computed_tokens"]
        out["tokens_per_micro_batch"] = out["computed_tokens"] / max(1.0, out["micro_batches"])
    return out
