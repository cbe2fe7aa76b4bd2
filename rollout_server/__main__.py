"""``python -m rollout_server --config-file RUN_DIR/config.yaml [key=value ...]``

One rollout server owning one engine. On one machine the launcher starts N of them
(``rollout.server_id=rollout-i rollout.metrics_port=...``); on GPU nodes start one per SGLang
server with ``rollout.engine.kind=sglang`` or ``vllm`` (launch it) or ``kind=url`` (attach to a
running SGLang).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from areal_like.daemon import exit_process, setup_logging
from areal_like.settings.config import ConfigError, load_daemon_config


def main(argv: list[str]) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported (embedded engine)
    try:
        cfg = load_daemon_config(argv, addresses=("rollout.buffer_address", "rollout.pub_address"))
    except ConfigError as e:
        setup_logging("rollout").error("invalid configuration: %s", e)
        return 2
    log = setup_logging(f"rollout:{cfg.rollout.server_id or 'rollout'}")
    from areal_like.net import security

    try:
        keys = security.setup(cfg, "rollout", log)  # once: every socket is given them
        from rollout_server import sandbox
        from rollout_server.server import RolloutServer

        server = RolloutServer.from_run(cfg, keys)  # reads the engine API key's file
    except security.SecurityError as e:
        log.error("%s", e)
        return 2
    sandbox.hide(private_dirs(cfg))  # before any reward or tool worker starts
    return server.serve()


def private_dirs(cfg) -> list:
    """What reward and tool code must not read: the job's keys (where ``security.keys_dir`` says,
    and the run directory's own, which a shared run directory holds beside a node's copy), its
    secrets (the engine API key) and its same-node socket directory (a process of the job's user
    there is a member)."""
    from areal_like.net.auth import KEY_FILE
    from areal_like.settings.config import SecurityConfig

    dirs = [cfg.resolve_path(cfg.security.keys_dir), cfg.resolve_path(SecurityConfig.keys_dir),
            cfg.resolve_path(str(KEY_FILE.parent))]
    if cfg.buffer.local_dir:
        dirs.append(cfg.resolve_path(cfg.buffer.local_dir))
    for address in (cfg.rollout.buffer_address, cfg.rollout.pub_address):
        if address.startswith("ipc://"):
            dirs.append(Path(address[len("ipc://"):]).parent)
    return dirs


if __name__ == "__main__":
    # Everything is stopped and flushed; skip interpreter teardown, which spends seconds
    # finalising torch/transformers on a loaded machine and would eat the launcher's stop grace.
    exit_process(main(sys.argv[1:]))
