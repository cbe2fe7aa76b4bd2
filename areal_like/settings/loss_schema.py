"""The ``trainer.loss`` section: ``kernel`` (one of ``LOSS_KINDS``), the knobs every kernel
shares, and ``trainer.loss.<kernel>.*`` for each kernel's own (only the chosen one's is read).
Formulas, sources and defaults: trainer/LOSSES.md; ``trainer/losses.py`` ``KERNELS`` has one entry
per name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Annotated, Any, ClassVar

from areal_like.settings.config_checks import Section, above, at_least, check, one_of, within

LOSS_KINDS = ("ppo", "decoupled_ppo", "tis", "mis", "icepop", "gspo", "vespo", "vcpo", "oapl")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# the kernels with a PPO trust region on pi_theta/pi_prox: the only readers of the shared eps_clip,
# eps_clip_high and dual_clip
PPO_CLIP_KINDS = ("ppo", "decoupled_ppo", "tis", "mis", "icepop")
# kernels whose own advantages take a baseline over the prompt's group whatever the estimator
# (trainer/advantages.py): a group of one is its own baseline. The estimators give a group of one
# no baseline (mean 0, std 1, as verl: A = R), so they train with it
GROUP_BASELINE_KERNELS = ("vcpo", "oapl")
# kernels that take a per-token advantage as it comes, so a critic's GAE can drive them
# (trainer.critic, critic_schema.py); gspo, vcpo and oapl build advantages of their own
CRITIC_KINDS = ("ppo", "decoupled_ppo", "tis", "mis", "icepop", "vespo")
ESTIMATORS = ("grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")

K = "trainer.loss."


@dataclass(kw_only=True)
class DecoupledPPOConfig(Section):
    """AReaL (LOSSES.md section 4): tokens whose pi_prox/pi_behav is over ``cap`` get weight 0."""

    key = K + "decoupled_ppo"
    cap: Annotated[float | None, above(1)] = 5.0  # None = no cap


@dataclass(kw_only=True)
class TISConfig(Section):
    """TIS (section 5): the IS weight truncated from above at ``cap``, per token or per sequence."""

    key = K + "tis"
    cap: Annotated[float, above(0)] = 2.0  # upper truncation of the importance weight
    # token | sequence (rho_i = the product over the sequence)
    level: Annotated[str, one_of("token", "sequence")] = "token"


@dataclass(kw_only=True)
class MISConfig(Section):
    """Seq-MIS (section 6): sequences whose IS weight is outside [low, high] get weight 0."""

    key: ClassVar[str] = K + "mis"
    low: float = 0.5  # lower edge of the kept band of the IS weight
    high: float = 2.0  # upper edge of the kept band of the IS weight

    def __post_init__(self):
        super().__post_init__()
        check(f"{self.key}.low", 0 <= self.low < self.high, f"in [0, {self.key}.high)", self.low)


@dataclass(kw_only=True)
class IcePopConfig(MISConfig):
    """IcePop (section 6): the same band on each token's IS weight; the paper's beta = 5."""

    key: ClassVar[str] = K + "icepop"
    high: float = 5.0  # upper edge of the kept band of each token's IS weight (the paper's beta)


@dataclass(kw_only=True)
class GSPOConfig(Section):
    """GSPO (section 3): a trust region of its own on the sequence ratio (the paper's eps)."""

    key = K + "gspo"
    fixed_agg: ClassVar[str] = "seq-mean-token-mean"
    # lower clip of the sequence ratio (1 - eps_clip)
    eps_clip: Annotated[float, within(0, 1, "()")] = 3e-4
    # None = eps_clip; the ratio's upper bound is 1 + it, so below 0 the clamp inverts
    eps_clip_high: Annotated[float | None, above(0)] = 4e-4


@dataclass(kw_only=True)
class VESPOConfig(Section):
    """VESPO (section 7): phi(W) = W^k exp(lambda (1 - W)), (k, lambda) by the sign of the
    advantage; phi -> 0 as W -> 0 needs k > 0, as W -> inf lambda > 0."""

    key = K + "vespo"
    k_pos: Annotated[float, above(0)] = 2.0  # k of phi(W) for positive advantages
    lambda_pos: Annotated[float, above(0)] = 3.0  # lambda of phi(W) for positive advantages
    k_neg: Annotated[float, above(0)] = 3.0  # k of phi(W) for negative advantages
    lambda_neg: Annotated[float, above(0)] = 2.0  # lambda of phi(W) for negative advantages


@dataclass(kw_only=True)
class VCPOConfig(Section):
    """VCPO (section 8): capped sequence IS weight, the off-policy optimal baseline,
    an ESS-scaled LR."""

    key = K + "vcpo"
    fixed_agg: ClassVar[str] = "seq-mean-token-mean"
    cap: Annotated[float, above(0)] = 8.0  # cap of the sequence importance weight
    # readme: w^2 |g|^2 (paper) | code: wclip^2 w^2 |g|^2 (released code)
    baseline_weight: Annotated[str, one_of("readme", "code")] = "readme"
    ess_base: Annotated[float, above(0)] = 1.0  # the LR is scaled by ESS / ess_base


@dataclass(kw_only=True)
class OAPLConfig(Section):
    """OAPL (section 9): two betas, as the implementations citing the paper use them."""

    key = K + "oapl"
    beta1: Annotated[float, above(0)] = 1.0  # temperature of V_hat = beta1 log mean exp(R / beta1)
    # scales the log-ratio in (beta2 Delta - (R - V_hat))^2: the KL strength
    beta2: Annotated[float, above(0)] = 1e-3


@dataclass(kw_only=True)
class LossConfig(Section):
    """The kernel, the knobs all kernels share, and one section per kernel (``params``: the chosen
    one's)."""

    key = K.rstrip(".")
    # the loss kernel (one of LOSS_KINDS; trainer/LOSSES.md); loss=X presets set it with their
    # defaults (loss=grpo is kernel ppo with seq-mean-token-mean)
    kernel: Annotated[str, one_of(*LOSS_KINDS)] = "decoupled_ppo"
    # gspo and vcpo always seq-mean-token-mean, oapl a mean over sequences
    agg: Annotated[str, one_of(*AGG_MODES)] = "token-mean"
    # seq-mean-token-sum-norm constant C (None = task.max_new_tokens)
    loss_scale_factor: Annotated[float | None, above(0)] = None
    # the PPO trust region (ppo, decoupled_ppo, tis, mis, icepop)
    eps_clip: Annotated[float, within(0, 1, "()")] = 0.2
    eps_clip_high: Annotated[float | None, above(0)] = None  # None = eps_clip
    dual_clip: Annotated[float | None, above(1)] = None  # c > 1, binds where A < 0
    # KL to a frozen reference, any kernel; 0 = no reference is built
    kl_coef: Annotated[float, at_least(0)] = 0.0
    # k1 | k2 | k3 (k3 = verl's low_var_kl)
    kl_estimator: Annotated[str, one_of("k1", "k2", "k3")] = "k3"
    decoupled_ppo: DecoupledPPOConfig = field(default_factory=DecoupledPPOConfig)
    tis: TISConfig = field(default_factory=TISConfig)
    mis: MISConfig = field(default_factory=MISConfig)
    icepop: IcePopConfig = field(default_factory=IcePopConfig)
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
    vespo: VESPOConfig = field(default_factory=VESPOConfig)
    vcpo: VCPOConfig = field(default_factory=VCPOConfig)
    oapl: OAPLConfig = field(default_factory=OAPLConfig)

    @property
    def params(self) -> Any:
        """The chosen kernel's own knobs (its section of this config), or None when it has none."""
        return getattr(self, self.kernel, None)

    def check_for_kernel(self) -> None:
        """A run config may not name an aggregation its kernel does not use, a loss scale its
        aggregation does not read, nor a PPO trust region knob (``PPO_CLIP_KINDS``) for a kernel
        that ignores it (the kernel functions accept any): asked for and silently not applied."""
        fixed = getattr(self.params, "fixed_agg", None)
        check(K + "agg", fixed is None or self.agg == fixed,
              f"{fixed!r} with {K}kernel={self.kernel}", self.agg)
        check(K + "agg", self.kernel != "oapl" or self.kl_coef > 0 or self.agg == "token-mean",
              f"left at 'token-mean' with {K}kernel=oapl and {K}kl_coef=0: oapl's loss is a "
              "mean over sequences, and agg shapes only the KL term", self.agg)
        check(K + "loss_scale_factor",
              self.loss_scale_factor is None or self.agg == "seq-mean-token-sum-norm",
              f"null with {K}agg={self.agg!r}: only seq-mean-token-sum-norm divides by it",
              self.loss_scale_factor)
        if self.kernel in PPO_CLIP_KINDS:
            return
        own = f"; its own clip range is {K}gspo.*" if self.kernel == "gspo" else ""
        for f in fields(self):
            if f.name in ("eps_clip", "eps_clip_high", "dual_clip"):
                value, unset = getattr(self, f.name), "null" if f.default is None else f.default
                check(K + f.name, value == f.default,
                      f"left at its default ({unset}) with {K}kernel={self.kernel}, which does "
                      f"not read it (only {', '.join(PPO_CLIP_KINDS)} do){own}", value)
