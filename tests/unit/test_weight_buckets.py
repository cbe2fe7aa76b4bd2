"""The flattened-bucket wire format (areal_like/wire/weight_wire.py: packing and the layout both
sides read): hand-computed bytes; the staging pipeline's buffer reuse
(trainer/weight_buckets.py)."""

from __future__ import annotations

import struct

import pytest
import torch

from areal_like.net.distributed import destroy_weight_group, free_port, init_weight_group
from areal_like.wire.weight_wire import layout, pack, unpack
from trainer.weight_buckets import BucketPipeline


def test_pack_is_each_tensors_bytes_back_to_back_in_logical_order():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # row-major: 1, 2, 3, 4
    b = torch.tensor([-0.5])
    out = torch.full((64,), 7, dtype=torch.uint8)
    flat = pack([a, b], out)
    assert flat.numel() == 20 and flat.data_ptr() == out.data_ptr()
    assert bytes(flat.tolist()) == struct.pack("<5f", 1.0, 2.0, 3.0, 4.0, -0.5)
    assert out[20:].eq(7).all()  # nothing written past the bucket
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).t()  # logical rows: (1, 3), (2, 4)
    flat = pack([t], torch.empty(16, dtype=torch.uint8))
    assert bytes(flat.tolist()) == struct.pack("<4f", 1.0, 3.0, 2.0, 4.0)
    one = torch.tensor([1.0], dtype=torch.bfloat16)  # bf16 1.0 = 0x3F80, little-endian
    assert pack([one], torch.empty(2, dtype=torch.uint8)).tolist() == [0x80, 0x3F]


def test_engine_layout_matches_the_packing_and_refuses_misalignment():
    tensor_layout, nbytes = layout(["w", "b"], ["float32", "float32"], [[2, 2], [1]])
    assert nbytes == 20 and [(n, off) for n, _, _, off in tensor_layout] == [("w", 0), ("b", 16)]
    flat = pack([torch.arange(4.0).view(2, 2), torch.tensor([9.0])],
                torch.empty(20, dtype=torch.uint8))
    views = unpack(flat, tensor_layout)
    assert views["b"].tolist() == [9.0] and views["w"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    with pytest.raises(ValueError, match="unaligned"):  # 2 bytes of fp16, then fp32 at offset 2
        layout(["h", "f"], ["float16", "float32"], [[1], [1]])
    with pytest.raises(ValueError, match="empty"):
        layout([], [], [])


def test_pipeline_packs_the_next_bucket_while_one_is_on_the_wire():
    pg = init_weight_group("gloo", "127.0.0.1", free_port(), 1, 0, "unit_pipeline", 30.0,
                           key="the-jobs-engine-key")
    waited = []
    try:
        pipe = BucketPipeline(wait=lambda w: (w.wait(), waited.append(w)))
        buckets = [[torch.full((4,), float(i))] for i in range(4)]
        pipe.stage(buckets[0])
        # both staging buffers packed before anything is sent (before the plan)
        pipe.stage(buckets[1])
        first = pipe._staging[0].data_ptr()
        assert pipe.staged == 2 and pipe._staging[1].data_ptr() != first
        with pytest.raises(RuntimeError):
            pipe.stage(buckets[2])  # no free staging buffer
        pipe.launch(pg)
        assert waited == []
        pipe.launch(pg)  # one broadcast at a time: bucket 0 completes first
        assert len(waited) == 1 and pipe.staged == 0
        pipe.send(buckets[2], pg)  # back to the first buffer (bucket 0 is done); waits for bucket 1
        assert len(waited) == 2 and pipe._staging[0].data_ptr() == first
        assert pipe._staging[0][:16].view(torch.float32).tolist() == [2.0] * 4
        pipe.send(buckets[3], pg)
        pipe.finish()
        assert len(waited) == 4
        pipe.finish()  # nothing in flight: no wait
        assert len(waited) == 4
    finally:
        destroy_weight_group(pg)
