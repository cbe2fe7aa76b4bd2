"""What the real-engine tiers (tests/sglang, tests/vllm) share: the model they serve, its prompts
and tolerance, the check that an engine's log-probs are the trainer's, and the LoRA tests' adapter
model and disk-path push (``lora_model``, ``sync_adapter``, ``scored``), and the routing replay
checks (``routed_generations``, ``assert_routed_as_the_model``, ``run_routing_replay_job``).
Each tier's kit (``sglang_kit``, ``vllm_kit``) adds its engine's flags and how to start one."""

from __future__ import annotations

import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from areal_like.settings.config import LoraConfig, ModelConfig, WeightSyncConfig
from areal_like.weights.engine_sync import apply_adapter_sync
from areal_like.weights.hf import build_model
from areal_like.weights.lora import add_adapters
from areal_like.wire.protocol import WeightSyncPlan
from trainer.logprob_guard import trainer_logprobs
from trainer.weight_buckets import PushTensors
from trainer.weight_local import DiskSender
from trainer.weight_sync import SyncReport, push_buckets

# The quickstart's tiny Qwen2 (configs/model/tiny.yaml, char tokenizer), room for long generations.
MODEL = dict(
    vocab_size=104,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    dtype="float32",
)

PROMPTS = [[1, 20, 21, 22, 23], [1, 40, 41], [1, 60, 61, 62, 63, 64, 65]]
TOL = 1e-4  # float32 on both sides; the engine's CPU attention vs transformers' sdpa


def model_config(path: Path | str | None = None, **over) -> ModelConfig:
    return ModelConfig(**{**MODEL, **over}, path=str(path) if path else None)


def save_model(path: Path, init_seed: int = 0) -> Path:
    """A Hugging Face directory of the tiny model built with ``init_seed``, char tokenizer."""
    from areal_like.tasks.tokenizer import char_tokenizer
    from areal_like.weights.hf import build_model

    build_model(model_config(init_seed=init_seed)).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@dataclass
class Server:
    proc: object  # the engine's process (rollout_server.launch_sglang.SGLangProcess or a subclass)
    model_dir: Path
    api_key: str

    @property
    def url(self) -> str:
        return self.proc.url


def start(process_class, engine, model_dir: Path, log_path: Path, api_key: str | None = None
          ) -> Server:
    """An engine of ``process_class`` serving ``model_dir`` with ``engine``'s flags and ``api_key``,
    else a fresh key (hex: never starts with "-", launch_sglang.write_secrets)."""
    key = api_key or secrets.token_hex(16)
    proc = process_class(model_config(model_dir), engine, log_path=str(log_path), api_key=key)
    return Server(proc=proc.start(), model_dir=model_dir, api_key=key)


async def engine_logprobs(client, temperature: float, tokens: int = 24) -> list:
    """The engine's generations for ``PROMPTS`` (``tokens`` each, at ``temperature``)."""
    sp = {"max_new_tokens": tokens, "temperature": temperature, "top_p": 1.0, "top_k": -1,
          "ignore_eos": True}
    return [await client.generate(p, sp) for p in PROMPTS]


def assert_served(outs, model, temperature: float) -> None:
    """Every sampled token's engine log-prob is the trainer's for ``model`` at ``temperature``."""
    for prompt, out in zip(PROMPTS, outs):
        assert out.output_ids, f"no token for prompt {prompt}"
        mine = trainer_logprobs(model, prompt, out.output_ids, temperature, torch.device("cpu"))
        worst = max(abs(a - b) for a, b in zip(out.logprobs, mine))
        assert worst < TOL, f"engine and trainer differ by {worst:.2e} (prompt {prompt})"


def lora_model(lora: LoraConfig, seed: int | None, base: ModelConfig | None = None
               ) -> torch.nn.Module:
    """``base`` (default: the tiers' model, init seed 0) with ``lora``'s adapters: B from ``seed``
    (None: PEFT's zero B, the base itself), as a trained adapter would be."""
    model = add_adapters(build_model(base or model_config(init_seed=0)), lora)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


