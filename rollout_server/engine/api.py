"""``/generate`` request parsing and response building with SGLang 0.5.23's shapes and error bodies,
judged in SGLang's three stages (ENGINE.md, "Request validation"): body parsing (pydantic's
``{"object": "error", ...}``), the JSON contract (``{"error": "<serde-style text>"}``), semantic
checks (``{"error": {"message": ...}}``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from rollout_server.engine.sampling import TOP_K_ALL, SamplingParams

MAX_FANOUT = 4096  # prompts x n of one /generate call
MAX_INT = 2**63  # sampling integers are int64 in torch


class ApiError(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(str(body))
        self.status, self.body = status, body


def validation_error(message: str) -> ApiError:
    return ApiError(400, {"object": "error", "message": message, "type": "Bad Request",
                          "param": None, "code": 400})


def contract_error(text: str) -> ApiError:
    return ApiError(400, {"error": text})


def value_error(message: str, status: int = 400) -> ApiError:
    return ApiError(status, {"error": {"message": message}})


# ---- stage 2 helpers: serde's wording, so both the Rust and Python SGLang servers read the same
def _unexpected(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v}"'
    return "sequence" if isinstance(v, list) else "map" if isinstance(v, dict) else type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(ok: bool, v: Any, expected: str) -> None:
    if not ok:
        raise contract_error(f"invalid type: {_unexpected(v)}, expected {expected}")


_INT, _NUM, _BOOL, _STR = "i64", "f64", "a boolean", "a string"
# sampling_params key -> expected kind, in SGLang's field order (the error text lists them)
_SP_TYPES = {
    "max_new_tokens": _INT, "stop": "str_or_list", "stop_token_ids": "int_list",
    "stop_regex": "str_or_list",
    "temperature": _NUM, "top_p": _NUM, "top_k": _INT, "min_p": _NUM, "frequency_penalty": _NUM,
    "presence_penalty": _NUM, "repetition_penalty": _NUM, "min_new_tokens": _INT, "n": _INT,
    "json_schema": _STR,
    "regex": _STR, "ebnf": _STR, "structural_tag": _STR, "ignore_eos": _BOOL,
    "skip_special_tokens": _BOOL,
    "spaces_between_special_tokens": _BOOL, "no_stop_trim": _BOOL, "stream_interval": _INT,
    "logit_bias": "map",
    "sampling_seed": _INT, "custom_params": "any", "beam_width": _INT, "watermark": "map",
    "choice": "str_list",
}
# Known keys we do not implement: refused unless they carry SGLang's default (a no-op) value.
_UNSUPPORTED_DEFAULTS = {
    "stop": (None, "", []), "stop_regex": (None, "", []), "min_p": (None, 0.0),
    "frequency_penalty": (None, 0.0),
    "presence_penalty": (None, 0.0), "repetition_penalty": (None, 1.0), "min_new_tokens": (None, 0),
    "json_schema": (None,), "regex": (None,), "ebnf": (None,), "structural_tag": (None,),
    "logit_bias": (None, {}),
    "beam_width": (None, 1), "watermark": (None,), "choice": (None, []), "custom_params": (None,),
}


_IS = {_INT: _is_int, _NUM: lambda v: _is_int(v) or isinstance(v, float),
       _BOOL: lambda v: isinstance(v, bool), _STR: lambda v: isinstance(v, str)}


def _check_value(v: Any, kind: str) -> None:
    if v is None or kind == "any":
        return
    if kind in _IS:
        _check(_IS[kind](v), v, kind)
    elif kind == "map":
        _check(isinstance(v, dict), v, "a map")
    elif kind == "str_or_list" and not isinstance(v, list):
        _check(isinstance(v, str), v, "a value or an array of values for StringOrList")
    else:  # a list: int_list, str_list, or str_or_list given as a list
        _check(isinstance(v, list), v, "a sequence")
        item = _INT if kind == "int_list" else _STR
        for e in v:
            _check(_IS[item](e), e, item)


def _contract_sampling_params(sp: Any) -> None:
    _check(isinstance(sp, dict), sp, "struct SamplingParams")
    for key, v in sp.items():
        if key not in _SP_TYPES:
            listed = ", ".join(f"`{f}`" for f in _SP_TYPES)
            raise contract_error(f"unknown field `{key}`, expected one of {listed}")
        _check_value(v, _SP_TYPES[key])


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


def max_text_chars(tokenizer, context_len: int) -> int:
    """The longest ``text`` that could still fit the context: no token covers more characters than
    its longest vocabulary entry. A longer one is refused before tokenizing (ENGINE.md)."""
    return context_len * max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))


def parse_generate(body: Any, tokenizer, vocab_size: int, context_len: int,
                   max_chars: int) -> GenerateInput:
    """Validate a decoded ``/generate`` body; raises ApiError with SGLang's status and body."""
    if not isinstance(body, dict):
        raise validation_error(f"[{{'type': 'dataclass_type', 'loc': ('body',), "
                               f"'msg': 'Input should be a dictionary or an instance of "
                               f"GenerateReqInput', 'input': {body!r}}}]")
    _stage1(body)
    _stage2(body)
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise value_error("Either text, input_ids or input_embeds should be provided.")
    if text is not None:
        is_batch = isinstance(text, list)
        for t in text if is_batch else [text]:
            if len(t) > max_chars:
                raise value_error(
                    f"The input text ({len(t)} characters) is longer than the model's context "
                    f"length ({context_len} tokens) can hold (at most {max_chars} characters).")
        prompts = [tokenizer.encode(t) for t in (text if is_batch else [text])]
    else:
        is_batch = bool(input_ids) and isinstance(input_ids[0], list)
        prompts = [list(p) for p in (input_ids if is_batch else [input_ids])]
    for p in prompts:
        _check_prompt(p, vocab_size, context_len)
    sps = _per_prompt(body.get("sampling_params") or {}, len(prompts), "sampling_params")
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
    rid = body.get("rid")
    rids = rid if isinstance(rid, list) else [rid or uuid.uuid4().hex] if not is_batch else \
        [uuid.uuid4().hex for _ in prompts]
    if len(rids) != len(prompts):
        raise value_error("The rid should be a list with the same length as the batch.")
    rl = body.get("return_logprob") or False
    return_logprob = [bool(x) for x in _per_prompt(rl, len(prompts), "return_logprob")]
    for key, lowest in (("logprob_start_len", 0), ("top_logprobs_num", 1)):  # lowest refused
        for v in _per_prompt(body.get(key), len(prompts), key):
            if v is not None and v >= lowest:
                raise value_error(f"{key}={v} is not supported by the embedded engine "
                                  "(output token logprobs only)")
    if body.get("token_ids_logprob"):
        raise value_error("token_ids_logprob is not supported by the embedded engine")
    return GenerateInput(prompts=prompts, params=params, rids=[str(r) for r in rids], n=n,
                         return_logprob=return_logprob,
                         text_in_logprobs=bool(body.get("return_text_in_logprobs")),
                         is_single=not is_batch and n == 1, stream=bool(body.get("stream")),
                         prompt_ids_out=bool(body.get("return_prompt_token_ids")))


