"""Each weight-update group the trainer forms has a name of its own that only its plan carries."""

from __future__ import annotations

from areal_like.settings.config import WeightSyncConfig
from trainer.weight_group import GROUP_TOKEN_BYTES, WeightGroup


def test_a_fresh_token_per_group_formation_and_the_same_name_while_the_group_lives():
    g = WeightGroup(WeightSyncConfig(group_name="w"), "gloo")
    key = (("s0", 1), ("s1", 2))
    assert g.reserve(key)  # no group yet: the plan re-forms
    first = g.name
    prefix, token = first.split("-")
    assert prefix == "w" and len(token) == 2 * GROUP_TOKEN_BYTES and int(token, 16) >= 0
    g.pg, g.key = object(), key  # the group formed: the next plans reuse it, and its name
    assert not g.reserve(key) and g.name == first
    g.forget_members()  # a member missed a version: a new group, a new name nobody has seen
    names = set()
    for _ in range(2):  # each unformed plan re-forms
        assert g.reserve(key)
        names.add(g.name)
    assert first not in names and len(names) == 2
    g.pg = None
