"""The configuration schema: typed dataclasses, one per component, each validating itself.

``areal_like.settings.config`` composes ``configs/`` with Hydra into ``RunConfig``, building every
section below (``trainer.loss``'s: ``loss_schema.py``; ``eval``, ``export`` and ``tracking``'s:
``report_schema.py``): code past an entry point sees only checked values. A field's bounds are
declared on its type (``Annotated[int, at_least(1)]``) and checked by ``Section``
(``config_checks.py``); a section's ``__post_init__`` holds only the checks that relate two fields.
A check raises ``ConfigError`` naming the key; no Hydra or torch here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from areal_like.net.auth import ENGINE_KEY_ENV, REWARD_AUTH_ENV, SECRET_FIELD, url_credential
from areal_like.settings.config_checks import (
    DEVICE,
    DIRECTORY,
    PORT,
    WIRE_NAME,
    Bound,
    ConfigError,
    Section,
    above,
    at_least,
    one_of,
    within,
)
from areal_like.settings.config_checks import check as _check
from areal_like.settings.critic_schema import CriticConfig, model_keys
from areal_like.settings.distill_schema import DistillConfig
from areal_like.settings.loss_schema import ESTIMATORS, GROUP_BASELINE_KERNELS, LossConfig
from areal_like.settings.report_schema import TRACKERS, EvalConfig, ExportConfig, TrackingConfig
from areal_like.settings.reward_model_schema import RewardModelConfig

# SGLang flags rollout_server/launch_sglang.py sets itself, and where each comes from: one source
# of truth (the server polls the port it chose, the trainer trains model.path)
LAUNCHER_FLAGS = {"model_path": "model.path", "host": "rollout.engine.host",
                  "port": "rollout.engine.port", "weight_version": "the version served",
                  **dict.fromkeys(("tp_size", "tp", "tensor_parallel_size"),
                                  "rollout.engine.tp_size")}
# what rollout_server/launch_vllm.py sets on vLLM's command line
VLLM_LAUNCHER_FLAGS = {"model": "model.path", "host": "rollout.engine.host",
                       "port": "rollout.engine.port", "logprobs_mode": "the trainer's convention",
                       "weight_transfer_config": "the job's weight path",
                       "enable_scale_out": "the token ids in, token ids out route",
                       **dict.fromkeys(("tensor_parallel_size", "tp"), "rollout.engine.tp_size")}


def launcher_sets(sglang: dict, flags: dict[str, str], when: str = "",
                  engine: str = "sglang") -> None:
    """Refuse a pass-through of a flag the launcher sets itself (``flags``: each one's source);
    given twice, the engine's last one would win."""
    for key in sorted(set(sglang) & flags.keys()):
        raise ConfigError(f"rollout.engine.{engine}.{key} is not passed through{when}: the "
                          f"launcher sets it ({flags[key]})")


@dataclass(kw_only=True)
class ModelConfig(Section):
    """A local HF model (``path``) or a tiny Qwen2 built from the fields below."""

    key = "model"

    # a local HF directory, or a hub id (org/name) resolved once before any start
    path: str | None = None
    # model built from config: char | bpe (built from shipped text) | a local directory
    tokenizer: str = "char"
    # must cover the tokenizer; the char tokenizer has 104 tokens
    vocab_size: Annotated[int, above(0)] = 104
    # [model built from config only] the tiny Qwen2's shape (ignored with model.path): width of
    # the residual stream
    hidden_size: Annotated[int, above(0)] = 128
    intermediate_size: Annotated[int, above(0)] = 256  # [model built from config only] MLP width
    num_hidden_layers: Annotated[int, above(0)] = 2  # [model built from config only] decoder blocks
    num_attention_heads: Annotated[int, above(0)] = 4  # [model built from config only] query heads
    # [model built from config only] key/value heads (GQA)
    num_key_value_heads: Annotated[int, above(0)] = 2
    # [model built from config only] the longest sequence (prompt + response) the model takes
    max_position_embeddings: Annotated[int, above(0)] = 256
    # [model built from config only] lm_head shares the input embedding's weight
    tie_word_embeddings: bool = False
    # engines' weights; the trainer's compute dtype (fp32 master weights, fp32 grad reduce)
    dtype: Annotated[str, one_of("float32", "bfloat16", "float16")] = "float32"
    # transformers' attention implementation for the trainer and the embedded engine (sdpa, eager,
    # flash_attention_2, ...; sdpa: eager for a family without it, as GPT-OSS); SGLang picks its own
    attn_implementation: str = "sdpa"
    init_seed: int = 0  # [model built from config only] seed of its random initial weights

    def __post_init__(self):
        super().__post_init__()
        _check("model.num_attention_heads",
               self.num_attention_heads % self.num_key_value_heads == 0,
               "a multiple of model.num_key_value_heads", self.num_attention_heads)
        _check("model.hidden_size", self.hidden_size % self.num_attention_heads == 0,
               "a multiple of model.num_attention_heads", self.hidden_size)


@dataclass(kw_only=True)
class MixtureShape(ModelConfig):
    """Not a config section: the shape of a Qwen3-MoE checkpoint, read from its config.json for
    the memory estimate (launch/memory.py). Every block's MLP is a router [E, H] and
    ``num_experts`` experts of ``moe_intermediate_size`` I (fused ``gate_up_proj`` [E, 2I, H],
    ``down_proj`` [E, H, I]), ``num_experts_per_tok`` of them routed per token; attention of
    ``head_dim`` per head, q/k RMSNorms, no biases."""

    num_experts: Annotated[int, above(0)]
    num_experts_per_tok: Annotated[int, above(0)]
    moe_intermediate_size: Annotated[int, above(0)]
    head_dim: Annotated[int, above(0)]


@dataclass(kw_only=True)
class TaskConfig(Section):
    """What to train on: a shipped synthetic task or a dataset (``name=dataset``), and how it is
    scored."""

    key = "task"

    # addition | sort | reverse | countdown | calc, guess (with task.env) | dataset | verifiers (a
    # verifiers environment, task.env; rollout_server/AGENTS.md)
    name: Annotated[str, one_of("addition", "sort", "reverse", "countdown", "calc", "guess",
                                "dataset", "verifiers")] = "addition"
    # [task.name=dataset only] a local .jsonl, .json, .parquet or .csv file, a directory of
    # them or a save_to_disk directory (hub datasets are refused)
    dataset_path: str | None = None
    # [task.name=dataset only]
    eval_path: str | None = None  # the eval split; unset = eval_fraction of dataset_path held out
    # [task.name=dataset only]
    # held-out share of dataset_path when eval_path is unset (fixed seed)
    eval_fraction: Annotated[float, within(0, 1, "[)")] = 0.0
    # [task.name=dataset only]
    # the prompt column: plain text, or chat messages [{role, content}, ...] (TRL's
    # conversational format, told apart by the column's type) ...
    prompt_key: str = "prompt"
    # [task.name=dataset only]
    # ... or, when set, a column of chat messages; unset, a "messages" column is read when there
    # is no prompt column
    messages_key: str = ""
    # [task.name=dataset only]
    # the reference answer the reward grades against; "" = none (only with task.reward_fn)
    answer_key: str = "answer"
    # [task.name=dataset only]
    # extra columns passed to the reward; None = all the others
    metadata_keys: list[str] | None = None
    system_prompt: str = ""  # prepended as a system message (chat) or text (plain)
    # auto: plain prompts as text, chat rows through the tokenizer's template (TRL) | none: text
    # for both | Jinja text or a file of it, for both
    chat_template: str = "auto"
    # longer prompts are filtered out (and counted); 0 = no limit
    max_prompt_tokens: Annotated[int, at_least(0)] = 0
    # [synthetic and verifiers tasks]
    # size of a synthetic dataset (an epoch); a verifiers taskset without an end: its tasks loaded
    num_prompts: int = 100_000
    # [synthetic tasks only]
    digits: Annotated[int, within(1, 9)] = 2  # operand size / list length for synthetic tasks
    seed: int = 0  # synthetic prompts and the dataset's eval split are drawn from it
    group_size: Annotated[int, at_least(1)] = 8  # samples per prompt (GRPO "n")
    # longest response per sample (verl max_response_length)
    max_new_tokens: Annotated[int, at_least(1)] = 16
    # sampling temperature of training rollouts
    temperature: Annotated[float, above(0, " (sampling; greedy is not RL)")] = 1.0
    # nucleus sampling of training rollouts; 1 = off
    top_p: Annotated[float, within(0, 1, "(]")] = 1.0
    top_k: int = -1  # top-k sampling of training rollouts; -1 = off
    # dotted path "pkg.module:function", or a list of them summed with task.reward_weights; empty
    # = the task's own reward. Each is fn(response, example) -> float, or TRL's batched
    # fn(prompts, completions, **columns) -> list[float] when it has a `completions` parameter
    reward_fn: Annotated[Any, Bound("a dotted path or a non-empty list of distinct ones",
                                    lambda v: isinstance(v, str) or (
                                        isinstance(v, list) and len(v) == len(set(v)) > 0
                                        and all(isinstance(p, str) and p for p in v)))] = ""
    # one weight per task.reward_fn entry (the reward is their weighted sum); empty = all 1.0
    reward_weights: list[float] = field(default_factory=list)
    # per sample (a batched reward: per completion of its group); a reward past it is killed
    # and scored 0 with its reason
    reward_timeout_s: Annotated[float, above(0)] = 5.0
    # processes of the reward pool (per rollout server); 0: in-process, unsandboxed
    reward_workers: Annotated[int, at_least(0)] = 2
    # address-space limit of a reward worker; 0 = none
    reward_memory_mb: Annotated[int, at_least(0)] = 2048
    # remote reward: POST a batch of (prompt, response, metadata) here
    reward_url: Annotated[str, Bound("empty or an http(s) URL", lambda v: not v or v.startswith(
        ("http://", "https://")))] = ""
    # remote reward: retries after a failed or timed-out call
    reward_retries: Annotated[int, at_least(0)] = 2
    # a learned reward model scoring the responses (path empty: none); with the rule reward by
    # its weights (rollout_server/ROLLOUT.md, "Reward models")
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    # the longest reply a reward, tool or agent worker may send (MiB); a longer one is refused,
    # its sample scored 0 with the reason (kind "oversize") and the worker replaced
    worker_reply_mb: Annotated[int, at_least(1)] = 16
    # root's reward and tool workers keep the host's network (else none; a remote reward,
    # task.reward_url, is called by the rollout server and needs none; agents keep it)
    worker_network: bool = False
    # multi-turn episodes: "pkg.module:Class" of an environment (rollout_server/ROLLOUT.md) whose
    # step rewards replace the task's reward; empty = single-turn. With task.name=verifiers: the
    # verifiers taskset (an installed id or a module path)
    env: str = ""
    # [task.name=verifiers only]
    # the verifiers taskset's config fields
    env_args: dict[str, Any] = field(default_factory=dict)
    # [task.env or task.agent only]
    # assistant turns per episode; then it ends with finish_reason "max_turns"
    max_turns: Annotated[int, at_least(1)] = 8
    # prompt + every turn's tokens; past it the episode ends ("max_tokens")
    max_episode_tokens: Annotated[int, at_least(2)] = 1024
    # one assistant turn's generation (across weight-sync pauses): "turn_timeout"
    turn_timeout_s: Annotated[float, above(0)] = 120.0
    # the whole episode, tools and environment included: "episode_timeout"
    episode_timeout_s: Annotated[float, above(0)] = 600.0
    # [task.env only]
    # one tool call; past it the tool's worker is killed and the model sees an error
    tool_timeout_s: Annotated[float, above(0)] = 5.0
    # [task.env only]
    # processes that run tool calls (per rollout server)
    tool_workers: Annotated[int, at_least(1)] = 2
    # [task.env only]
    # address-space limit of a tool worker (sandboxed like rewards); 0 = none
    tool_memory_mb: Annotated[int, at_least(0)] = 2048
    # agent episodes: "pkg.module:run", run(client_base_url, api_key, example) -> float talking to
    # the model through the OpenAI API (rollout_server/agent_episode.py); empty = no agent
    agent: str = ""
    # [task.agent only]
    # sandboxed processes that run agents (per rollout server)
    agent_workers: Annotated[int, at_least(1)] = 4
    # [task.agent only]
    # address-space limit of an agent's worker; 0 = none
    agent_memory_mb: Annotated[int, at_least(0)] = 4096
    # [task.agent only]
    # the model's tool-call format: hermes (Qwen) | mistral
    agent_tool_format: Annotated[str, one_of("hermes", "mistral")] = "hermes"

    def __post_init__(self):
        super().__post_init__()
        if self.name == "dataset":
            _check("task.dataset_path", bool(self.dataset_path), "set when task.name=dataset",
                   self.dataset_path)
        # a synthetic task reads no file: training on it while the user means their data is silent
        for key in ("eval_path", "dataset_path") if self.name != "dataset" else ():
            if getattr(self, key):
                raise ConfigError(f"task.{key}={getattr(self, key)!r} is read only by "
                                  f"task=dataset, and task.name={self.name!r}: add task=dataset")
        if self.name == "verifiers":
            _check("task.env", bool(self.env), "a verifiers taskset (an installed id or a module "
                   "path) when task.name=verifiers", self.env)
            _check("task.agent", bool(self.agent), "the verifiers episode runner with "
                   "task.name=verifiers (task=verifiers sets it)", self.agent)
            _check("task.eval_fraction", self.eval_fraction == 0, "0 with task.name=verifiers "
                   "(a verifiers taskset has no eval split here)", self.eval_fraction)
        else:
            _check("task.agent", not (self.agent and self.env), "empty when task.env is set",
                   self.agent)
        _check("task.env_args", not self.env_args or self.name == "verifiers",
               "empty unless task.name=verifiers", self.env_args)
        chat = bool(self.agent or self.env)  # an episode talks in chat
        _check("task.chat_template", not (chat and self.chat_template == "none"),
               "a chat template (not none) when task.env or task.agent is set", self.chat_template)
        _check("task.reward_model.path", not (self.reward_model.enabled and chat),
               "empty when task.env or task.agent is set (single-turn episodes only)",
               self.reward_model.path)
        n = len(self.reward_fn) if isinstance(self.reward_fn, list) else 1
        _check("task.reward_weights", not self.reward_weights or (
            self.reward_fn and len(self.reward_weights) == n),
               f"empty or one weight per task.reward_fn entry ({n})", self.reward_weights)
        _check("task.reward_weights", not (self.reward_weights and self.reward_url),
               "empty with task.reward_url (the remote reward replaces task.reward_fn)",
               self.reward_weights)
        _check("task.answer_key", self.answer_key or self.name != "dataset" or bool(
            self.reward_fn or self.reward_url or self.env or self.agent),
               "a column name: the task's own reward (math-verify) grades against the answer "
               "(task.answer_key='' needs a task.reward_fn of your own)", self.answer_key)
        if why := url_credential(self.reward_url):  # never in config.yaml, exports or trackers
            raise ConfigError(f"task.reward_url: credentials are not configuration ({why}): give "
                              "the URL without them and the credential in the environment, "
                              f"{REWARD_AUTH_ENV} (every reward request's Authorization header, "
                              "e.g. 'Bearer TOKEN')")


@dataclass(kw_only=True)
class BufferConfig(Section):
    """The replay buffer: credits, staleness bound, WAL (buffer/STALENESS.md, buffer/WAL.md)."""

    key = "buffer"

    address: str = "tcp://127.0.0.1:5555"  # request/reply (ROUTER); clients connect here
    pub_address: str = "tcp://127.0.0.1:5556"  # announcements (PUB)
    max_staleness: Annotated[int, at_least(0)] = 4  # eta; 0 = synchronous on-policy
    # B: groups the trainer consumes per optimizer step
    groups_per_step: Annotated[int, at_least(1)] = 8
    # cap on groups being generated at once (all servers)
    max_inflight: Annotated[int, at_least(1)] = 64
    capacity: int = 1024  # stored groups; admission stops (back-pressure) at this size
    # what happens to a group over the bound: drop | reissue its prompt
    stale_policy: Annotated[str, one_of("drop", "reissue")] = "reissue"
    # hand-out order: oldest (head version) | newest | fifo
    selection: Annotated[str, one_of("oldest", "newest", "fifo")] = "oldest"
    # drop groups with no learning signal (DAPO dynamic sampling)
    filter_equal_rewards: bool = False
    max_tokens_per_trajectory: Annotated[int, at_least(0)] = 0  # 0 = no length filter
    # a credit not fulfilled by then is re-issued
    lease_timeout_s: Annotated[float, above(0)] = 120.0
    heartbeat_timeout_s: float = 15.0  # a rollout server silent this long leaves the roster
    wal_dir: Annotated[str, DIRECTORY] = "wal"  # relative to run_dir unless absolute
    # always (ack after fsync; group commit) |
    # batch (fsync every 50 ms; acks may precede it) | never
    fsync: Annotated[str, one_of("always", "batch", "never")] = "always"
    # WAL segment: big, as a rotation stalls the loop for a few ms; at most 1/8 of the free disk
    segment_bytes: Annotated[int, above(0)] = 256 * 1024 * 1024
    # groups are refused ("unavailable") this many bytes before the WAL's disk is full, and taken
    # again at twice it (batches are still handed out)
    wal_reserve_bytes: Annotated[int, at_least(0)] = 64 * 1024 * 1024
    metrics_port: Annotated[int, PORT] = 0  # 0 = ephemeral
    # passes over the train split; 0 = unbounded. Fewer prompts than trainer.steps x
    # groups_per_step in them is refused before start (the trainer would wait forever)
    max_epochs: Annotated[int, at_least(0)] = 0
    # largest request frame decoded (decoding may take ~73x its size); 0 = the job's biggest group
    # (areal_like/job_facts.py)
    max_frame_bytes: Annotated[int, at_least(0, " (0 = sized to the job)")] = 0
    # also serve same-node ipc:// sockets in this directory (no CURVE: areal_like/SECURITY.md),
    # relative to run_dir unless absolute; "" = tcp only
    local_dir: str = ""
    # ZeroMQ I/O threads of the request/reply socket, where CURVE's cipher runs (one connection
    # per thread); 0 = half the cores this process may use, 1 to 8
    io_threads: Annotated[int, at_least(0, " (0 = from the cores)")] = 0

    def __post_init__(self):
        super().__post_init__()
        _check("buffer.capacity", self.capacity >= self.groups_per_step,
               ">= buffer.groups_per_step", self.capacity)




@dataclass(kw_only=True)
class EngineConfig(Section):
    """The inference engine a rollout server drives (rollout_server/engine/ENGINE.md)."""

    key = "rollout.engine"

    # embedded (in-process CPU/GPU engine) | sglang or vllm (launch a real server) | url (attach
    # a running SGLang)
    kind: Annotated[str, one_of("embedded", "sglang", "vllm", "url")] = "embedded"
    # [rollout.engine.kind=url only]
    url: str = ""  # kind=url: base URL of a running SGLang server
    # address the engine listens on; the trainer's log-prob guard and pushes reach it there, so a
    # trainer on another node needs this node's address
    host: str = "127.0.0.1"
    port: Annotated[int, PORT] = 0  # 0 = pick a free port
    # [embedded engine only] cpu, cuda or cuda:N; SGLang's device is its own flag
    # (rollout.engine.sglang.device), and topology=gpu_sglang sets this to cuda for placement
    device: Annotated[str, DEVICE] = "cpu"
    # [embedded engine only] requests decoded at once; refused with kind=sglang or url, where
    # SGLang's own rollout.engine.sglang.max_running_requests is the knob
    max_running_requests: Annotated[int, at_least(1)] = 64
    # [embedded engine only] KV slots budget; refused with kind=sglang or url (SGLang sizes its KV
    # cache from rollout.engine.sglang.mem_fraction_static or .max_total_tokens)
    max_total_tokens: Annotated[int, at_least(1)] = 65536
    # how long the engine may take to answer its first request (SGLang: load and warm up)
    startup_timeout_s: float = 600.0
    # a generate running this long is aborted and what it made is kept (its rest is asked again);
    # one with no token by then is an error
    request_timeout_s: float = 600.0
    # GPUs per engine (SGLang's --tp-size); `run` places each rollout server on this many
    tp_size: int = 1
    # [rollout.engine.kind=sglang only]
    # passed verbatim to `python -m sglang.launch_server`; rollout.engine.sglang.FLAG=V sets one
    sglang: dict = field(default_factory=dict)
    # [rollout.engine.kind=vllm only]
    # passed verbatim to vLLM's API server (its `vllm serve` flags; rollout_server/launch_vllm.py);
    # rollout.engine.vllm.FLAG=V sets one (no Hydra `+` needed)
    vllm: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        _check("rollout.engine.tp_size",
               self.tp_size == 1 or (self.tp_size > 1 and self.kind == "sglang"),
               "1, or > 1 with rollout.engine.kind=sglang", self.tp_size)
        launcher_sets(self.sglang, LAUNCHER_FLAGS)
        launcher_sets(self.vllm, VLLM_LAUNCHER_FLAGS, engine="vllm")
        # never in config.yaml or logs
        secrets = [f"{name}.{k}" for name in ("sglang", "vllm")
                   for k in getattr(self, name) if SECRET_FIELD.search(str(k))]
        for key in sorted(secrets):
            raise ConfigError(f"rollout.engine.{key}: credentials are not configuration; "
                              f"the engine API key comes from the environment ({ENGINE_KEY_ENV}; "
                              "`areal-like run` makes one per job)")
        if self.kind == "url":
            _check("rollout.engine.url", self.url.startswith("http"),
                   "an http(s) URL when kind=url", self.url)


@dataclass(kw_only=True)
class RolloutConfig(Section):
    """A rollout server: generation, rewards, heartbeats (rollout_server/ROLLOUT.md)."""

    key = "rollout"

    server_id: Annotated[str, WIRE_NAME] = ""  # empty = "<hostname>-<pid>"
    buffer_address: str = "${buffer.address}"  # where this server asks for credits (set by run)
    pub_address: str = "${buffer.pub_address}"  # where it hears the buffer's announcements
    # groups this server generates at once (x task.group_size requests to its engine); the job's
    # total is also capped by buffer.max_inflight
    max_concurrent_groups: Annotated[int, at_least(1)] = 8
    # its heartbeat to the buffer (buffer.heartbeat_timeout_s)
    heartbeat_s: Annotated[float, above(0)] = 1.0
    # finish in-flight requests before a weight update instead of aborting
    drain_on_update: bool = False
    # /pause_generation mode of a weight update: retract | abort (trainer/WEIGHT_SYNC.md)
    pause_mode: Annotated[str, one_of("abort", "retract")] = "retract"
    # this server runs the job's evaluations (eval.*); `areal-like run` sets it on the first
    eval: bool = False
    metrics_port: Annotated[int, PORT] = 0  # its /metrics HTTP port; 0 = ephemeral
    # where the trainer driving a weight sync asks for the engine's door and says when the sync
    # begins and ends (on the engine's host, behind the engine key: rollout_server/sync_port.py);
    # 0 = ephemeral
    sync_port: Annotated[int, PORT] = 0
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass(kw_only=True)
class WeightSyncConfig(Section):
    """How the trainer pushes each version's weights to the engines (trainer/WEIGHT_SYNC.md)."""

    key = "trainer." + "weight_sync"  # a config key, not the module trainer/weight_sync.py

    # largest bucket of weights sent in one broadcast (a LoRA adapter: one)
    bucket_mb: Annotated[float, above(0)] = 64.0
    # whole sync; a member that misses it is dropped for this version
    deadline_s: Annotated[float, above(0)] = 60.0
    # auto (nccl on cuda, gloo on cpu) | gloo | nccl
    backend: Annotated[str, one_of("auto", "gloo", "nccl")] = "auto"
    master_addr: str = "127.0.0.1"  # address engines use to reach trainer rank 0
    master_port: Annotated[int, PORT] = 0  # 0 = pick a free port per group formation
    group_name: str = "areal_like_weights"  # name of the trainer-engines process group
    # auto (tensor where `run` puts trainer and engine on one GPU) | distributed | tensor | disk
    path: Annotated[str, one_of("auto", "distributed", "tensor", "disk")] = "auto"
    # engines lagging by design (trainer/engine_lag.py); buffer.max_staleness must cover the lag
    # L: push only every L versions (OAPL's lagged inference); the engines lag up to L - 1
    every: Annotated[int, at_least(1)] = 1
    # D: the engines always serve version v - D (a controlled-staleness experiment)
    delay: Annotated[int, at_least(0)] = 0

    @property
    def engine_lag(self) -> int:
        """The most versions the engines may lag behind the trainer by design (0: every version
        pushed)."""
        return max(self.every - 1, self.delay)

    def backend_on(self, device: str) -> str:
        """The collective backend for a trainer on ``device`` (``cuda``, ``cuda:1``, ``cpu``)."""
        return self.backend if self.backend != "auto" else (
            "nccl" if device.startswith("cuda") else "gloo")
    # a model in <= 2 buckets: its push finishes while the next step trains (trainer/WEIGHT_SYNC.md)
    overlap: bool = True

    def __post_init__(self):
        super().__post_init__()
        _check("trainer.weight_sync.delay", self.delay == 0 or self.every == 1,
               "0 with trainer.weight_sync.every > 1 (one lag mode at a time)", self.delay)


# engine kind -> its adapter's path
LORA_PATHS = {"embedded": "distributed", "sglang": "disk", "vllm": "disk"}
# Qwen2 / Llama / Qwen3 names of every linear layer in a decoder block (PEFT's usual "all-linear")
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# SGLang flags the launcher sets with LoRA (rollout_server/launch_sglang.py lora_options), from what
LORA_FLAGS = {"enable_lora": "trainer.lora.rank > 0", "max_lora_rank": "trainer.lora.rank",
              "lora_target_modules": "trainer.lora.target_modules",
              "max_loras_per_batch": "3: trainer/WEIGHT_SYNC.md"}
# vLLM flags the launcher sets with LoRA (rollout_server/launch_vllm.py lora_options), from what
VLLM_LORA_FLAGS = {"enable_lora": "trainer.lora.rank > 0",
                   "max_lora_rank": "trainer.lora.rank, rounded up to a rank vLLM takes",
                   "max_loras": "3: trainer/WEIGHT_SYNC.md"}
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's --max-lora-rank choices


@dataclass(kw_only=True)
class LoraConfig(Section):
    """Low-rank adapters on a frozen base (areal_like/weights/lora.py)."""

    key = "trainer.lora"

    # 0 = off (every weight trains); r of the A [r, in] and B [out, r] matrices
    rank: Annotated[int, at_least(0, " (0: LoRA off)")] = 0
    # [trainer.lora.rank > 0 only]
    alpha: Annotated[float, above(0)] = 16.0  # the adapter's output is scaled by alpha / rank
    # [trainer.lora.rank > 0 only]
    # on the adapter's input, in the training forward only (not in log-prob passes); never on an
    # lm_head adapter, whose weight change the trainer's output head adds (trainer/model.py)
    dropout: Annotated[float, within(0, 1, "[)")] = 0.0
    # [trainer.lora.rank > 0 only]
    # names of the linear layers that get an adapter (PEFT's target_modules); default every linear
    # layer of a Qwen2/Llama/Qwen3 decoder block
    target_modules: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def __post_init__(self):
        super().__post_init__()
        _check("trainer.lora.target_modules", not self.enabled or len(self.target_modules) > 0,
               "at least one module name with trainer.lora.rank > 0", self.target_modules)
        # a set, as PEFT reads it: in another order the same adapters (a resume compares them)
        self.target_modules = sorted(set(self.target_modules))


@dataclass(kw_only=True)
class TrainerConfig(Section):
    """The FSDP2 trainer: optimizer, batches, checkpoints (trainer/MEMORY.md, trainer/LOSSES.md)."""

    key = "trainer"

    buffer_address: str = "${buffer.address}"  # the buffer it takes batches from
    # groups per optimizer step: set by buffer.groups_per_step (set that key); another value here
    # is refused, since the buffer's admission and staleness bound count that many per version
    groups_per_step: int = "${buffer.groups_per_step}"  # type: ignore[assignment]
    # optimizer steps (policy versions) of the run (verl total_training_steps)
    steps: Annotated[int, at_least(1)] = 100
    # AdamW learning rate (verl actor.optim.lr); model=tiny sets 3e-4
    lr: Annotated[float, above(0)] = 1e-5
    weight_decay: Annotated[float, at_least(0)] = 0.0  # AdamW decoupled weight decay
    # AdamW (beta1, beta2)
    betas: Annotated[list[float], Bound("two numbers in [0, 1)", lambda b: len(b) == 2 and all(
        0 <= x < 1 for x in b))] = field(default_factory=lambda: [0.9, 0.999])
    # constant | linear | cosine (after warmup)
    lr_schedule: Annotated[str, one_of("constant", "linear", "cosine")] = "constant"
    # linear LR warmup from 0 over this many steps; 0 = none
    warmup_steps: Annotated[int, at_least(0)] = 0
    grad_clip: Annotated[float, above(0)] = 1.0  # global gradient-norm clip
    # a step with a non-finite loss or gradient is skipped; this many in a row stop the job
    max_nonfinite_skips: Annotated[int, at_least(1)] = 10
    # steps in a row with no learning signal (every group's rewards equal: zero_adv_skip_frac 1; or
    # grad_norm 0) after which the trainer warns and the final JSON says learning.ok false; 0 = off
    learning_watch_steps: Annotated[int, at_least(0)] = 10
    # sequences per forward/backward (max_tokens_per_micro_batch = 0)
    micro_batch_size: Annotated[int, at_least(1)] = 8
    # sequences concatenated without padding (trainer/packing.py); false: right-padded
    pack_sequences: bool = True
    # a minibatch is packed unless each of its right-padded calls would waste less than this share
    # of its positions: there a packed forward costs more than the padding (trainer/packing.py)
    pack_min_padding: Annotated[float, within(0, 1, "[)")] = 0.15
    # > 0: micro-batches of at most this many tokens instead of micro_batch_size sequences
    # (trainer/MEMORY.md); 0: off
    max_tokens_per_micro_batch: Annotated[
        int, at_least(0, " (0: micro-batches of micro_batch_size sequences)")] = 0
    # rows whose every advantage is exactly 0 (a group whose rewards are all equal) are not computed
    # where that leaves the update unchanged (trainer/LOSSES.md, "Rows with zero advantage")
    skip_zero_advantage: bool = True
    # optimizer steps per batch (all but the first are off-policy by construction)
    num_minibatches: Annotated[int, at_least(1)] = 1
    # advantage estimator (verl adv_estimator): grpo | drgrpo | rloo | reinforce_pp |
    # reinforce_pp_baseline (trainer/LOSSES.md); vcpo and oapl take their own group baseline
    estimator: Annotated[str, one_of(*ESTIMATORS)] = "grpo"
    loss: LossConfig = field(default_factory=LossConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # PPO with a value model (trainer/critic.py); off: the kernels' own advantages
    critic: CriticConfig = field(default_factory=CriticConfig)
    # a checkpoint every this many steps, and at the last
    checkpoint_every: Annotated[int, at_least(1)] = 20
    # a save stages the state and writes it while the next step trains (DCP async_save)
    checkpoint_async: bool = False
    checkpoint_dir: Annotated[str, DIRECTORY] = "checkpoints"  # relative to run_dir unless absolute
    # the newest checkpoints kept on disk (exports: export.keep)
    keep_checkpoints: Annotated[int, at_least(1)] = 2
    # start from the run directory's newest checkpoint; false refuses a run directory that has one
    resume: bool = True
    device: Annotated[str, DEVICE] = "cpu"  # cpu, cuda or cuda:N (`run` gives each rank its GPU)
    # longest the buffer holds a batch request open before answering "not yet" (the trainer asks
    # again)
    batch_wait_s: Annotated[float, at_least(0)] = 5.0
    buffer_timeout_s: float = 120.0  # the buffer silent this long is an error, not a wait
    metrics_port: Annotated[int, PORT] = 0  # rank 0's /metrics HTTP port; 0 = ephemeral
    gloo_timeout_s: float = 300.0  # timeout of the trainer ranks' collectives
    # the KL term's frozen reference (loss.kl_coef > 0): a local HF dir; None = initial
    ref_path: str | None = None
    # mean |engine - trainer| log-prob per token at start; <= 0: off; None: by model.dtype,
    # 0.05 for float32, 0.1 for bfloat16 and float16 (trainer/logprob_guard.py, DEFAULT_TOL)
    logprob_guard_tol: float | None = None
    # wait for rollout servers before the first push (0: at once; `run` sets it)
    first_engine_wait_s: Annotated[float, at_least(0)] = 0.0
    # how many: the first push waits (first_engine_wait_s) until this many registered
    first_engines: Annotated[int, at_least(1)] = 1
    # recompute each decoder block in backward (trainer/MEMORY.md)
    activation_checkpointing: bool = False
    # a mixture of experts' load-balancing loss (its transformers module's
    # load_balancing_loss_func on the training forward's router logits), times this, added to the
    # policy loss. 0 = off, the RL default: the routing the engine sampled with is left alone.
    router_aux_loss_coef: Annotated[float, at_least(0)] = 0.0
    # routing replay (a mixture of experts): the engine returns the experts it routed each token
    # to, the trajectory carries them and the trainer's forwards route to them, so its log-probs
    # follow the engine's choices (areal_like/weights/routing.py). Qwen3-MoE/Qwen2-MoE routers,
    # the embedded engine or SGLang (without its hierarchical cache), every kind of task, no
    # activation_checkpointing or compile_blocks; refused before start otherwise.
    routing_replay: bool = False
    # expert parallelism (a mixture with fused experts, Qwen3-MoE's): each mixture layer's experts
    # split over this many ranks, tokens sent to their expert's rank (trainer/MEMORY.md); must
    # divide the model's num_experts and the trainer's ranks per node (an EP group stays inside a
    # node); no compile_blocks. 1 = off
    expert_parallel: Annotated[int, at_least(1)] = 1
    # tokens per lm_head chunk of the log-probs: one [chunk, vocab] fp32 block
    logprob_chunk_tokens: Annotated[int, at_least(1)] = 512
    # the output head of the log-probs (trainer/logprobs.py): chunked (PyTorch, chunks of
    # logprob_chunk_tokens, any device), fused (liger-kernel's fused linear cross entropy, no
    # fp32 logits block; CUDA with liger-kernel installed), auto (fused where it can run, else
    # chunked)
    logprob_head: Annotated[str, one_of("chunked", "fused", "auto")] = "auto"
    # torch.compile each decoder block (as torchtitan does; for CUDA jobs, first step slower)
    compile_blocks: bool = False

    def __post_init__(self):
        super().__post_init__()
        # a minibatch is whole groups (trainer/step.py): more of them than groups would be empty
        _check("trainer.num_minibatches", not isinstance(self.groups_per_step, int)
               or self.num_minibatches <= self.groups_per_step,
               f"<= buffer.groups_per_step={self.groups_per_step} (a minibatch is whole groups: "
               "more would make fewer optimizer steps)", self.num_minibatches)
        # the replayed routers are set for the forward only: a block recomputed in backward, or
        # compiled, would route freely
        _check("trainer.routing_replay", not self.routing_replay
               or not (self.activation_checkpointing or self.compile_blocks),
               "false with trainer.activation_checkpointing or trainer.compile_blocks",
               self.routing_replay)
        # the experts' forward exchanges tokens by all-to-all with data-dependent sizes
        _check("trainer.expert_parallel", self.expert_parallel == 1 or not self.compile_blocks,
               "1 with trainer.compile_blocks", self.expert_parallel)
        self.loss.check_for_kernel()
        self.critic.check_for_trainer(self.loss.kernel, self.lora.enabled, model_keys(ModelConfig))
        # the KL reference is the base itself, the adapter switched off; the weight path with
        # LoRA is checked with the engine kind (RunConfig)
        _check("trainer.ref_path", not self.lora.enabled or self.ref_path is None, "unset with "
               "trainer.lora.rank > 0 (the reference is the base model without the adapter)",
               self.ref_path)


@dataclass(kw_only=True)
class WarmStartConfig(Section):
    """Supervised fine-tuning before RL (`areal-like sft`, and `run`'s warm start): cross-entropy
    on the answers, cached by the content of the model and data (trainer/sft.py)."""

    key = "warm_start"

    # SFT optimizer steps before RL; 0 = off (`areal-like sft` needs > 0)
    steps: Annotated[int, at_least(0)] = 0
    # [warm_start.steps > 0 only]
    # its AdamW learning rate (constant; no weight decay); model=tiny sets 3e-3, model=local_hf 2e-5
    lr: Annotated[float, above(0)] = 3e-3
    # [warm_start.steps > 0 only]
    # answers per step (a chat row gives one per assistant message); micro-batches as trainer.*
    batch_size: Annotated[int, at_least(1)] = 64
    # [warm_start.steps > 0 only]
    # a local file (or directory) of SFT rows instead of the task's own: chat rows (a messages
    # column, or task.messages_key, and no answer column: each assistant message is a target), or
    # the task's prompt and answer columns
    dataset_path: str | None = None
    # [warm_start.steps > 0 only]
    # eval prompts of the accuracy line after SFT (greedy and sampled, transformers' generate on
    # CPU, slow for a large model); 0 = none
    eval_prompts: Annotated[int, at_least(0)] = 128
    # [warm_start.steps > 0 only]
    # where results are cached, by content; relative to run_dir's parent so later runs reuse them
    cache_dir: Annotated[str, DIRECTORY] = "warmstart"


@dataclass(kw_only=True)
class SecurityConfig(Section):
    """Who may join the job's ZeroMQ traffic (areal_like/SECURITY.md)."""

    key = "security"

    # CURVE-encrypt and authenticate every ZeroMQ socket; false only on a trusted network
    curve: bool = True
    # the job's keys (`areal-like keys RUN_DIR`); relative to run_dir unless absolute
    keys_dir: Annotated[str, DIRECTORY] = "keys"
    # a one-node `run`: daemons reach the buffer over ipc:// in <run_dir>/sock; false = tcp, CURVE
    local_ipc: bool = True


@dataclass(kw_only=True)
class LaunchConfig(Section):
    """How `areal-like run` lays out and supervises the job (launch/OPERATIONS.md)."""

    key = "launch"

    # null: from the cores, for a CPU job on one machine (launch/topology.py); a GPU or multi-node
    # job sets both
    num_rollout_servers: Annotated[int | None, at_least(1)] = None
    # trainer processes (FSDP2 ranks); null: from the cores
    trainer_ranks: Annotated[int | None, at_least(1)] = None
    # per daemon within restart_window_s, before the job gives up
    restarts: Annotated[int, at_least(0)] = 3
    # crashes older than the window no longer count; each restart in it waits twice the last
    restart_window_s: Annotated[float, above(0)] = 3600.0
    # wait before the first restart in the window; doubles per restart
    restart_backoff_s: Annotated[float, at_least(0)] = 1.0
    restart_backoff_max_s: float = 60.0  # the longest wait between restarts
    # how long `run` waits for the buffer and trainer to become healthy (rollout servers:
    # rollout.engine.startup_timeout_s + 60)
    health_timeout_s: float = 300.0
    # rollout and trainer pools on disjoint cores; null: pinned when the counts come from the cores
    pin_cpus: bool | None = None
    omp_threads: int = 1  # OMP_NUM_THREADS and MKL_NUM_THREADS of each daemon
    # GPUs `run` places processes on (launch/placement.py); 0 = torch's count on cuda
    gpus_per_node: Annotated[int, at_least(0)] = 0
    # GiB of memory per GPU that `areal-like plan` sizes the job against (a card sold as 24 GB
    # has about 24 GiB); the estimate only, nothing is refused
    gpu_memory_gb: Annotated[float, above(0)] = 80.0
    # several nodes: the first train_nodes run trainer ranks, the others rollout servers
    # (launch/placement.py)
    nodes: Annotated[int, at_least(1)] = 1
    # of launch.nodes, how many run trainer ranks; a node either trains or serves, never both
    train_nodes: int = 1
    # most rollout servers from the cores (each a process with a model)
    auto_max_servers: Annotated[int, at_least(1)] = 8
    auto_max_threads: Annotated[int, at_least(1)] = 8  # and on a pinned trainer's threads
    # logs and metrics/scrape.jsonl rotate past log_max_mb into <file>.1 ... .<log_backups>
    log_max_mb: Annotated[float, above(0)] = 100.0
    log_backups: Annotated[int, at_least(1)] = 3  # rotated copies kept per log
    # where `run` starts the daemons: local (this machine) or ray (placement groups on the Ray
    # cluster at launch.ray_address; launch/RAY.md)
    cluster: Annotated[str, one_of("local", "ray")] = "local"
    # cluster=ray: the cluster's GCS address (host:port); null: RAY_ADDRESS, else ray.init's own
    ray_address: str | None = None
    # cluster=ray: CPUs each process reserves (a trainer: per rank)
    ray_cpus: Annotated[float, above(0)] = 1.0

    def __post_init__(self):
        super().__post_init__()
        _check("launch.train_nodes", 1 <= self.train_nodes < max(self.nodes, 2),
               f">= 1 and < launch.nodes={self.nodes} (the other nodes run the rollout servers)"
               if self.nodes > 1
               else "1 on one node (launch.nodes=1)", self.train_nodes)
        _check("launch.restart_backoff_max_s", self.restart_backoff_max_s >= self.restart_backoff_s,
               f">= launch.restart_backoff_s={self.restart_backoff_s}", self.restart_backoff_max_s)




@dataclass(kw_only=True)
class RunConfig(Section):
    experiment_name: str = "default"  # names the run directory (experiment=X presets set it)
    # the job's files: logs, WAL, checkpoints, exports, metrics (launch/OPERATIONS.md); a new
    # timestamped one per run unless given (resume: pass the same run_dir)
    run_dir: Annotated[str, Bound("a directory (run_dir=. for the current one)",
                                  DIRECTORY.test)] = "runs/${experiment_name}"
    seed: int = 0  # the trainer's torch seed (sampling seeds come from task.seed)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # on-policy distillation
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # any of TRACKERS, e.g. [jsonl,tensorboard]
    tracker: Annotated[list[str], Bound("any of " + ", ".join(map(repr, TRACKERS)), lambda v: set(
        v) <= set(TRACKERS))] = field(default_factory=lambda: ["jsonl"])
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self):
        super().__post_init__()
        self.run_dir = os.path.expanduser(self.run_dir)  # not a directory named "~" in the cwd
        # engines that lag by design must still be admitted, and their groups consumed
        # (buffer/STALENESS.md)
        lag = self.trainer.weight_sync.engine_lag
        _check("buffer.max_staleness", self.buffer.max_staleness >= lag,
               f">= {lag}, the engines' lag (trainer.weight_sync.every - 1, or "
               "trainer.weight_sync.delay)",
               self.buffer.max_staleness)
        if self.trainer.lora.enabled:
            self._check_lora_engine()
        if self.rollout.engine.kind == "vllm":
            self._check_vllm_engine()
        self._check_group_size()
        multiturn = self.task.env or self.task.agent
        _check("distill.teachers", not (self.distill.enabled and multiturn),
               "empty with task.env or task.agent (a teacher scores single-turn episodes only)",
               self.distill.teachers)
        _check("task.temperature", not self.distill.enabled or self.task.temperature == 1.0,
               "1.0 with distill.teachers (the teacher's log-probs are at temperature 1; the "
               "student's behaviour log-probs are at the temperature it samples)",
               self.task.temperature)
        _check("task.top_p", not self.distill.enabled or self.task.top_p == 1.0,
               "1.0 with distill.teachers (the teacher scores the whole distribution)",
               self.task.top_p)
        _check("task.top_k", not self.distill.enabled or self.task.top_k <= 0,
               "-1 (off) with distill.teachers (the teacher scores the whole "
               "distribution)", self.task.top_k)
        ranks, ep = self.launch.trainer_ranks, self.trainer.expert_parallel
        _check("trainer.expert_parallel", ranks is None or ranks % ep == 0,
               f"a divisor of launch.trainer_ranks={ranks} (the trainer's ranks per node: an EP "
               "group stays inside a node)", ep)
        _check("trainer.groups_per_step", not isinstance(self.trainer.groups_per_step, int)
               or self.trainer.groups_per_step == self.buffer.groups_per_step,
               f"buffer.groups_per_step="
               f"{self.buffer.groups_per_step} (set buffer.groups_per_step instead: the trainer "
               "takes what the buffer admits per version)", self.trainer.groups_per_step)

    def _check_vllm_engine(self) -> None:
        """What a vLLM engine offers (trainer/WEIGHT_SYNC.md, "vLLM"): the group path (an adapter:
        ``_check_lora_engine``), paused in abort mode."""
        _check("trainer.weight_sync.path", self.trainer.lora.enabled
               or self.trainer.weight_sync.path in ("auto", "distributed"),
               "auto or distributed with rollout.engine.kind=vllm (vLLM's weight-transfer API)",
               self.trainer.weight_sync.path)
        _check("rollout.pause_mode", self.rollout.pause_mode == "abort", "abort with "
               "rollout.engine.kind=vllm (vLLM's keep mode resumes on the old weights' KV cache)",
               self.rollout.pause_mode)

    def _check_group_size(self) -> None:
        """A group of one is its own baseline where the kernel takes one over the group: every
        advantage 0, nothing learned."""
        kernel = self.trainer.loss.kernel
        if self.task.group_size == 1 and kernel in GROUP_BASELINE_KERNELS:
            raise ConfigError(f"task.group_size=1 is invalid with trainer.loss.kernel={kernel}: "
                              "every advantage is 0 (its baseline over a group of one reward is "
                              "that reward); use >= 2, or another kernel")

    def _check_lora_engine(self) -> None:
        """What serves LoRA (trainer/WEIGHT_SYNC.md): an embedded engine over the group path, an
        SGLang or a vLLM this job starts over the disk path (a PEFT directory on the trainer's
        node)."""
        engine, path = self.rollout.engine, self.trainer.weight_sync.path
        rank = self.trainer.lora.rank
        _check("rollout.engine.kind", engine.kind in LORA_PATHS, "embedded, sglang or vllm with "
               "trainer.lora.rank > 0 (an attached engine is not started with LoRA enabled)",
               engine.kind)
        _check("trainer.weight_sync.path", path in ("auto", LORA_PATHS[engine.kind]),
               f"auto or {LORA_PATHS[engine.kind]} with trainer.lora.rank > 0 and "
               f"rollout.engine.kind={engine.kind}", path)
        launcher_sets(engine.sglang, LORA_FLAGS, " with trainer.lora.rank > 0")
        if engine.kind == "vllm":
            _check("trainer.lora.rank", rank <= VLLM_LORA_RANKS[-1], f"<= {VLLM_LORA_RANKS[-1]} "
                   "with rollout.engine.kind=vllm (vLLM's largest --max-lora-rank)", rank)
            launcher_sets(engine.vllm, VLLM_LORA_FLAGS, " with trainer.lora.rank > 0", "vllm")
            other = sorted(set(self.trainer.lora.target_modules) - set(LORA_DEFAULT_TARGETS))
            _check("trainer.lora.target_modules", not other, "the decoder's linear layers only "
                   f"({', '.join(LORA_DEFAULT_TARGETS)}) with rollout.engine.kind=vllm: vLLM "
                   f"0.32 refuses an adapter of {', '.join(other)} ('expected target modules "
                   "in' those)", self.trainer.lora.target_modules)

    @property
    def adapter_path(self) -> str | None:
        """With LoRA, the weight path the engine kind loads an adapter from (None: no LoRA)."""
        return LORA_PATHS.get(self.rollout.engine.kind) if self.trainer.lora.enabled else None

    def resolve_path(self, p: str) -> Path:
        """A path from the config, relative to run_dir unless absolute."""
        path = Path(p)
        return path if path.is_absolute() else Path(self.run_dir) / path
