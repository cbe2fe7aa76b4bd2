"""The group store: what has been generated and not yet handed to the trainer. No I/O.

Invariants: ``take_stored(n, v)`` returns exactly ``n`` groups, all fresh at ``v`` (checked again
by ``StalenessPolicy.check_batch``), or None and changes nothing; nothing is dropped silently.
Groups are indexed by head version, so selection and the stale sweep touch only what they return."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from areal_like.wire.protocol import TrajectoryGroup
from buffer.staleness import StalenessPolicy


@dataclass(slots=True)
class StoredGroup:
    """A stored group's bookkeeping and where to read the group back (its frame stays on disk)."""
    group_id: str
    prompt_index: int
    epoch: int
    head_version: int
    nbytes: int  # size of its wire frame
    ref: object = None  # an opaque location the owner reads the frame back from (a ``WalRef``)


class ReplayBuffer:
    def __init__(self, policy: StalenessPolicy, *, capacity: int, selection: str = "oldest",
                 filter_equal_rewards: bool = False, max_tokens_per_trajectory: int = 0):
        self.policy, self.capacity, self.selection = policy, capacity, selection
        self.filter_equal_rewards = filter_equal_rewards
        self.max_tokens_per_trajectory = max_tokens_per_trajectory
        self._groups: dict[str, StoredGroup] = {}  # insertion order = arrival order (fifo)
        self._by_version: dict[int, dict[str, None]] = {}  # head version -> ids (ordered sets)
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, group_id: str) -> bool:
        return group_id in self._groups

    def groups(self) -> list[StoredGroup]:
        return list(self._groups.values())

    def free_slots(self, in_flight: int) -> int:
        """Groups that may still be admitted: stored and in-flight groups both hold space."""
        return max(0, self.capacity - len(self._groups) - in_flight)

    def filter_reason(self, group: TrajectoryGroup) -> str | None:
        """Why a group should not be stored (None: keep it)."""
        limit = self.max_tokens_per_trajectory
        if limit and any(t.n_tokens > limit for t in group.trajectories):
            return "max_tokens"
        # One sample has no group baseline to compare against; the DAPO filter needs >= 2.
        rewards = [t.reward for t in group.trajectories]
        if self.filter_equal_rewards and len(rewards) > 1 and min(rewards) == max(rewards):
            return "equal_rewards"
        return None

    def add(self, group: TrajectoryGroup, nbytes: int = 0, head_version: int | None = None,
            ref: object = None) -> bool:
        """Store a group's bookkeeping (False if one with its id is stored)."""
        head = group.head_version if head_version is None else head_version
        return self.put(StoredGroup(group.group_id, group.prompt_index, group.epoch, head, nbytes,
                                    ref))

    def put(self, stored: StoredGroup) -> bool:
        gid = stored.group_id
        if gid in self._groups:
            return False
        self._groups[gid] = stored
        self._by_version.setdefault(stored.head_version, {})[gid] = None
        self.nbytes += stored.nbytes
        return True

    def pop(self, group_id: str) -> StoredGroup | None:
        stored = self._groups.pop(group_id, None)
        if stored is None:
            return None
        bucket = self._by_version[stored.head_version]
        del bucket[group_id]
        if not bucket:
            del self._by_version[stored.head_version]
        self.nbytes -= stored.nbytes
        return stored

    def n_fresh(self, trainer_version: int) -> int:
        oldest = self.policy.min_fresh_version(trainer_version)
        return sum(len(ids) for v, ids in self._by_version.items() if v >= oldest)

    def drop_stale(self, trainer_version: int) -> list[StoredGroup]:
        """Remove and return every group too old to ever be trained on at ``trainer_version``."""
        oldest = self.policy.min_fresh_version(trainer_version)
        stale_ids = [gid for v, ids in self._by_version.items() if v < oldest for gid in ids]
        return [self.pop(gid) for gid in stale_ids]

    def take_stored(self, n_groups: int, trainer_version: int,
                    max_bytes: int = 0) -> list[StoredGroup] | None:
        """Exactly ``n_groups`` fresh groups in selection order, each with its bookkeeping (to
        ``put`` it back if need be), or None (nothing removed). With ``max_bytes``, also None when
        their frames add up to more (a reply must fit in one frame)."""
        if n_groups < 1 or self.n_fresh(trainer_version) < n_groups:
            return None
        oldest = self.policy.min_fresh_version(trainer_version)
        if self.selection == "fifo":
            order = (gid for gid, s in self._groups.items() if s.head_version >= oldest)
        else:
            versions = sorted((v for v in self._by_version if v >= oldest),
                              reverse=self.selection == "newest")
            order = (gid for v in versions for gid in self._by_version[v])
        chosen = list(islice(order, n_groups))
        if max_bytes and sum(self._groups[gid].nbytes for gid in chosen) > max_bytes:
            return None
        self.policy.check_batch((self._groups[gid].head_version for gid in chosen), trainer_version)
        return [self.pop(gid) for gid in chosen]