def _stage1(body: dict) -> None:
    def bad(field: str, msg: str):
        raise validation_error(f"[{{'type': 'value_error', 'loc': ('body', '{field}'), "
                               f"'msg': '{msg}', "
                               f"'input': {body[field]!r}}}]")
    text, ids, sp, rid = (body.get(k) for k in ("text", "input_ids", "sampling_params", "rid"))
    if text is not None and not (isinstance(text, str) or (isinstance(text, list)
                                                           and all(isinstance(t, str)
                                                                   for t in text))):
        bad("text", "Input should be a valid string or a list of strings")
    if ids is not None:
        flat = isinstance(ids, list) and all(_is_int(t) for t in ids)
        nested = isinstance(ids, list) and bool(ids) and all(
            isinstance(p, list) and all(_is_int(t) for t in p) for p in ids)
        if not (flat or nested):
            bad("input_ids",
                "Input should be a valid list of integers or a list of lists of integers")
    if sp is not None and not (isinstance(sp, dict) or (isinstance(sp, list)
                                                        and all(isinstance(d, dict) for d in sp))):
        bad("sampling_params", "Input should be a valid dictionary or a list of dictionaries")
    if rid is not None and not (isinstance(rid, str) or (isinstance(rid, list)
                                                         and all(isinstance(r, str) for r in rid))):
        bad("rid", "Input should be a valid string or a list of strings")


def _stage2(body: dict) -> None:
    v = body.get("return_logprob")
    if isinstance(v, list):
        for e in v:
            _check(isinstance(e, bool), e, _BOOL)
    elif v is not None:
        _check(isinstance(v, bool), v, "a value or an array of values for BoolOrList")
    for key in ("stream", "return_text_in_logprobs", "return_prompt_token_ids"):
        if body.get(key) is not None:
            _check(isinstance(body[key], bool), body[key], _BOOL)
    for key in ("logprob_start_len", "top_logprobs_num"):
        v = body.get(key)
        for e in (v if isinstance(v, list) else [v] if v is not None else []):
            _check(_is_int(e), e, "a value or an array of values for Int64OrList")
    sp = body.get("sampling_params")
    for d in (sp if isinstance(sp, list) else [sp] if sp is not None else []):
        _contract_sampling_params(d)


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
    text = tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)
    out = {"text": text, "output_ids": ids, "meta_info": meta}
    if prompt_ids:
        out["prompt_token_ids"] = list(req.input_ids)
    return out


def _version_spans(versions: list[str]) -> list[dict]:
    spans: list[dict] = []
    for i, v in enumerate(versions):
        if spans and spans[-1]["version"] == v:
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": v, "start": i, "end": i + 1})
    return spans


REQUIRED = object()  # control_fields: a key the body must have


def control_fields(body: dict, spec: dict) -> dict:
    """Pydantic-lax parsing of a control body: defaults, required keys, int/float from numeric
    strings, Literal choices (a tuple); unknown keys are dropped. Errors -> 400 ErrorResponse
    shape."""
    out = {}
    for key, (kind, default) in spec.items():
        v = body.get(key, default)
        if v is REQUIRED:
            raise validation_error(f"[{{'type': 'missing', 'loc': ('body', '{key}'), "
                                   f"'msg': 'Field required'}}]")
        try:
            if v is None or kind is None:
                pass
            elif isinstance(kind, tuple):
                if v not in kind:
                    raise ValueError(f"Input should be {' or '.join(map(repr, kind))}")
            elif kind is bool:
                if not isinstance(v, bool):
                    raise ValueError("Input should be a valid boolean")
            elif kind in (int, float):
                if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                    raise ValueError("Input should be a valid "
                                     f"{'integer' if kind is int else 'number'}")
                v = kind(v)
            elif not isinstance(v, kind):
                raise ValueError(f"Input should be a valid {kind.__name__}")
        except (ValueError, OverflowError) as e:  # int(inf) overflows
            raise validation_error(f"[{{'type': 'value_error', 'loc': ('body', '{key}'), "
                                   f"'msg': '{e}', "
                                   f"'input': {v!r}}}]") from None
        out[key] = v
    return out
