"""The engine client for SGLang's server protocol (pinned: SGLang 0.5.23), one implementation of
``EngineClient`` (``client.py``: the interface, the transport and its invariants).

The only module that knows SGLang's request and response shapes (SGLang defines them in
``entrypoints/http_server.py`` and ``managers/io_struct.py``; ``parse_generate_output`` reads
``/generate``'s). It drives a real ``sglang.launch_server`` and the embedded engine alike; with
``local`` (an ``EmbeddedEngine`` in this process) ``/generate`` goes to its ``generate_local``,
errors mapped alike, never retried. One method per endpoint; every call has a timeout.

Invariants (beyond ``EngineClient``'s):
* ``/begin_weight_update``/``/end_weight_update``: a server answering 404 predates them; the
  client remembers it (``weight_session_supported = False``) and skips both from then on;
* a generate still running at its timeout is aborted by its ``rid``s: the tokens it made come back
  as an abort's (``finish_reason`` abort, resubmitted by ``rollout_server/episode.py``), so a
  request that waited out weight syncs in the engine (``pause_mode=retract``) loses nothing. One
  that made no token in that time, or whose abort is not answered within ``ABORT_GRACE_S``, is a
  timeout error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import uuid
from typing import Any

from areal_like.engines.client import (
    EngineClient,
    EngineError,
    GenerateOutput,
    error_message,
    generate_answer_bytes,
    ok,
)

ABORT_GRACE_S = 30.0  # a generate aborted at its timeout: how long its partial answer may take


def parse_generate_output(body: Any) -> GenerateOutput:
    """Turn one ``/generate`` response object into a GenerateOutput. Raises EngineError on a
    shape we do not understand (never a KeyError deep in the caller)."""
    try:
        meta = body["meta_info"]
        entries = meta.get("output_token_logprobs") or []
        ids = [int(e[1]) for e in entries]
        logprobs = [float(e[0]) for e in entries]
        if "output_ids" in body and body["output_ids"] is not None and not entries:
            ids = [int(t) for t in body["output_ids"]]
        if "output_ids" in body and entries and list(body["output_ids"]) != ids:
            raise ValueError("output_ids disagree with output_token_logprobs")
        fr = meta.get("finish_reason") or {}
        kind = fr.get("type", "") if isinstance(fr, dict) else str(fr)
        if kind not in ("stop", "length", "abort"):
            raise ValueError(f"unknown finish_reason {fr!r}")
        message = str(fr.get("message") or fr.get("matched") or "") if isinstance(fr, dict) else ""
        spans = [(str(s["version"]), int(s["start"]), int(s["end"]))
                 for s in meta.get("weight_versions") or []]
        version = meta.get("weight_version")
        return GenerateOutput(
            rid=str(meta.get("id", "")), output_ids=ids, logprobs=logprobs, finish_reason=kind,
            finish_message=message,
            abort_status=fr.get("status_code") if isinstance(fr, dict) else None,
            weight_version=None if version is None else str(version), weight_spans=spans,
            routed_experts=None if meta.get("routed_experts") is None
            else base64.b64decode(meta["routed_experts"], validate=True))
    except (KeyError, TypeError, ValueError, IndexError, binascii.Error) as e:
        raise EngineError("/generate", 200, f"unexpected response shape: {type(e).__name__}: {e}",
                          from_peer=True) from None


class SGLangClient(EngineClient):
    """``EngineClient`` for one SGLang server, or the embedded engine (``local``)."""

    weight_session_supported: bool | None = None  # None: not probed yet

    async def _post_generate(self, body: dict, timeout_s: float, *, idempotent: bool) -> Any:
        """The parsed answer of ``POST /generate``: over HTTP, or from ``local`` (an engine in
        this process) without it, errors mapped alike."""
        limit = generate_answer_bytes(body)
        if self.local is None:
            return (await self._call("POST", "/generate", body, timeout_s=timeout_s,
                                     idempotent=idempotent, limit=limit))[1]
        if self.on_request is not None:
            self.on_request("POST", "/generate", body)
        try:
            status, parsed = await asyncio.wait_for(self.local.generate_local(body),
                                                    max(1e-3, timeout_s))
        except asyncio.TimeoutError:
            raise EngineError("/generate", None, "TimeoutError: no answer in time") from None
        except OSError as e:
            # the engine is not up (or stopped meanwhile): as an unreachable server
            raise EngineError("/generate", None, f"connection failed: {e}") from None
        if self.on_response is not None:
            self.on_response("POST", "/generate", status, parsed, "")
        if not ok(status, parsed):
            raise EngineError("/generate", status, error_message(parsed, ""), from_peer=True)
        return parsed

    # ------------------------------------------------------------------ generation
    async def _generate(self, body: dict, n: int, timeout_s: float | None) -> list[GenerateOutput]:
        """``POST /generate`` of ``body`` (``n`` prompts, 0: a single one) under the adapter
        generate calls name now (``_naming_adapter``), asking for the routed experts with
        ``routed_experts``."""
        if self.routed_experts:
            body["return_routed_experts"] = True
        with self._naming_adapter() as named:
            if named is not None:
                body["lora_path"] = [named[0]] * n if n else named[0]
            out = await self._generate_or_abort(body, n, timeout_s or self.generate_timeout_s)
        if not n and isinstance(out, list):
            raise EngineError("/generate", 200, "got a batch answer to a single request (n > 1?)")
        if n and (not isinstance(out, list) or len(out) != n):
            got = len(out) if isinstance(out, list) else 1
            raise EngineError("/generate", 200, f"a batch of {n} prompts got {got} answers")
        return [self._under(parse_generate_output(o), named) for o in (out if n else [out])]

    async def _generate_or_abort(self, body: dict, n: int, timeout_s: float) -> Any:
        """The parsed answer of ``POST /generate``; past ``timeout_s`` its requests are aborted and
        what they made is the answer (module docstring)."""
        if "rid" not in body:
            body["rid"] = [uuid.uuid4().hex for _ in range(n)] if n else uuid.uuid4().hex
        call = asyncio.ensure_future(self._post_generate(body, timeout_s + ABORT_GRACE_S,
                                                         idempotent=False))
        try:
            done, _ = await asyncio.wait({call}, timeout=timeout_s)
            if done:
                return await call
            # all at once, each bounded: an unanswered one leaves it to the call's own limit
            await asyncio.gather(*(self._abort_quietly(rid, ABORT_GRACE_S)
                                   for rid in (body["rid"] if n else [body["rid"]])))
            out = await call
        finally:
            call.cancel()
        if not any(parse_generate_output(o).output_ids
                   for o in (out if isinstance(out, list) else [out])):
            raise EngineError("/generate", None, f"TimeoutError: no token in {timeout_s:g} s")
        return out

    async def _abort_quietly(self, rid: str, timeout_s: float) -> None:
        with contextlib.suppress(EngineError):
            await self.abort_request(rid, timeout_s=timeout_s)

    async def generate(self, input_ids: list[int], sampling_params: dict, *, rid: str | None = None,
                       timeout_s: float | None = None) -> GenerateOutput:
        """``POST /generate`` for one prompt and one sample (``n`` must be 1: a group's samples are
        requests of their own)."""
        body = {"input_ids": [int(t) for t in input_ids], "sampling_params": dict(sampling_params),
                "return_logprob": True, "stream": False}
        if rid is not None:
            body["rid"] = rid
        return (await self._generate(body, 0, timeout_s))[0]

    async def generate_batch(self, inputs: list[list[int]], sampling_params: list[dict], *,
                             timeout_s: float | None = None) -> list[GenerateOutput]:
        """``POST /generate`` with a batch: one sample per prompt of ``inputs`` (their own sampling
        params, ``n`` 1), answered in order in one response."""
        body = {"input_ids": [[int(t) for t in p] for p in inputs],
                "sampling_params": [dict(p) for p in sampling_params], "return_logprob": True,
                "stream": False}
        return await self._generate(body, len(inputs), timeout_s)

    async def input_logprobs(self, inputs: list[list[int]], starts: list[int], *,
                             timeout_s: float | None = None) -> list[list[float]]:
        """``POST /generate`` generating nothing (``max_new_tokens`` 0) with
        ``logprob_start_len`` one before ``starts[i]`` (SGLang's entry there is None), read from
        SGLang's ``input_token_logprobs``."""
        body = {"input_ids": [[int(t) for t in p] for p in inputs],
                "sampling_params": [{"max_new_tokens": 0, "temperature": 1.0} for _ in inputs],
                "return_logprob": True, "logprob_start_len": [int(s) - 1 for s in starts],
                "stream": False}
        out = await self._post_generate(body, timeout_s or self.generate_timeout_s,
                                        idempotent=True)
        if not isinstance(out, list) or len(out) != len(inputs):
            raise EngineError("/generate", 200, f"a batch of {len(inputs)} inputs got another "
                              "answer")
        values = []
        for o, p, start in zip(out, inputs, starts):
            entries = ((o or {}).get("meta_info") or {}).get("input_token_logprobs") or []
            got = [e[0] for e in entries[-(len(p) - start):]] if len(p) > start else []
            if len(got) != len(p) - start or any(not isinstance(v, int | float) for v in got):
                raise EngineError("/generate", 200, f"input_token_logprobs: {len(entries)} "
                                  f"entries for {len(p) - start} tokens")
            values.append([float(v) for v in got])
        return values

    async def abort_request(self, rid: str = "", *, abort_all: bool = False,
                            timeout_s: float | None = None) -> None:
        await self._call("POST", "/abort_request", {"rid": rid, "abort_all": abort_all},
                         idempotent=True, timeout_s=timeout_s)

    # ------------------------------------------------------------------ health and info
    async def health_generate(self, timeout_s: float = 30.0) -> None:
        await self._call("GET", "/health_generate", timeout_s=timeout_s, idempotent=True)

    async def model_info(self) -> dict:
        return (await self._call("GET", "/model_info", idempotent=True))[1]

    async def server_info(self) -> dict:
        return (await self._call("GET", "/server_info", idempotent=True))[1]

    async def loads(self) -> list[dict]:
        """``GET /v1/loads?include=core``: one entry per DP rank (``num_running_reqs``,
        ``num_waiting_reqs``, ``num_used_tokens``, ...). SGLang only (not the embedded engine)."""
        query = {"include": "core"}
        body = (await self._call("GET", "/v1/loads", idempotent=True, params=query))[1]
        return list(body.get("loads") or []) if isinstance(body, dict) else []

    async def weight_version(self) -> str | None:
        """The version the server serves, from ``/model_info`` (0.5.23 has no /weight_version)."""
        v = (await self.model_info()).get("weight_version")
        return None if v is None else str(v)

    # ------------------------------------------------------------------ pause, continue
    async def pause_generation(self, mode: str = "abort", *,
                               timeout_s: float | None = None) -> None:
        await self._call("POST", "/pause_generation", {"mode": mode}, timeout_s=timeout_s,
                         idempotent=True)

    async def continue_generation(self, *, timeout_s: float | None = None) -> None:
        await self._call("POST", "/continue_generation", {}, timeout_s=timeout_s, idempotent=True)

    # ------------------------------------------------------------------ weight updates
    async def init_weights_update_group(self, *, master_address: str, master_port: int,
                                        rank_offset: int,
                                        world_size: int, group_name: str, backend: str,
                                        timeout_s: float | None = None) -> None:
        body = {"master_address": master_address, "master_port": int(master_port),
                "rank_offset": int(rank_offset),
                "world_size": int(world_size), "group_name": group_name, "backend": backend}
        await self._call("POST", "/init_weights_update_group", body, timeout_s=timeout_s,
                         idempotent=False)

    async def destroy_weights_update_group(self, group_name: str, *,
                                           timeout_s: float | None = None) -> None:
        await self._call("POST", "/destroy_weights_update_group", {"group_name": group_name},
                         timeout_s=timeout_s, idempotent=True)

    async def begin_weight_update(self, *, timeout_s: float | None = None) -> bool:
        return await self._weight_session("/begin_weight_update", {"selector": "all"}, timeout_s)

    async def end_weight_update(self, *, timeout_s: float | None = None) -> bool:
        return await self._weight_session("/end_weight_update", {}, timeout_s)

    async def _weight_session(self, path: str, body: dict, timeout_s: float | None) -> bool:
        if self.weight_session_supported is False:
            return False
        try:
            await self._call("POST", path, body, timeout_s=timeout_s, idempotent=False)
        except EngineError as e:
            if e.status == 404:  # an SGLang release before weight-update sessions
                self.weight_session_supported = False
                return False
            raise
        self.weight_session_supported = True
        return True

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str],
                                              shapes: list[list[int]], group_name: str,
                                              weight_version: str | None, flush_cache: bool,
                                              load_format: str | None = None,
                                              timeout_s: float | None = None) -> None:
        body = {"names": list(names), "dtypes": list(dtypes),
                "shapes": [list(map(int, s)) for s in shapes], "group_name": group_name,
                "flush_cache": flush_cache, "weight_version": weight_version,
                "load_format": load_format}
        await self._load("/update_weights_from_distributed", body, timeout_s)

    async def update_weights_from_tensor(self, serialized_named_tensors: list[str], *,
                                         load_format: str | None = None, flush_cache: bool = True,
                                         weight_version: str | None = None,
                                         timeout_s: float | None = None) -> None:
        body = {"serialized_named_tensors": list(serialized_named_tensors),
                "flush_cache": flush_cache, "weight_version": weight_version}
        await self._load("/update_weights_from_tensor", body, timeout_s, load_format=load_format)

    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       timeout_s: float | None = None) -> None:
        body = {"model_path": model_path, "weight_version": weight_version}
        await self._load("/update_weights_from_disk", body, timeout_s)

    async def _load(self, path: str, body: dict, timeout_s: float | None, **always) -> None:
        """A weight update: ``body`` without its None values (SGLang's defaults), plus
        ``always`` as given."""
        body = {k: v for k, v in body.items() if v is not None} | always
        await self._call("POST", path, body, timeout_s=timeout_s, idempotent=False)

    # ------------------------------------------------------------------ LoRA adapters
    async def load_lora_adapter(self, name: str, path: str, *, timeout_s: float | None = None
                                ) -> None:
        """SGLang reads the adapter on every TP rank itself."""
        await self._call("POST", "/load_lora_adapter", {"lora_name": name, "lora_path": path},
                         timeout_s=timeout_s, idempotent=False)

    async def unload_lora_adapter(self, name: str, *, timeout_s: float | None = None) -> None:
        """Unload adapter ``name``; returns once no admitted request uses it (SGLang waits for
        them holding its LoRA lock, so loads wait too); 400 if SGLang has no adapter so named."""
        await self._call("POST", "/unload_lora_adapter", {"lora_name": name}, timeout_s=timeout_s,
                         idempotent=False)

    async def update_weight_version(self, version: str, *, timeout_s: float | None = None) -> None:
        body = {"new_version": version, "abort_all_requests": False}
        await self._call("POST", "/update_weight_version", body, timeout_s=timeout_s,
                         idempotent=True)
