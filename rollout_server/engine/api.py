"""``/generate`` request parsing and response building in SGLang 0.5.23's shapes. A body is
checked by msgspec against the fields SGLang declares (ENGINE.md, "Request validation"); every
refusal is a 400 ``{"error": {"message": ...}}`` naming the field, the shape the project's client
reads.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import numpy as np
import torch

from rollout_server.engine.sampling import TOP_K_ALL, SamplingParams

MAX_FANOUT = 4096  # prompts x n of one /generate call
MAX_INT = 2**63  # sampling integers are int64 in torch


class ApiError(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(str(body))
        self.status, self.body = status, body


def value_error(message: str, status: int = 400) -> ApiError:
    return ApiError(status, {"error": {"message": message}})


def decode_body(raw: bytes, kind: type = dict, strict: bool = True) -> Any:
    """``raw`` JSON (empty: ``{}``) as ``kind`` (a msgspec Struct or dict); a 400 naming the field
    that is wrong (``$.sampling_params.top_k``), or saying why it is not JSON."""
    try:
        return msgspec.json.decode(raw.strip() or b"{}", type=kind, strict=strict)
    except (ValueError, RecursionError, msgspec.MsgspecError) as e:  # not UTF-8; nested too deeply
        raise value_error(f"invalid request body: {str(e) or type(e).__name__}") from None


class SamplingBody(msgspec.Struct, forbid_unknown_fields=True):
    """SGLang's ``sampling_params`` keys: a key it does not know is refused, naming it."""

    max_new_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int | None = None
    n: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    stream_interval: int | None = None
    logit_bias: dict | None = None
    sampling_seed: int | None = None
    custom_params: Any = None
    beam_width: int | None = None
    watermark: dict | None = None
    choice: list[str] | None = None


class GenerateBody(msgspec.Struct):
    """The ``/generate`` fields this engine reads (others are ignored, as SGLang ignores keys it
    does not declare)."""

    text: str | list[str] | None = None
    input_ids: list[int | list[int]] | None = None  # one prompt, or a batch of them
    sampling_params: SamplingBody | list[SamplingBody] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    token_ids_logprob: Any = None
    return_text_in_logprobs: bool | None = None
    stream: bool | None = None
    return_prompt_token_ids: bool | None = None
    # the experts each token was routed to (a mixture's; SGLang's, with its
    # --enable-return-routed-experts): meta_info["routed_experts"] when finished
    return_routed_experts: bool | None = None


# Known keys we do not implement: refused unless they carry SGLang's default (a no-op) value.
_UNSUPPORTED_DEFAULTS = {
    "stop": (None, "", []), "stop_regex": (None, "", []), "min_p": (None, 0.0),
    "frequency_penalty": (None, 0.0),
    "presence_penalty": (None, 0.0), "repetition_penalty": (None, 1.0), "min_new_tokens": (None, 0),
    "json_schema": (None,), "regex": (None,), "ebnf": (None,), "structural_tag": (None,),
    "logit_bias": (None, {}),
    "beam_width": (None, 1), "watermark": (None,), "choice": (None, []), "custom_params": (None,),
}


@dataclass(kw_only=True)
class GenerateInput:
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per prompt
    rids: list[str]  # one per prompt
    n: int
    return_logprob: list[bool]  # one per prompt
    text_in_logprobs: bool
    is_single: bool  # one prompt and n == 1 -> one JSON object, else a JSON array
    stream: bool  # server-sent events, one cumulative chunk per new token, then "data: [DONE]"
    prompt_ids_out: bool = False  # return_prompt_token_ids: echo the (tokenized) prompt
    routed_experts: bool = False  # return_routed_experts
    # per prompt: logprob_start_len, where its input token logprobs start (None: none asked for)
    logprob_starts: list[int | None] | None = None


def max_text_chars(tokenizer, context_len: int) -> int:
    """The longest ``text`` that could still fit the context: no token covers more characters than
    its longest vocabulary entry. A longer one is refused before tokenizing (ENGINE.md)."""
    return context_len * max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))


