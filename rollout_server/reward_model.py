"""A learned reward model (``task.reward_model``): trusted local weights the rollout server loads
and runs itself, scoring a group's responses in batches (rollout_server/ROLLOUT.md, "Reward
models").

A sequence classifier's scalar head (``num_labels=1``) is the score, or, with ``kind=causal_lm``,
the logit of ``token`` after the text. The text is ``template`` filled with the prompt's text and
the decoded response; the model's tokenizer (or ``tokenizer``) makes its ids, right-padded.

A process reward model (``process=true``) scores each step: a response is split after each
``step_delimiter`` (``step_ends``), step k's score is the model's score of the text up to the end
of step k (a row per step, batched with the others: for a causal model the same number as reading
the step's last position in one pass), and the response's score is their sum. ``process_rewards``
puts each step's weighted score on the output token that completes the step, the trajectory's
``process_rewards`` metadata the trainer reads (trainer/LOSSES.md section 10).

Invariants:
* a model that cannot be loaded, or whose head is not scalar, is fatal at start
  (``RewardModelError``; the launcher's preflight runs ``load_problem`` first);
* scoring never raises: a forward pass that raises, returns a non-finite score or runs past
  ``task.reward_timeout_s`` (per group) scores each of its samples ``(0.0, reason)``, counted in
  ``rollout/reward_failures`` (kinds ``model_error``, ``model_timeout``) like every reward failure;
  a pass past its timeout is not interrupted (a thread): the next group waits for it;
* the forward passes run on one thread of their own, never on the server's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from areal_like.net.metrics import Metrics
from areal_like.net.ratelog import RateLimitedLog
from areal_like.settings.reward_model_schema import RewardModelConfig

log = logging.getLogger(__name__)
WARN_EVERY_S = 60.0
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60)
Score = tuple[float, str | None]
# a process reward model's steps: (end character of the step in the response, its score), in order
Steps = tuple[tuple[int, float], ...]
Scored = tuple[float, str | None, Steps]  # the reward model's: (score, failure, steps)


class RewardModelError(RuntimeError):
    """The reward model cannot be used at all (it does not load, or its head is not scalar)."""


def load_problem(cfg: RewardModelConfig) -> str | None:
    """Why ``task.reward_model`` cannot be loaded, in one line naming the key; None when it can.
    Reads only config.json and the tokenizer (no weights)."""
    key = f"task.reward_model.path={cfg.path!r}"
    path = Path(cfg.path).expanduser()
    if not (path / "config.json").is_file():
        return f"{key} is not a local Hugging Face model directory (no config.json)"
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
        tok = _tokenizer(cfg)
    except Exception as e:  # noqa: BLE001 - one line, whatever the files hold
        return f"{key} cannot be loaded: {type(e).__name__}: {e}".splitlines()[0]
    if cfg.kind == "classifier":
        if config.num_labels != 1:
            return (f"{key}: its head gives {config.num_labels} scores (num_labels="
                    f"{config.num_labels}); a reward model's head must be scalar (num_labels=1), "
                    "or set task.reward_model.kind=causal_lm with task.reward_model.token")
        if tok.pad_token_id is None and config.pad_token_id is None:
            return f"{key}: neither the model nor its tokenizer names a pad token to batch with"
        return None
    ids = tok(cfg.token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        return (f"task.reward_model.token={cfg.token!r} is {len(ids)} tokens of the reward "
                "model's tokenizer; it must be exactly one")
    return None


def _tokenizer(cfg: RewardModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(cfg.tokenizer or cfg.path).expanduser()))
    tok.padding_side = "right"
    return tok


class RewardModel:
    """``task.reward_model`` loaded in this process (module docstring)."""

    def __init__(self, cfg: RewardModelConfig, timeout_s: float, metrics: Metrics | None = None):
        if problem := load_problem(cfg):
            raise RewardModelError(problem)
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        self.cfg, self.timeout_s = cfg, timeout_s
        self.metrics = metrics or Metrics()
        self.warnings = RateLimitedLog(log, WARN_EVERY_S)
        self.tokenizer = _tokenizer(cfg)
        auto = AutoModelForSequenceClassification if cfg.kind == "classifier" else \
            AutoModelForCausalLM
        # auto: the launcher hands a server its layout's device (launch/placement.py); a server
        # started without one scores on the CPU
        self.device = "cpu" if cfg.device == "auto" else cfg.device
        self.model = auto.from_pretrained(str(Path(cfg.path).expanduser())).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token_id = self.model.config.pad_token_id
        self.token_id = (self.tokenizer(cfg.token, add_special_tokens=False)["input_ids"][0]
                         if cfg.kind == "causal_lm" else None)
        self._torch = torch
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="reward-model")
        log.info("reward model %s (%s) on %s", cfg.path, cfg.kind, self.device)

    def scores(self, texts: list[str]) -> list[float]:
        """The model's score of each text, in order, ``batch_size`` texts per forward pass."""
        torch, out = self._torch, []
        for i in range(0, len(texts), self.cfg.batch_size):
            batch = self.tokenizer(texts[i:i + self.cfg.batch_size], padding=True,
                                   return_tensors="pt").to(self.device)
            with torch.no_grad():
                logits = self.model(**batch).logits
            if self.token_id is not None:  # the next-token logit after each text's last token
                last = batch["attention_mask"].sum(dim=1) - 1
                logits = logits[torch.arange(len(last)), last, self.token_id]
            out += logits.reshape(len(batch["input_ids"]), -1)[:, 0].float().tolist()
        return out

    async def score_group(self, prompt: str, responses: list[str]) -> list[Scored]:
        """One ``(score, None, steps)`` or ``(0.0, reason, ())`` per response, in order (``steps``:
        a process reward model's, else ``()``); never raises."""
        delimiter = self.cfg.step_delimiter
        ends = [step_ends(r, delimiter) if delimiter else [len(r)] for r in responses]
        texts = [self.cfg.template.format(prompt=prompt, response=r[:e])
                 for r, r_ends in zip(responses, ends) for e in r_ends]
        t0 = time.monotonic()
        future = asyncio.wrap_future(self._thread.submit(self.scores, texts))
        try:
            values = await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            return self._failed("model_timeout", f"reward model: no scores within "
                                f"task.reward_timeout_s={self.timeout_s}s", len(responses))
        except Exception as e:  # noqa: BLE001 - the model's failure is the samples' reason
            why = f"reward model: {type(e).__name__}: {e}".splitlines()[0]
            return self._failed("model_error", why, len(responses))
        finally:
            self.metrics.histogram("rollout/reward_model_seconds", "wall time of the reward "
                                   "model on one group", buckets=SECONDS_BUCKETS).observe(
                                       time.monotonic() - t0)
        out: list[Scored] = []
        left = iter(values)
        for r_ends in ends:
            vs = [next(left) for _ in r_ends]
            bad = [v for v in vs if not math.isfinite(v)]
            out.append(self._failed("model_error", f"reward model: score {bad[0]}", 1)[0] if bad
                       else (math.fsum(vs), None, tuple(zip(r_ends, vs)) if delimiter else ()))
        return out

    def _failed(self, kind: str, why: str, n: int) -> list[Scored]:
        self.metrics.counter("rollout/reward_failures",
                             "samples scored 0 because their reward failed",
                             ("kind",)).labels(kind=kind).inc(n)
        self.warnings.warning(kind, "%d sample(s) scored 0, reward failure (%s): %s", n, kind, why)
        return [(0.0, why, ())] * n

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def combine(rule: list[Score], model: list[Scored], cfg: RewardModelConfig) -> list[Score]:
    """``weight * model + rule_weight * rule`` per sample; a failure of either is the sample's
    (score 0, both reasons)."""
    out = []
    for (r, rule_why), (m, model_why, _) in zip(rule, model, strict=True):
        why = "; ".join(w for w in (rule_why if cfg.rule_weight else None, model_why) if w)
        out.append((0.0, why) if why else (cfg.weight * m + cfg.rule_weight * r, None))
    return out


def step_ends(response: str, delimiter: str) -> list[int]:
    """Where each step of ``response`` ends (a character offset, exclusive): just after each
    ``delimiter``, and at the response's end when text follows the last one (an empty response:
    one empty step)."""
    ends, start = [], 0
    while (i := response.find(delimiter, start)) >= 0:
        start = i + len(delimiter)
        ends.append(start)
    if start < len(response) or not ends:
        ends.append(len(response))
    return ends


def process_rewards(decode: Callable[[list[int]], str], output_ids: list[int], steps: Steps,
                    weight: float) -> list[list]:
    """``[[t, weight * score], ...]``: each step's score on output token t, the first whose
    decoded prefix (``decode(output_ids[:t + 1])``, the text the model scored was decoded the same
    way) reaches the step's end; by bisection over prefixes. Nothing for no output token."""
    out: list[list] = []
    for end, score in steps if output_ids else ():
        lo, hi = 0, len(output_ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(decode(output_ids[:mid + 1])) >= end else (mid + 1, hi)
        out.append([lo, weight * score])
    return out
