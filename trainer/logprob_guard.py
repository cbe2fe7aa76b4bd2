"""The log-prob guard: before the first batch, every engine's log-probs must follow the trainer's
convention (``log_softmax(logits / temperature)`` before top-p/top-k, ``trainer/logprobs.py``).

Rank 0 sends each engine that acknowledged the initial push one short ``/generate`` through the
project's client for its engine kind (``areal_like/engines/``; with the engine API key, once
the engine's rollout server vouched for its URL: ``unvouched``; with LoRA naming the adapter that
push made live), every rank scores the probes
(a collective forward), and rank 0 broadcasts its verdict: a mean absolute per-token difference
above ``trainer.logprob_guard_tol`` (or nan) raises ``LogprobGuardError`` on every rank (the mean,
not the max: bf16 kernels leave rare single tokens off), a refusal (exit 2): a restart would probe
the same engines again. ``tol <= 0`` turns the guard off.

The tolerance's default (``logprob_guard_tol: null``) follows ``model.dtype`` (``DEFAULT_TOL``):
0.05 nats for float32, where engine and trainer agree to ~1e-7; 0.1 for bfloat16 (and float16, not
measured). Measured on CPU, an embedded bf16 engine against the bf16 trainer holding the same
weights, random Qwen2 models, the largest per-probe mean over the probes
(``python benchmarks/bench_logprob_gap.py --dtype bfloat16 --shape S --probes P``): 0.0013 (tiny,
32 probes), 0.0043 (h512 x 4 layers, 32), 0.011 (Qwen2.5-0.5B's shape, 8; largest single token
0.031): the gap grows with depth, so 0.1 leaves a 9x margin at 0.5B. The GPU figure (other
kernels on both sides) is still to be measured: ``tests/gpu/test_engine_cuda.py`` records it as
``logprob_gap_bf16``.

Not covered, and reported as such (``not_checked``): engines that join later, unreachable ones
(a warning), ones no sync port vouches for, and on several nodes a loopback or any-address URL
(it would name rank 0's machine). Only probed engines pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from areal_like.daemon import StartRefused
from areal_like.engines import engine_client
from areal_like.engines.client import EngineError, GenerateOutput
from areal_like.net.dealer import Client
from areal_like.weights.push import ServerPort
from areal_like.wire.protocol import RosterEntry
from trainer.logprobs import token_logprobs
from trainer.ranks import from_rank0
from trainer.weight_members import BUFFER_REQUEST_TIMEOUT_S, roster

log = logging.getLogger("trainer.logprob_guard")

PROBE_TEXT = "the answer is"  # any short text: only its token ids matter
PROBE_TOKENS = 16  # new tokens per probe; enough that the mean is not one token's noise
PROBE_TIMEOUT_S = 60.0  # one short generation on a busy engine
# trainer.logprob_guard_tol's default per model.dtype (null in the config), mean |engine - trainer|
# nats per token: the module docstring has the measurement behind each
DEFAULT_TOL = {"float32": 0.05, "bfloat16": 0.1, "float16": 0.1}
CAUSES = ("the engine does not apply the sampling temperature "
          "to the log-probs it returns, or returns "
          "them after top-p/top-k truncation, or runs with SGLANG_RETURN_ORIGINAL_LOGPROB set; "
          "or it does not serve the trainer's weights")


def default_tol(dtype: str) -> float:
    """The guard's tolerance for engines and trainer computing in ``dtype`` (``model.dtype``)."""
    return DEFAULT_TOL[dtype]


def guard_tol(configured: float | None, dtype: str) -> float:
    """``trainer.logprob_guard_tol`` as the guard applies it: null takes ``dtype``'s default."""
    return default_tol(dtype) if configured is None else configured


class LogprobGuardError(StartRefused):
    """An engine's log-probs do not follow the trainer's convention: training would be biased."""


@dataclass(frozen=True)
class Probe:
    server_id: str
    engine_url: str
    prompt_ids: list[int]
    output_ids: list[int]
    engine_logp: list[float]


def compare_logprobs(engine_logp: Sequence[float],
                     trainer_logp: Sequence[float]) -> tuple[float, float]:
    """(mean, max) absolute per-token difference of two aligned log-prob sequences."""
    if len(engine_logp) != len(trainer_logp) or not engine_logp:
        raise ValueError("log-prob sequences must be non-empty "
                         f"and aligned, got {len(engine_logp)} "
                         f"and {len(trainer_logp)} tokens")
    diffs = [abs(float(a) - float(b)) for a, b in zip(engine_logp, trainer_logp)]
    return sum(diffs) / len(diffs), max(diffs)


def mismatch_message(p: Probe, mean: float, worst: float, tol: float, temperature: float) -> str:
    return (f"log-prob guard: engine {p.server_id} ({p.engine_url}) returns log-probs that differ "
            f"from the trainer's by {mean:.3g} nats per token on average (max {worst:.3g}) over "
            f"{len(p.output_ids)} tokens at temperature {temperature:g}, above "
            f"trainer.logprob_guard_tol={tol:g}. Likely causes: "
            f"{CAUSES}. Refusing to train: the importance ratios would be wrong.")


def probe_sampling(temperature: float) -> dict:
    """The probe's sampling parameters: the run's temperature, untruncated, a fixed length."""
    return {"max_new_tokens": PROBE_TOKENS, "temperature": temperature, "top_p": 1.0,
            "top_k": -1, "ignore_eos": True}