def parse_generate(body: GenerateBody | dict, tokenizer, vocab_size: int, context_len: int,
                   max_chars: int) -> GenerateInput:
    """Validate a ``/generate`` body (decoded, or a dict from an in-process caller); raises
    ApiError (a 400 naming what is wrong)."""
    try:
        b = body if isinstance(body, GenerateBody) else msgspec.convert(body, GenerateBody)
    except msgspec.ValidationError as e:
        raise value_error(f"invalid request body: {e}") from None
    if (b.text is None) == (b.input_ids is None):
        raise value_error("Either text, input_ids or input_embeds should be provided.")
    if b.text is not None:
        is_batch = isinstance(b.text, list)
        for t in b.text if is_batch else [b.text]:
            if len(t) > max_chars:
                raise value_error(
                    f"The input text ({len(t)} characters) is longer than the model's context "
                    f"length ({context_len} tokens) can hold (at most {max_chars} characters).")
        prompts = [tokenizer.encode(t) for t in (b.text if is_batch else [b.text])]
    else:
        is_batch = bool(b.input_ids) and isinstance(b.input_ids[0], list)
        if any(isinstance(p, list) != is_batch for p in b.input_ids):
            raise value_error("input_ids: a list of integers or a list of lists of integers, "
                              "not both")
        prompts = [list(p) for p in (b.input_ids if is_batch else [b.input_ids])]
    for p in prompts:
        _check_prompt(p, vocab_size, context_len)
    sps = [msgspec.structs.asdict(sp) if sp is not None else {}
           for sp in _per_prompt(b.sampling_params, len(prompts), "sampling_params")]
    params = [_to_params(sp, vocab_size) for sp in sps]
    ns = {int(sp.get("n") or 1) for sp in sps}
    if len(ns) != 1:
        raise value_error("The parallel_sample_num should be the same for all samples in sample "
                          "params.")
    n = ns.pop()
    if n < 1:
        raise value_error(f"n must be at least 1, got {n}.")
    # each (prompt, sample) is a Request held in memory until answered
    if n * len(prompts) > MAX_FANOUT:
        raise value_error(f"{len(prompts)} prompts x n={n} is over {MAX_FANOUT} sequences in one "
                          "request.")
    rids = b.rid if isinstance(b.rid, list) else [b.rid or uuid.uuid4().hex] if not is_batch \
        else [uuid.uuid4().hex for _ in prompts]
    if len(rids) != len(prompts):
        raise value_error("The rid should be a list with the same length as the batch.")
    return_logprob = [bool(x) for x in _per_prompt(b.return_logprob or False, len(prompts),
                                                   "return_logprob")]
    for v in _per_prompt(b.top_logprobs_num, len(prompts), "top_logprobs_num"):
        if v is not None and v >= 1:
            raise value_error(f"top_logprobs_num={v} is not supported by the embedded engine")
    starts = [_input_logprob_start(v, p, sp, lp) for v, p, sp, lp in zip(
        _per_prompt(b.logprob_start_len, len(prompts), "logprob_start_len"), params, sps,
        return_logprob)]
    if b.token_ids_logprob:
        raise value_error("token_ids_logprob is not supported by the embedded engine")
    return GenerateInput(prompts=prompts, params=params, rids=[str(r) for r in rids], n=n,
                         return_logprob=return_logprob,
                         text_in_logprobs=bool(b.return_text_in_logprobs),
                         is_single=not is_batch and n == 1, stream=bool(b.stream),
                         prompt_ids_out=bool(b.return_prompt_token_ids),
                         routed_experts=bool(b.return_routed_experts), logprob_starts=starts)


def _input_logprob_start(start: int | None, params: SamplingParams, sp: dict,
                         return_logprob: bool) -> int | None:
    """Where a prompt's input token log-probs start (SGLang's ``logprob_start_len``); None: none
    asked for (the default -1). Served only for a request that generates nothing
    (``max_new_tokens`` 0, a teacher's scoring: ENGINE.md)."""
    if start is None or start < 0 or not return_logprob:
        return None
    if sp.get("max_new_tokens") != 0:
        raise value_error(f"logprob_start_len={start} is served by the embedded engine only with "
                          "max_new_tokens=0 (input token logprobs of a request that generates "
                          "nothing)")
    return start


def _per_prompt(v: Any, count: int, key: str) -> list:
    if isinstance(v, list):
        if len(v) != count:
            raise value_error(f"{key} has {len(v)} entries for a batch of {count}")
        return v
    return [v] * count


def _check_prompt(p: list[int], vocab_size: int, context_len: int) -> None:
    if not p:
        raise value_error("input_ids cannot be empty.")
    bad = [t for t in p if not 0 <= t < vocab_size]
    if bad:
        raise value_error(f"Token id {bad[0]} is out of vocabulary (vocab size {vocab_size}).")
    if len(p) >= context_len:
        raise value_error(f"The input ({len(p)} tokens) is longer than the model's context length "
                          f"({context_len} tokens).")


