"""A weight-transfer engine for vLLM that joins the trainer's own weight group, plugged into
vLLM's weight-transfer API.

vLLM 0.32 transfers a trainer's weights through a ``WeightTransferEngine`` its workers make from
``--weight-transfer-config`` (``/init_weight_transfer_engine``, ``/start_weight_update``,
``/update_weights``, ``/finish_weight_update``); its built-in backends need CUDA (``nccl``: NCCL
broadcasts on a CUDA stream; ``ipc``: CUDA IPC handles) and a trainer speaking vLLM's own
rendezvous (its stateless group and NCCL communicator), which the project's trainer does not. The
nearest path on CPU is the trainer's group broadcast over gloo, which this engine is: registered
as backend ``gloo`` by ``register``, a ``vllm.general_plugins`` entry point (pyproject.toml) that
vLLM runs in every process it starts, and chosen by the launch (rollout_server/launch_vllm.py).
On a GPU the same engine, registered as ``areal_nccl`` too (``BACKENDS``), joins the trainer's
group of the plan's backend: NCCL (received into the worker's device), or gloo (received on the
CPU, then loaded); planned for topology=gpu_vllm, not run here (no GPU).

It receives exactly what the trainer's ``GroupSender`` sends to SGLang (trainer/WEIGHT_SYNC.md):
the worker joins the job's weight group as rank ``rank_offset + its TP rank`` through the door its
rollout server opened (``join_through_door``); each bucket is ONE uint8 broadcast from group rank
0 (``load_format`` ``flattened_bucket``, areal_like/wire/weight_wire.py) or one broadcast per
tensor, loaded by the model's own ``load_weights`` (checkpoint names). Imported only in vLLM's
processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from areal_like.net.distributed import destroy_weight_group, join_through_door
from areal_like.wire.weight_wire import FLATTENED, layout, torch_dtype, unpack

BACKEND = "gloo"
BACKENDS = ("gloo", "areal_nccl")  # the names it is registered under (launch_vllm picks one)
JOIN_TIMEOUT_S = 600.0  # every wait of the group (the trainer bounds the sync by its deadline)


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str  # 127.0.0.1: the rollout server's door
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str = BACKEND


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    load_format: str | None = None


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False
    group = None
    on = torch.device("cpu")  # where the buckets are received: the worker's device with NCCL

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        """Join the group of the plan's backend: gloo receives on the CPU (and loads into the
        model wherever it is), NCCL into the worker's device."""
        if init_info.backend not in ("gloo", "nccl"):
            raise ValueError(f"the {self.config.backend} weight-transfer engine joins gloo or "
                             f"nccl groups, not {init_info.backend!r}")
        self.shutdown()  # a new formation replaces the last one
        rank = init_info.rank_offset + self.parallel_config.rank
        self.group = join_through_door(init_info.backend, init_info.master_port,
                                       init_info.world_size, rank, init_info.group_name,
                                       JOIN_TIMEOUT_S)
        self.on = torch.device("cpu") if init_info.backend == "gloo" else self.device

    def start_weight_update(self) -> None:
        """vLLM's layerwise reload of checkpoint-format weights, as its ``nccl`` engine: the
        model's parameters as ``load_weights`` takes them (a CPU model's are processed after its
        first load and have lost their loaders)."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        """Every bucket is loaded: vLLM processes the weights as after a load from disk."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("no weight group: call /init_weight_transfer_engine first")
        info = update_info
        if info.load_format == FLATTENED:
            tensor_layout, size = layout(info.names, info.dtype_names, info.shapes)
            flat = torch.empty(size, dtype=torch.uint8, device=self.on)
            dist.broadcast(flat, group_src=0, group=self.group)
            named = list(unpack(flat, tensor_layout).items())
        else:
            named = []
            for name, dtype, shape in zip(info.names, info.dtype_names, info.shapes):
                tensor = torch.empty(shape, dtype=torch_dtype(dtype), device=self.on)
                dist.broadcast(tensor, group_src=0, group=self.group)
                named.append((name, tensor))
        self.model.load_weights(weights=named)

    def shutdown(self) -> None:
        if self.group is not None:
            destroy_weight_group(self.group)
            self.group = None


def register() -> None:
    """The ``vllm.general_plugins`` entry point: ``BACKENDS`` in vLLM's registry (once per
    process)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    for name in BACKENDS:
        try:
            WeightTransferEngineFactory.register_engine(name, GlooWeightTransferEngine)
        except ValueError:  # registered already (vLLM loads its plugins more than once a process)
            pass
