"""A weight sync's plan (areal_like/weights/plan.py): ``plan_buckets``, pure bucket planning for
the weight broadcast, and the payloads a plan takes per path."""

from __future__ import annotations

import math

import msgspec
import pytest

from areal_like.weights.plan import BucketSpec, WeightSyncPlan, plan_buckets
from areal_like.wire.codec import ProtocolError

MB = 1024 * 1024
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}  # the dtypes these tests plan


def bucket_nbytes(b) -> int:
    """The payload of a planned bucket, computed here independently of the planner."""
    return sum(ITEMSIZE[d] * math.prod(s) for d, s in zip(b.dtypes, b.shapes))


def _names(buckets):
    return [b.names for b in buckets]


def test_packs_in_order_up_to_the_bucket_size():
    # float32: 4 bytes per element. a, b = 400 B each, c = 800 B; bucket 1000 B.
    specs = [("a", [10, 10], "float32"), ("b", [100], "float32"), ("c", [200], "float32")]
    buckets = plan_buckets(specs, 1000)
    assert _names(buckets) == [["a", "b"], ["c"]]
    assert [bucket_nbytes(b) for b in buckets] == [800, 800]
    assert buckets[0].shapes == [[10, 10], [100]] and buckets[0].dtypes == ["float32", "float32"]


def test_exact_fit_stays_in_one_bucket():
    buckets = plan_buckets([("a", [125], "float32"), ("b", [125], "float32")], 1000)
    assert _names(buckets) == [["a", "b"]]


def test_a_tensor_larger_than_a_bucket_gets_its_own():
    specs = [("small", [10], "float32"), ("huge", [1000], "float32"), ("tail", [10], "float32")]
    assert _names(plan_buckets(specs, 100)) == [["small"], ["huge"], ["tail"]]


def test_dtype_grouped_in_first_appearance_order_and_stable_within_dtype():
    specs = [("w1", [4], "bfloat16"), ("n1", [4], "float32"), ("w2", [4], "bfloat16"),
             ("n2", [4], "float32")]
    buckets = plan_buckets(specs, MB)
    assert _names(buckets) == [["w1", "w2"], ["n1", "n2"]]
    assert [set(b.dtypes) for b in buckets] == [{"bfloat16"}, {"float32"}]
    assert bucket_nbytes(buckets[0]) == 16 and bucket_nbytes(buckets[1]) == 32


def test_every_tensor_exactly_once_and_deterministic():
    specs = [(f"layer{i}.w", [i + 1, 7], "float32" if i % 3 else "bfloat16") for i in range(50)]
    a, b = plan_buckets(specs, 300), plan_buckets(list(specs), 300)
    flat = [n for bucket in a for n in bucket.names]
    assert sorted(flat) == sorted(n for n, _, _ in specs) and len(flat) == len(specs)
    assert _names(a) == _names(b)
    for bucket in a:  # no bucket over the limit unless it holds a single oversized tensor
        assert bucket_nbytes(bucket) <= 300 or len(bucket.names) == 1


def test_empty_and_scalars():
    assert plan_buckets([], MB) == []
    buckets = plan_buckets([("s", [], "float32")], MB)
    assert buckets[0].shapes == [[]] and bucket_nbytes(buckets[0]) == 4


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="complex64"):
        plan_buckets([("x", [2], "complex64")], MB)


def test_plan_travels_as_the_sync_ports_json():
    """As the trainer sends a plan to a rollout server's /adapter (rollout_server/sync_port.py)."""
    buckets = plan_buckets([("a", [2, 3], "float32"), ("b", [5], "bfloat16")], MB)
    plan = WeightSyncPlan(policy_version=3, group_name="g", master_addr="127.0.0.1",
                          master_port=1234, world_size=2,
                          backend="gloo", reform=True, members=[], buckets=buckets, deadline_s=10.0)
    back = msgspec.json.decode(msgspec.json.encode(msgspec.to_builtins(plan)), type=WeightSyncPlan)
    assert ([(b.names, b.dtypes, b.shapes) for b in back.buckets]
            == [(b.names, b.dtypes, b.shapes) for b in buckets])


def test_weight_sync_plan_payloads_fit_its_path():
    """A plan (built in the trainer's process, trainer/weight_sync.py; never on the wire) without
    ``path`` is a distributed one. A known path takes exactly its payloads (one per bucket, one
    directory, none), else it is refused when built, naming the field; an unknown path is built,
    and the engine side fails that member's sync naming it (areal_like/weights/push.py)."""
    bucket = BucketSpec(names=["w"], dtypes=["float32"], shapes=[[2]])
    plan = WeightSyncPlan(policy_version=1, group_name="g", master_addr="h", master_port=1,
                          world_size=2, backend="gloo", reform=False, members=[],
                          buckets=[bucket, bucket], deadline_s=5.0)
    assert (plan.path, plan.payloads) == ("distributed", [])
    for path, payloads in (("tensor", ["a", "b"]), ("disk", ["/d"]), ("shm", ["x"])):
        built = msgspec.structs.replace(plan, path=path, payloads=payloads)
        assert (built.path, built.payloads) == (path, payloads)
    for path, payloads in (("tensor", ["a"]), ("disk", []), ("disk", ["/d", "/e"]),
                           ("distributed", ["x"])):
        with pytest.raises(ProtocolError) as info:
            msgspec.structs.replace(plan, path=path, payloads=payloads)
        assert info.value.field == "payloads" and f"path {path} needs" in str(info.value)