def _to_params(sp: dict, vocab_size: int) -> SamplingParams:
    for key, defaults in _UNSUPPORTED_DEFAULTS.items():
        if sp.get(key) not in defaults:
            raise value_error(f"sampling_params.{key}={sp[key]!r} is not supported by the "
                              "embedded engine")
    # JSON null = the default, as in SGLang
    get = lambda k, d: d if sp.get(k) is None else sp[k]  # noqa: E731
    for key in ("max_new_tokens", "top_k", "sampling_seed", *("temperature", "top_p")):
        v = sp.get(key)  # JSON ints are unbounded: refuse what no tensor or float can hold
        if v is not None and not -MAX_INT < v < MAX_INT:
            raise value_error(f"sampling_params.{key}={v} is out of range (|value| < 2**63).")
    for t in sp.get("stop_token_ids") or ():
        if not 0 <= t < vocab_size:
            raise value_error(f"sampling_params.stop_token_ids: {t} is out of vocabulary "
                              f"(vocab size {vocab_size}).")
    seed = sp.get("sampling_seed")
    if seed is not None and seed < 0:
        raise value_error(f"sampling_params.sampling_seed must be >= 0, got {seed}.")
    temperature, top_p, top_k = (float(get("temperature", 1.0)), float(get("top_p", 1.0)),
                                 int(get("top_k", TOP_K_ALL)))
    max_new = int(get("max_new_tokens", 128))
    if not (temperature >= 0.0 and temperature != float("inf")):
        raise value_error(f"temperature must be a non-negative finite number, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise value_error(f"top_p must be in (0, 1], got {top_p}.")
    if top_k < 1 and top_k != -1:
        raise value_error(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if max_new < 0:
        raise value_error(f"max_new_tokens must be at least 0, got {max_new}.")
    stop_ids = [int(t) for t in get("stop_token_ids", [])]
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                          top_k=TOP_K_ALL if top_k == -1 else top_k, stop_token_ids=stop_ids,
                          ignore_eos=bool(get("ignore_eos", False)),
                          skip_special_tokens=bool(get("skip_special_tokens", True)),
                          sampling_seed=sp.get("sampling_seed"))


def build_output(req, tokenizer, *, return_logprob: bool,
                 text_in_logprobs: bool, default_version: str,
                 finished: bool = True, prompt_ids: bool = False) -> dict:
    """One SGLang ``/generate`` result object for a scheduler Request; ``finished=False``: a
    streaming chunk (cumulative outputs so far). It reads the request while the scheduler thread
    appends to it: the lists only grow and ``output_versions`` grows last (a consistent cut)."""
    n = len(req.output_versions)
    ids, logps, versions = req.output_ids[:n], req.output_logprobs[:n], req.output_versions[:n]
    meta: dict[str, Any] = {
        "id": req.rid, "finish_reason": req.finish_reason if finished else None,
        "prompt_tokens": len(req.input_ids),
        "weight_version": versions[-1] if versions else default_version, "reasoning_tokens": 0,
        "completion_tokens": n, "cached_tokens": 0,
    }
    if finished:
        meta["e2e_latency"] = req.finished_at - req.created
    spans = _version_spans(versions)
    if len(spans) > 1:  # the request ran under several weight versions (pause in_place / retract)
        meta["weight_versions"] = spans
    if return_logprob:
        texts = [tokenizer.decode([t]) for t in ids] if text_in_logprobs else [None] * n
        meta["output_token_logprobs"] = [[lp, t, s] for lp, t, s in zip(logps, ids, texts)]
    if return_logprob and req.input_logprobs is not None:  # as SGLang's: the first token has none
        start = req.input_logprob_start
        meta["input_token_logprobs"] = [[lp, t, None] for lp, t in zip(
            req.input_logprobs, req.input_ids[start:])]
    text = tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)
    out = {"text": text, "output_ids": ids, "meta_info": meta}
    if prompt_ids:
        out["prompt_token_ids"] = list(req.input_ids)
    if finished and req.routes is not None:  # as SGLang: base64 of int32 [P + O - 1, layers, k]
        routes = torch.cat(req.routes)[:len(req.input_ids) + n - 1] if req.routes else []
        meta["routed_experts"] = base64.b64encode(
            np.asarray(torch.as_tensor(routes).cpu(), dtype="<i4").tobytes()).decode()
    return out


def _version_spans(versions: list[str]) -> list[dict]:
    spans: list[dict] = []
    for i, v in enumerate(versions):
        if spans and spans[-1]["version"] == v:
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": v, "start": i, "end": i + 1})
    return spans


Selector = Literal["target", "draft", "all"]


class AbortBody(msgspec.Struct):
    rid: str = ""
    abort_all: bool = False
    abort_message: str | None = None


class PauseBody(msgspec.Struct):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueBody(msgspec.Struct):
    torch_empty_cache: bool = True


class WeightsByNameBody(msgspec.Struct):
    name: str
    truncate_size: int = 100


class InitGroupBody(msgspec.Struct):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class GroupBody(msgspec.Struct):
    group_name: str = "weight_update_group"


class BeginBody(msgspec.Struct):
    selector: Selector = "all"


class LoadBody(msgspec.Struct, kw_only=True):
    """The keys every ``update_weights_from_*`` endpoint takes."""

    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    flush_cache: bool = True


class DistributedBody(LoadBody, kw_only=True):
    names: list
    dtypes: list
    shapes: list
    group_name: str = "weight_update_group"
    selector: Selector = "all"
    torch_empty_cache: bool = False


class DiskBody(LoadBody, kw_only=True):
    model_path: str


class TensorBody(LoadBody, kw_only=True):
    serialized_named_tensors: list
    torch_empty_cache: bool = False
