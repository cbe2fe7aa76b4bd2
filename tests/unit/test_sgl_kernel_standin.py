"""The pure-torch sgl_kernel stand-in for SGLang's CPU mode: hand-worked cases and refusals."""

from __future__ import annotations

import pytest
import torch

from rollout_server.sglang_cpu import SGLANG_VERSION, check_sglang_version
from rollout_server.sglang_cpu.sgl_kernel import (
    assign_req_to_token_pool_cpu,
    copy_all_layer_kv_cache_cpu,
)


def test_new_slots_go_to_each_requests_row_back_to_back_and_never_outside_it():
    pool = torch.zeros(4, 8, dtype=torch.int32)
    # request in row 2 gets slots [3, 5) from the first 2 entries; row 0 gets [0, 4) from the next 4
    assign_req_to_token_pool_cpu(torch.tensor([2, 0]), pool, torch.tensor([3, 0]),
                                 torch.tensor([5, 4]), torch.tensor([10, 11, 20, 21, 22, 23]), 8)
    expected = torch.zeros(4, 8, dtype=torch.int32)
    expected[2, 3:5] = torch.tensor([10, 11])
    expected[0, 0:4] = torch.tensor([20, 21, 22, 23])
    assert torch.equal(pool, expected)
    with pytest.raises(ValueError, match=r"slots \[6, 9\) outside a token-pool row of 8"):
        assign_req_to_token_pool_cpu(torch.tensor([0]), torch.zeros(1, 8, dtype=torch.int32),
                                     torch.tensor([6]), torch.tensor([9]), torch.arange(3), 8)


def test_kv_rows_move_in_every_layer_reading_all_before_writing():
    layers = [torch.arange(48, dtype=torch.float32).view(8, 6) + 100 * i for i in range(2)]
    before = [t.clone() for t in layers]
    ptrs = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64)
    strides = torch.tensor([t.stride(0) * t.element_size() for t in layers], dtype=torch.int64)
    # row 2 is written first and read second: a copy row by row would move old row 5 into row 1
    copy_all_layer_kv_cache_cpu(ptrs, strides, torch.tensor([2, 1]), torch.tensor([5, 2]))
    for t, old in zip(layers, before):
        assert torch.equal(t[1], old[2]) and torch.equal(t[2], old[5])
        assert torch.equal(t[[0, 3, 4, 5, 6, 7]], old[[0, 3, 4, 5, 6, 7]])


def test_names_it_does_not_implement_are_refused_by_name():
    import rollout_server.sglang_cpu.sgl_kernel as standin

    with pytest.raises(ImportError, match="rmsnorm_cpu is not provided by the CPU stand-in"):
        standin.rmsnorm_cpu  # noqa: B018
    with pytest.raises(NotImplementedError, match="does not run speculative decoding"):
        standin.verify_tree_greedy_cpu()


def test_another_sglang_release_is_refused_with_the_one_it_was_checked_against():
    check_sglang_version(SGLANG_VERSION)
    with pytest.raises(RuntimeError, match=r"needs sglang==0\.5\.23.*sglang 0\.6\.0 is installed"):
        check_sglang_version("0.6.0")
    with pytest.raises(RuntimeError, match="sglang is not installed.*setup_env.sh"):
        check_sglang_version(None)