async def sync_adapter(client, model, version: int, pause_mode: str = "abort") -> str:
    """What a push of ``model`` as ``version`` gives a rollout server: the trainer's disk path
    (the adapter alone, staged and routed as ``WeightBroadcaster.push`` does), then the server's
    side of it; the directory is gone before the engine samples (the engine holds its own copy).
    Returns the plan's id."""
    params = PushTensors(model)
    buckets = push_buckets(params, "float32", bucket_mb=0.01)  # WeightBroadcaster.push's
    sender = DiskSender(WeightSyncConfig(path="disk"), "gloo", 0, "float32")
    sender.stage(model, params, buckets, SyncReport(version=version))
    try:
        plan = WeightSyncPlan(policy_version=version, buckets=buckets, backend="gloo",
                              plan_id=uuid.uuid4().hex[:12],
                              deadline_s=300, **sender.route(version, [("s", 1)]))
        assert len(buckets) == len(plan.payloads) == 1  # the whole adapter, bucket_mb or not
        done = await apply_adapter_sync(client, plan, "s", pause_mode=pause_mode)
    finally:
        sender.done()
        sender.close()
    assert not os.path.exists(plan.payloads[0])
    assert done.ok, done.reason
    assert await client.weight_version() == str(version)
    return plan.plan_id


def scored(outs, model, temperature: float) -> float:
    """The largest difference between the engine's log-probs for PROMPTS and ``model``'s."""
    return max(abs(a - b) for prompt, out in zip(PROMPTS, outs)
               for a, b in zip(out.logprobs, trainer_logprobs(model, prompt, out.output_ids,
                                                              temperature, torch.device("cpu"))))


async def routed_generations(client, tokens: int = 16) -> list:
    """The engine's generations for ``PROMPTS`` (``tokens`` each, sampled), with their routes."""
    sp = {"max_new_tokens": tokens, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
          "ignore_eos": True}
    return [await client.generate(p, sp) for p in PROMPTS]


def assert_routed_as_the_model(outs, model_dir: Path) -> None:
    """Each generation's routes are the experts a transformers forward of ``model_dir`` routes the
    same tokens to: every token the engine ran through the model (all but the last sampled one),
    every layer, in top-k order (both sides take torch.topk of the same fp32 router logits)."""
    import numpy as np

    from areal_like.weights.routing import recording

    model = build_model(ModelConfig(path=str(model_dir), dtype="float32",
                                    attn_implementation="sdpa")).eval()
    for prompt, out in zip(PROMPTS, outs):
        assert out.output_ids and out.routed_experts is not None, f"no routes for {prompt}"
        with torch.no_grad(), recording(model) as routes:
            model(torch.tensor([list(prompt) + out.output_ids[:-1]]))
        want = routes[0].numpy()  # [tokens, layers, top_k]
        got = np.frombuffer(out.routed_experts, "<i4")
        assert got.size == want.size, (got.size, want.shape)
        np.testing.assert_array_equal(got.reshape(want.shape), want)


def run_routing_replay_job(tmp_path: Path, topology: str, steps: int = 2) -> None:
    """``areal-like run`` of the quickstart on a tiny Qwen3-MoE with ``trainer.routing_replay`` on
    ``topology``'s engine: it completes, and no group was dropped as bad data (a trajectory
    without its routes is)."""
    import json
    import subprocess
    import sys

    from tests.families import save_family

    moe = save_family("qwen3_moe", tmp_path / "moe")
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "launch.cli", "run", "experiment=quickstart", f"topology={topology}",
         "warm_start.steps=0", f"model.path={moe}", "model.attn_implementation=sdpa",
         "trainer.routing_replay=true", f"trainer.steps={steps}", "eval.at_start=false",
         "eval.at_end=false", "launch.health_timeout_s=300", f"run_dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps_trained"] == steps
    reports = [json.loads(line) for line in (run_dir / "metrics" / "trainer.jsonl").open()
               if '"groups_dropped_bad_data"' in line]
    assert reports and all(r["groups_dropped_bad_data"] == 0 for r in reports)
