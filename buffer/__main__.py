"""``python -m buffer [--config-file PATH] [key=value ...]``: run the buffer daemon.

The launcher passes the resolved run config (``<run_dir>/config.yaml``); overrides such as
``buffer.metrics_port=9100`` apply on top. The WAL lives in ``buffer.wal_dir`` (relative to
``run_dir``); restarting with the same run_dir resumes from it. Exit status 2: invalid
configuration or missing keys; 3: another buffer holds that WAL directory (one buffer per
``wal_dir``).
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    from areal_like.daemon import setup_logging
    from areal_like.net import security
    from areal_like.settings.config import ConfigError, load_daemon_config
    from buffer.service import BufferService
    from buffer.wal import WalInUse

    log = setup_logging("buffer")
    try:
        cfg = load_daemon_config(sys.argv[1:] if argv is None else argv,
                                 addresses=("buffer.address", "buffer.pub_address"))
    except ConfigError as e:
        log.error("invalid configuration: %s", e)
        return 2
    try:
        keys = security.setup(cfg, security.SERVER, log)  # once: every socket is given them
    except security.SecurityError as e:
        log.error("%s", e)
        return 2
    try:
        service = BufferService.from_run(cfg, keys=keys)
    except WalInUse as e:
        log.error("%s", e)
        return 3
    # an input the preflight of `areal-like run` would have refused (a bad row)
    except ConfigError as e:
        log.error("unusable input: %s", e)
        return 2
    return service.serve()


if __name__ == "__main__":
    sys.exit(main())
