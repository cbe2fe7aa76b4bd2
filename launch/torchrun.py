"""``python -m launch.torchrun [torchrun's arguments]``: torchrun (``torch.distributed.run``) that
exits with the status of its first failed rank, in one line instead of a traceback.

torchrun itself exits 1 with a ChildFailedError traceback whatever its ranks did, so a trainer rank
that refused its settings or inputs (exit 2, ``areal_like/daemon.py``) looked like a crash:
``areal-like run`` restarted it (``launch/local.py`` does not restart exit 2) and ``areal-like
train`` exited 1. A SIGTERM or SIGINT (its ranks stop gracefully) is one line and 128 + the signal.
Used for every trainer of several ranks and by ``areal-like train``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except SignalException as e:  # SIGTERM/SIGINT: torchrun stopped its ranks the same way
        print(f"torchrun: stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + e.sigval
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"torchrun: rank {rank} of {e.name} exited with {failure.exitcode} (its log above "
              "says why)", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1  # < 0: killed by a signal
    return 0


if __name__ == "__main__":
    sys.exit(main())