def probe_engine(server_id: str, url: str, prompt_ids: list[int], temperature: float,
                 timeout_s: float = PROBE_TIMEOUT_S, api_key: str | None = None,
                 adapter: str | None = None, engine_kind: str = "sglang") -> Probe:
    """One generate on ``url`` through the project's client for ``engine_kind`` (naming
    ``adapter``): its output tokens and their log-probs. ``EngineError``: the engine refused or did
    not answer."""

    async def generate() -> GenerateOutput:
        async with engine_client(engine_kind, url, api_key=api_key,
                                 generate_timeout_s=timeout_s) as client:
            client.adapter = None if adapter is None else (adapter, 0)
            return await client.generate(prompt_ids, probe_sampling(temperature))

    out = asyncio.run(generate())
    return Probe(server_id=server_id, engine_url=url, prompt_ids=list(prompt_ids),
                 output_ids=list(out.output_ids), engine_logp=list(out.logprobs))


@torch.no_grad()
def trainer_logprobs(model: torch.nn.Module, prompt_ids: list[int], output_ids: list[int],
                     temperature: float,
                     device: torch.device) -> list[float]:
    """log pi(output token t | prompt, earlier outputs) under ``model`` with the trainer's
    convention."""
    from trainer.model import evaluating

    ids = torch.tensor([list(prompt_ids) + list(output_ids)], device=device)
    with evaluating(model):  # no dropout: the engine computes without
        logits = model(input_ids=ids).logits
    n_prompt = len(prompt_ids)
    picked = logits[:, n_prompt - 1:ids.shape[1] - 1]  # the logits that predicted each output token
    return token_logprobs(picked, ids[:, n_prompt:], temperature)[0].tolist()


def elsewhere(url: str, several_nodes: bool) -> str | None:
    """Why rank 0 cannot check the engine at ``url`` from here (module docstring), or None."""
    host = urllib.parse.urlsplit(url).hostname or ""
    loopback = host.startswith("127.") or host in ("localhost", "::1", "0.0.0.0", "::")
    if not several_nodes or not loopback:
        return None
    return (f"its URL {url} is a loopback address and launch.nodes > 1 puts the engines on other "
            "nodes than trainer rank 0: set rollout.engine.host to the engine node's address")


def unvouched(entry: RosterEntry, api_key: str | None) -> str | None:
    """Why the job's key may not go to ``entry``'s engine, or None: its sync port proved it holds
    the key and serves that engine (``ServerPort.vouch``; a roster URL is a member's word)."""
    if not entry.sync_url:
        return "no sync port in the roster vouches for its engine URL"

    async def ask() -> None:
        async with ServerPort(entry.sync_url, api_key=api_key) as port:
            await port.vouch(entry.server_id, entry.engine_url, PROBE_TIMEOUT_S)

    try:
        asyncio.run(ask())
    except EngineError as e:
        return f"its rollout server did not vouch for it ({e})"
    return None


def collect_probes(buffer: Client, served: Sequence[str], prompt_ids: list[int], temperature: float,
                   several_nodes: bool = False, api_key: str | None = None,
                   adapters: dict[str, str] | None = None,
                   engine_kind: str = "sglang") -> tuple[list[Probe], dict[str, str]]:
    """Rank 0: probe every roster engine in ``served`` (``adapters``: server id -> LoRA name); the
    probes and, per engine not probed, why it was NOT CHECKED."""
    members = roster(buffer, time.monotonic() + BUFFER_REQUEST_TIMEOUT_S).members
    probes, unchecked = [], {}
    for m in sorted(members, key=lambda m: m.server_id):
        if m.server_id not in served:
            log.warning("log-prob guard: %s does not serve the pushed weights yet; not probed",
                        m.server_id)
            continue
        try:
            why = elsewhere(m.engine_url, several_nodes) or (
                "the push's report names no adapter it loaded"
                if adapters is not None and m.server_id not in adapters else None) or \
                unvouched(m, api_key)
            if why is None:
                probe = probe_engine(m.server_id, m.engine_url, prompt_ids, temperature,
                                     api_key=api_key, engine_kind=engine_kind,
                                     adapter=None if adapters is None else adapters[m.server_id])
                why = None if probe.output_ids else "it generated no token"
        except (OSError, EngineError) as e:
            why = f"could not probe it at {m.engine_url} ({type(e).__name__}: {e})"
        if why is None:
            probes.append(probe)
        else:
            unchecked[m.server_id] = why
            log.warning("log-prob guard: engine %s NOT CHECKED: %s", m.server_id, why)
    return probes, unchecked


def run_guard(model: torch.nn.Module, device: torch.device, *, rank: int, buffer: Client | None,
              served: Sequence[str], prompt_ids: list[int], temperature: float, tol: float,
              several_nodes: bool = False, api_key: str | None = None,
              adapters: dict[str, str] | None = None,
              engine_kind: str = "sglang") -> tuple[list[str], dict[str, str]]:
    """All ranks: probe (rank 0), score (all), compare (rank 0), agree. The engines that passed,
    and those NOT CHECKED with the reason."""
    collected = collect_probes(buffer, served, prompt_ids, temperature, several_nodes, api_key,
                               adapters, engine_kind) \
        if rank == 0 else None
    probes, unchecked = from_rank0(collected)
    verdict: str | None = None
    for p in probes:  # every rank runs every forward: same count, same order
        mine = trainer_logprobs(model, p.prompt_ids, p.output_ids, temperature, device)
        mean, worst = compare_logprobs(p.engine_logp, mine)
        if rank == 0:
            log.info("log-prob guard: %s differs by %.2e per token (max %.2e)", p.server_id, mean,
                     worst)
            if not mean <= tol and verdict is None:  # nan too: nothing matched
                verdict = mismatch_message(p, mean, worst, tol, temperature)
    verdict = from_rank0(verdict)
    if verdict is not None:
        raise LogprobGuardError(verdict)
    return [p.server_id for p in probes], unchecked
