"""Entry point: ``python -m trainer --config-file P [key=value ...]`` (one process) or
``torchrun --nproc-per-node K -m trainer --config-file P [key=value ...]`` (K FSDP2 ranks).

Without ``--config-file`` the Hydra tree in ``configs/`` is composed with the overrides.
"""

import os
import sys

# before torch is imported: intra-op threads only oversubscribe
os.environ.setdefault("OMP_NUM_THREADS", "1")

from areal_like.daemon import exit_process, setup_logging  # noqa: E402
from areal_like.settings.config import ConfigError, load_daemon_config  # noqa: E402


def main(argv: list[str]) -> int:
    rank = os.environ.get("RANK", "0")
    log = setup_logging(f"trainer-{rank}")
    try:
        cfg = load_daemon_config(argv, addresses=("trainer.buffer_address",))
    except ConfigError as e:
        log.error("invalid configuration: %s", e)
        return 2
    from areal_like.net import security

    try:
        # rank 0's buffer clients: the other ranks open none, so their nodes hold no client key
        keys = security.setup(cfg, "trainer", log) if rank == "0" else None
        from trainer.loop import train

        return train(cfg, keys)  # raises one only before it serves: the engine API key's file
    except security.SecurityError as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    # The trainer is stopped and its records written: the launcher (torchrun's agent, or `run`
    # for one rank) sees the exit at once instead of after the interpreter's teardown.
    exit_process(main(sys.argv[1:]))
