"""Pure GPU placement: which GPUs each process of a node sees (its ``CUDA_VISIBLE_DEVICES``).

``place_node`` lays out one node: trainer ranks on GPUs ``[0, T)`` (local rank ``i`` on GPU
``i``), then rollout server ``i`` on ``[T + i*g, T + (i+1)*g)`` with ``g = tp`` GPUs for its
engine, plus one (the last, its ``cuda:tp``) for its reward model when it scores on a GPU
(``reward_model_on_gpu``: ``task.reward_model.device=auto`` or ``cuda`` on a GPU topology; the
slot hands the server that device: ``launch/topology.py``). ``place_nodes`` lays out every
node from ``launch.*`` and ``rollout.engine.tp_size``: on several nodes the first
``launch.train_nodes`` run only trainer ranks, the others only rollout servers, and both counts
are per node.

Invariants (tested in tests/unit/test_placement.py):
* one process per GPU (NCCL refuses two ranks of one group on one GPU; SGLang takes most of its
  GPU's memory): a layout needing more GPUs than the node has is a ``ConfigError`` naming the keys;
* except a one-GPU node with one trainer rank and one rollout server of ``tp_size`` 1, which share
  GPU 0 (``NodeGpus.shared``): the weights then go without a group (``with_weight_path``; vLLM,
  which takes whole weights by the group only, over gloo, which ``backend=auto`` picks there)
  and an SGLang or vLLM engine leaves the
  trainer room (``mem_fraction_static`` / ``gpu_memory_utilization``:
  ``SHARED_MEM_FRACTION_DEFAULT``, at most ``SHARED_MEM_FRACTION_MAX``);
* the GPUs given out are ``[0, used)``; a process on CPU takes none, an engine by URL runs
  elsewhere;
* a reward model on a GPU has one of its own, never its engine's or the trainer's (SGLang takes
  most of its GPU's memory): the one-GPU node's sharing does not stretch to it (refused, naming
  ``task.reward_model.device``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from areal_like.settings.config import ConfigError, RunConfig
from areal_like.settings.config_checks import split_address

SHARED_MEM_FRACTION_DEFAULT = 0.4  # one shared GPU, fraction unset: what SGLang gets
# one shared GPU: SGLang's static share; the trainer's weights, grads, Adam need the rest
SHARED_MEM_FRACTION_MAX = 0.6
# engine kind -> (its name, the flag that caps its GPU memory share): ``memory_share``
MEMORY_SHARE_FLAGS = {"sglang": ("SGLang", "mem_fraction_static"),
                      "vllm": ("vLLM", "gpu_memory_utilization")}
COUNTS = ("num_rollout_servers", "trainer_ranks")  # launch.*: null = from the cores (CPU jobs only)


@dataclass(frozen=True, kw_only=True)
class NodeGpus:
    """The GPUs of one node's processes."""

    trainer: tuple[int, ...]  # GPU of each trainer rank on this node (local rank i -> trainer[i])
    # the GPUs of each rollout server on this node (its engine's, then its reward model's if any)
    rollout: tuple[tuple[int, ...], ...]
    reward_model: tuple[int, ...] = ()  # the GPU of each server's reward model; () = none on GPU

    @property
    def used(self) -> int:
        return len(set(self.trainer).union(*self.rollout))

    @property
    def shared(self) -> bool:
        """Whether a trainer rank and an engine share a GPU (the one-GPU layout)."""
        return bool(set(self.trainer).intersection(*self.rollout)) if self.rollout else False


