"""Host-to-device copies of a step's small inputs that never wait for the device.

``torch.tensor(values, device="cuda")`` copies from pageable memory and synchronizes the stream:
made after a forward pass is queued, it waits for that pass. Staged through pinned memory with
``non_blocking=True`` the copy is queued behind the work already there (the caching host allocator
keeps the pinned block until the copy is done), so the decode loop's only wait on the device is
the one read of the step's tokens (ENGINE.md, "One read of the device per step").
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device`` without a host wait."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
