"""A weight sync's plan: ``plan_buckets``' pure bucket planning, and the payloads per path."""

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


@pytest.mark.parametrize("sizes, limit, names", [
    ({"a": [10, 10], "b": [100], "c": [200]}, 1000, [["a", "b"], ["c"]]),  # 400, 400, 800 B
    ({"a": [125], "b": [125]}, 1000, [["a", "b"]]),  # an exact fit stays in one bucket
    ({"small": [10], "huge": [1000], "tail": [10]}, 100, [["small"], ["huge"], ["tail"]]),
    ({"s": [], "t": [], "u": [1]}, 8, [["s", "t"], ["u"]]),  # a scalar takes one element: 4 B
    ({}, MB, []),
])
def test_packs_in_order_up_to_the_bucket_size(sizes, limit, names):
    buckets = plan_buckets([(n, s, "float32") for n, s in sizes.items()], limit)
    assert _names(buckets) == names
    assert [b.shapes for b in buckets] == [[sizes[n] for n in group] for group in names]
    assert all(b.dtypes == ["float32"] * len(b.names) for b in buckets)


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


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="complex64"):
        plan_buckets([("x", [2], "complex64")], MB)


def test_plan_travels_as_the_sync_ports_json():
    """As the trainer sends a plan to a rollout server's /adapter."""
    buckets = plan_buckets([("a", [2, 3], "float32"), ("b", [5], "bfloat16")], MB)
    plan = WeightSyncPlan(policy_version=3, group_name="g", master_addr="127.0.0.1",
                          master_port=1234, world_size=2,
                          backend="gloo", reform=True, members=[], buckets=buckets, deadline_s=10.0)
    back = msgspec.json.decode(msgspec.json.encode(msgspec.to_builtins(plan)), type=WeightSyncPlan)
    assert ([(b.names, b.dtypes, b.shapes) for b in back.buckets]
            == [(b.names, b.dtypes, b.shapes) for b in buckets])


def test_weight_sync_plan_payloads_fit_its_path():
    """No ``path``: distributed. A known path takes exactly its payloads (one per bucket, one
    directory, none), else it is refused when built, naming the field."""
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
