"""Each weight-update group the trainer forms has a name of its own that only its plan carries."""

from __future__ import annotations

import torch

from areal_like.config import WeightSyncConfig
from trainer.weight_sync import GROUP_TOKEN_BYTES, WeightBroadcaster

DEADLINE = 1e12  # monotonic; far away, so each plan carries weight_sync.deadline_s


def test_a_fresh_token_per_group_formation_and_the_same_name_while_the_group_lives():
    b = WeightBroadcaster(WeightSyncConfig(group_name="w"), buffer_address="tcp://127.0.0.1:1", rank=1,
                          device=torch.device("cpu"))  # rank 1: no buffer client is made
    roster = [("s0", 1), ("s1", 2)]
    first = b._make_plan(1, roster, [], DEADLINE)
    prefix, token = first.group_name.split("-")
    assert first.reform and prefix == "w" and len(token) == 2 * GROUP_TOKEN_BYTES and int(token, 16) >= 0
    b._pg, b._group_key = object(), tuple(roster)  # the group formed: the next plans reuse it, and its name
    assert b._make_plan(2, roster, [], DEADLINE).group_name == first.group_name
    b._group_key = (("s0", 1),)  # the roster changed: a new group, a new name nobody has seen
    names = {b._make_plan(v, roster, [], DEADLINE).group_name for v in (3, 4)}  # each unformed plan re-forms
    assert first.group_name not in names and len(names) == 2
    b._pg = None