def visible_devices(gpus: tuple[int, ...], inherited: str | None = None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value for ``gpus`` (empty: no GPU). The plan numbers the GPUs
    torch sees, so each index is translated through the launcher's own list (``inherited``) when
    it has one: a job given GPUs ``4,5,6,7`` never touches GPUs 0-3."""
    if inherited is None:
        return ",".join(map(str, gpus))
    have = [d.strip() for d in inherited.split(",") if d.strip()]
    # CUDA takes an index or a UUID and stops at the first other entry: the GPUs after it vanish
    if bad := [d for d in have if not (d.isdigit() or d.startswith(("GPU-", "MIG-")))]:
        raise ConfigError(f"CUDA_VISIBLE_DEVICES={inherited!r}: {bad[0]!r} is not a GPU index "
                          "or UUID (GPU-..., MIG-...), and CUDA sees no GPU from it on")
    if gpus and max(gpus) >= len(have):
        raise ConfigError(f"CUDA_VISIBLE_DEVICES={inherited!r} gives this launcher {len(have)} "
                          f"GPUs and the plan places a process on GPU {max(gpus)} (counted from "
                          f"0); unset it or set launch.gpus_per_node={len(have)}")
    return ",".join(have[g] for g in gpus)


def place_node(*, gpus_per_node: int, trainer_ranks: int, rollout_servers: int, tp_size: int,
               nodes: int = 1, node: int = 0, reward_model: bool = False) -> NodeGpus:
    """Node ``node`` of ``nodes`` (module docstring); ConfigError when it does not fit.
    ``reward_model``: each rollout server's reward model gets a GPU after its engine's."""
    each = tp_size + reward_model
    need = trainer_ranks + rollout_servers * each
    # the one-GPU machine
    if gpus_per_node == 1 and (trainer_ranks, rollout_servers, tp_size, reward_model) == (
            1, 1, 1, False):
        return NodeGpus(trainer=(0,), rollout=((0,),))
    if need > gpus_per_node:
        terms = [f"launch.trainer_ranks={trainer_ranks}"] if trainer_ranks else []
        if rollout_servers:
            width = (f"(rollout.engine.tp_size={tp_size} + 1 for task.reward_model)"
                     if reward_model else f"rollout.engine.tp_size={tp_size}")
            terms.append(f"launch.num_rollout_servers={rollout_servers} x {width}")
        where = f" (node {node} of {nodes})" if nodes > 1 else ""
        rm = ("; the reward model takes a GPU of its own beside each engine (set "
              "task.reward_model.device=cpu to score on the CPU)") if reward_model else ""
        raise ConfigError(
            f"{' + '.join(terms)} needs {need} GPUs per node{where}; "
            f"launch.gpus_per_node={gpus_per_node}: one process per GPU (NCCL refuses two ranks of "
            "one group on one GPU; only a one-GPU node with one trainer rank and one rollout "
            f"server of tp_size 1 shares its GPU){rm}")
    rollout = tuple(tuple(range(trainer_ranks + i * each, trainer_ranks + (i + 1) * each))
                    for i in range(rollout_servers))
    return NodeGpus(trainer=tuple(range(trainer_ranks)), rollout=rollout,
                    reward_model=tuple(g[-1] for g in rollout) if reward_model else ())


def trainer_on_gpu(cfg: RunConfig) -> bool:
    return cfg.trainer.device.startswith("cuda")


def engine_on_gpu(cfg: RunConfig) -> bool:
    """Whether each rollout server's engine runs on this node's GPUs (SGLang does unless on CPU;
    an embedded engine or vLLM where ``rollout.engine.device`` says cuda)."""
    ec = cfg.rollout.engine
    sglang_gpu = ec.kind == "sglang" and ec.sglang.get("device") != "cpu"
    return sglang_gpu or (ec.kind in ("embedded", "vllm") and ec.device.startswith("cuda"))


def reward_model_on_gpu(cfg: RunConfig) -> bool:
    """Whether each rollout server's reward model gets a GPU of its own from the layout:
    ``task.reward_model`` set, its device ``auto`` or ``cuda``, and the engines on GPUs."""
    rm = cfg.task.reward_model
    return rm.enabled and rm.device in ("auto", "cuda") and engine_on_gpu(cfg)


def needs_gpus(cfg: RunConfig) -> bool:
    """Whether the job places processes on GPUs at all (a GPU topology)."""
    return trainer_on_gpu(cfg) or engine_on_gpu(cfg)


def node_roles(nodes: int, train_nodes: int, node: int) -> tuple[bool, bool]:
    """(runs trainer ranks, runs rollout servers) for node ``node``: both on a one-node job."""
    if nodes == 1:
        return True, True
    return node < train_nodes, node >= train_nodes


def place_nodes(cfg: RunConfig) -> tuple[NodeGpus, ...] | None:
    """Every node of the job, node 0 first; None when nothing runs on a GPU.
    ``launch.gpus_per_node`` must be resolved already (``launch/job.py``)."""
    _check_disk_nodes(cfg)
    if not _gpu_checks(cfg):
        return None
    la = cfg.launch
    for key in COUNTS:  # a GPU job's layout is its own: never guessed
        if getattr(la, key) is None:
            raise ConfigError(f"launch.{key}=null (from the cores) is for CPU jobs; a GPU job "
                              "sets it (topology=gpu_sglang and gpu_embedded: 1)")
    out = each_node(cfg)
    _check_weight_path(cfg, shared=any(n.shared for n in out))
    return out


def each_node(cfg: RunConfig) -> tuple[NodeGpus, ...]:
    """``place_node`` for every node of ``launch.*`` (its roles, the processes on GPUs), node 0
    first, without ``place_nodes``'s checks (a CPU job's nodes use no GPU)."""
    la, out = cfg.launch, []
    for k in range(la.nodes):
        trains, serves = node_roles(la.nodes, la.train_nodes, k)
        out.append(place_node(gpus_per_node=la.gpus_per_node,
                              trainer_ranks=(la.trainer_ranks
                                             if trains and trainer_on_gpu(cfg) else 0),
                              rollout_servers=(la.num_rollout_servers
                                               if serves and engine_on_gpu(cfg) else 0),
                              tp_size=cfg.rollout.engine.tp_size, nodes=la.nodes, node=k,
                              reward_model=serves and reward_model_on_gpu(cfg)))
    return tuple(out)


def idle_gpus(cfg: RunConfig) -> str | None:
    """A note naming the nodes whose GPUs the counts leave unused (the counts are the user's, never
    guessed on a GPU job), or None; ``cfg`` laid out."""
    nodes, have = place_nodes(cfg), cfg.launch.gpus_per_node
    idle = [f"{have - n.used} of {have} on node {k}" for k, n in enumerate(nodes or ())
            if n.used < have]
    return (f"GPUs left unused: {', '.join(idle)}; raise launch.trainer_ranks or "
            "launch.num_rollout_servers (each takes rollout.engine.tp_size)") if idle else None


def check_one_node(cfg: RunConfig) -> None:
    """ConfigError unless the job is one node (``areal-like run`` starts processes on this machine
    only), with one rollout server when it attaches to an engine by URL (every server would join
    that engine to the weight group, which wedges it)."""
    if cfg.launch.nodes != 1:
        raise ConfigError(f"launch.nodes={cfg.launch.nodes}: `areal-like run` starts one node; "
                          "start several with launch/slurm/areal_like.sbatch or by hand "
                          "(launch/MULTINODE.md)")
    if cfg.rollout.engine.kind == "url" and (n := cfg.launch.num_rollout_servers or 1) > 1:
        raise ConfigError(f"launch.num_rollout_servers={n} with rollout.engine.kind=url: every "
                          "rollout server would attach to rollout.engine.url, and an engine "
                          "serves one; set launch.num_rollout_servers=1")


def _gpu_checks(cfg: RunConfig) -> bool:
    """Whether the job places processes on GPUs; ConfigError when it cannot."""
    if cfg.launch.nodes > 1:
        _check_reachable(cfg)
    ws = cfg.trainer.weight_sync
    if ws.backend == "nccl" and not trainer_on_gpu(cfg):
        raise ConfigError("trainer.weight_sync.backend=nccl with "
                          f"trainer.device={cfg.trainer.device!r}: NCCL broadcasts from GPU "
                          "memory; use backend=gloo (or auto) for a CPU trainer")
    if not needs_gpus(cfg):
        return False
    if cfg.launch.gpus_per_node < 1:
        sglang = cfg.rollout.engine.kind == "sglang"
        engine = ("rollout.engine.kind=sglang (without rollout.engine.sglang.device=cpu: "
                  "SGLang on CPU is topology=cpu_sglang)" if sglang
                  else f"rollout.engine.device={cfg.rollout.engine.device!r}")
        which = [*([f"trainer.device={cfg.trainer.device!r}"] if trainer_on_gpu(cfg) else []),
                 *([engine] if engine_on_gpu(cfg) else [])]
        raise ConfigError(f"{' and '.join(which)} need{'s' * (len(which) == 1)} GPUs, and "
                          "torch sees none here (launch.gpus_per_node=0 asks it): check the driver "
                          "(nvidia-smi) and the torch build, or set launch.gpus_per_node=N to plan "
                          "for a machine with N GPUs")
    if (cfg.rollout.engine.kind in ("embedded", "vllm") and engine_on_gpu(cfg)
            and cfg.rollout.engine.device != "cuda"):
        raise ConfigError(f"rollout.engine.device={cfg.rollout.engine.device!r}: each rollout "
                          "server sees only its own GPUs (CUDA_VISIBLE_DEVICES), so the engine "
                          "device is 'cuda'")
    _check_reward_model_device(cfg)
    return True


def _check_reward_model_device(cfg: RunConfig) -> None:
    """On a GPU topology the layout gives the reward model its GPU: a device of the user's cannot
    name one the rollout server sees (it sees only its own, CUDA_VISIBLE_DEVICES)."""
    rm = cfg.task.reward_model
    if rm.enabled and rm.device.startswith("cuda") and not reward_model_on_gpu(cfg):
        where = ("the layout gives each rollout server's reward model a GPU of its own, and the "
                 "server sees only its own GPUs (CUDA_VISIBLE_DEVICES)" if engine_on_gpu(cfg) else
                 "the rollout servers' engines run on the CPU, and the servers see no GPU")
        raise ConfigError(f"task.reward_model.device={rm.device!r} on a GPU topology: {where}; "
                          "set it to auto (the layout's GPU) or cpu")


LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def _check_reachable(cfg: RunConfig) -> None:
    """Several nodes: every address a process of another node dials must not be loopback."""
    keys = [("buffer.address", split_address(cfg.buffer.address)[0]),
            ("buffer.pub_address", split_address(cfg.buffer.pub_address)[0])]
    if cfg.trainer.weight_sync.path in ("auto", "distributed"):
        keys.append(("trainer.weight_sync.master_addr", cfg.trainer.weight_sync.master_addr))
    if cfg.rollout.engine.kind == "url":  # trainer rank 0 drives the engine at its URL
        keys.append(("rollout.engine.url", urlsplit(cfg.rollout.engine.url).hostname or ""))
    for key, host in keys:
        if host.startswith(LOOPBACK) or host in ("0.0.0.0", "*"):
            raise ConfigError(f"{key} host {host!r} with launch.nodes={cfg.launch.nodes}: "
                              "processes on the other nodes cannot reach it; set it to node 0's "
                              "address on the cluster network "
                              "(launch/MULTINODE.md: python -m launch.srun head-ip IFACE)")


def _check_weight_path(cfg: RunConfig, shared: bool) -> None:
    """``tensor`` passes CUDA IPC handles, which only a process on the same GPU can open."""
    path = cfg.trainer.weight_sync.path
    if path == "tensor" and not shared:
        raise ConfigError("trainer.weight_sync.path=tensor with the trainer and the engines on "
                          "different GPUs: a CUDA IPC handle opens only on the GPU it came from; "
                          "use path=auto (distributed)")
    if shared:
        _check_shared(cfg)


def _check_disk_nodes(cfg: RunConfig) -> None:
    """``disk`` (also LoRA's on SGLang) writes to the trainer node's temporary directory."""
    path, nodes = cfg.trainer.weight_sync.path, cfg.launch.nodes
    if nodes > 1 and auto_path(cfg, False) == "disk" and path in ("auto", "disk"):
        kind = cfg.rollout.engine.kind
        raise ConfigError(f"trainer.lora.rank > 0 with rollout.engine.kind={kind} and "
                          f"launch.nodes={nodes}: the adapter reaches the engine as a directory "
                          "the trainer writes on its own node; run the job on one node or use "
                          "rollout.engine.kind=embedded")
    if path == "disk" and nodes > 1:
        raise ConfigError(f"trainer.weight_sync.path=disk with launch.nodes={nodes}: the trainer "
                          "writes to its own node's temporary directory; use path=auto "
                          "(distributed)")


def _check_shared(cfg: RunConfig) -> None:
    """Trainer and engine on one GPU: refuse what cannot work there, naming the key."""
    ws, ec = cfg.trainer.weight_sync, cfg.rollout.engine
    if cfg.trainer.lora.enabled and ec.kind == "embedded" and ws.backend != "gloo":
        raise ConfigError("trainer.lora.rank > 0 with the trainer and the engine on one GPU: the "
                          "adapter goes over the group path only, where NCCL refuses two ranks on "
                          "one GPU; set trainer.weight_sync.backend=gloo (path auto then stays "
                          "distributed)")
    if ws.path == "distributed" and ws.backend != "gloo":
        raise ConfigError("trainer.weight_sync.path=distributed with the trainer and the engine on "
                          "one GPU: NCCL refuses two ranks on one GPU; use path=auto (tensor), "
                          "tensor or disk, or backend=gloo")
    if ec.kind == "vllm" and ws.backend == "nccl" and not cfg.trainer.lora.enabled:
        raise ConfigError("trainer.weight_sync.backend=nccl with rollout.engine.kind=vllm and the "
                          "trainer and the engine on one GPU: vLLM takes weights by the group "
                          "path only, where NCCL refuses two ranks on one GPU; set "
                          "trainer.weight_sync.backend=auto (gloo there) or gloo")
    if ec.kind not in MEMORY_SHARE_FLAGS:
        return
    name, key = MEMORY_SHARE_FLAGS[ec.kind]
    frac = memory_share(ec)
    if frac is not None and not (isinstance(frac, (int, float))
                                 and 0 < frac <= SHARED_MEM_FRACTION_MAX):
        raise ConfigError(f"rollout.engine.{ec.kind}.{key}={frac!r}: with the trainer on the same "
                          f"GPU {name} must leave it room; "
                          f"set it in (0, {SHARED_MEM_FRACTION_MAX}] (e.g. 0.4)")


def memory_share(ec) -> object:
    """The engine's GPU memory share as its flags set it (``MEMORY_SHARE_FLAGS``), or None."""
    flags = MEMORY_SHARE_FLAGS.get(ec.kind)
    return None if flags is None else getattr(ec, ec.kind).get(flags[1])


def auto_path(cfg: RunConfig, shared: bool) -> str:
    """``trainer.weight_sync.path=auto``: with LoRA the engine kind's adapter path
    (``RunConfig.adapter_path``), else ``tensor`` on a shared GPU, else ``distributed``."""
    vllm = cfg.rollout.engine.kind == "vllm"  # vLLM takes whole weights by the group only
    return cfg.adapter_path or ("tensor" if shared and not vllm else "distributed")


def with_weight_path(cfg: RunConfig) -> RunConfig:
    """The config the daemons get on this placement: ``trainer.weight_sync.path=auto`` resolved
    (``auto_path``); on a shared GPU the engine's memory share defaulted and, for vLLM's whole
    weights (the group path only, where NCCL refuses two ranks on one GPU), ``backend=auto``
    gloo."""
    placed = place_nodes(cfg)
    shared = placed is not None and any(n.shared for n in placed)
    ws, ec = cfg.trainer.weight_sync, cfg.rollout.engine
    if ws.path == "auto":
        ws = replace(ws, path=auto_path(cfg, shared))
    if shared and ec.kind == "vllm" and ws.backend == "auto" and ws.path == "distributed":
        ws = replace(ws, backend="gloo")
    cfg = replace(cfg, trainer=replace(cfg.trainer, weight_sync=ws))
    if shared and ec.kind in MEMORY_SHARE_FLAGS and memory_share(ec) is None:
        key = MEMORY_SHARE_FLAGS[ec.kind][1]
        flags = {**getattr(ec, ec.kind), key: SHARED_MEM_FRACTION_DEFAULT}
        cfg = replace(cfg, rollout=replace(cfg.rollout, engine=replace(ec, **{ec.kind: flags})))
    return cfg
