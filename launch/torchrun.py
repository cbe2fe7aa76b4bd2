"""``python -m launch.torchrun [torchrun's arguments]``: torchrun (``torch.distributed.run``) that
exits with the status of its first failed rank (1 for one killed by a signal), in one line
instead of a traceback.

torchrun itself exits 1 with a ChildFailedError traceback whatever its ranks did, so a trainer rank
that refused its settings or inputs (exit 2, ``areal_like/daemon.py``) looked like a crash:
``areal-like run`` restarted it (``launch/local.py`` does not restart exit 2) and ``areal-like
train`` exited 1. A SIGTERM or SIGINT (its ranks stop gracefully) is one line and 128 + the signal.
A bad value of torchrun's own flags (``--nproc-per-node abc``, ``--nnodes 0``) is one ``error:``
line naming the flag and exit 2, before anything starts (torchrun printed its usage or a
traceback). Used for every trainer of several ranks and by ``areal-like train``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    parser.error = _refuse  # one line, not torchrun's usage of 60
    args = parser.parse_args(argv)
    bad = _bad_flag(args)
    if bad:
        _refuse(bad)
    try:
        run(args)
    except SignalException as e:  # SIGTERM/SIGINT: torchrun stopped its ranks the same way
        print(f"torchrun: stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + e.sigval
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"torchrun: rank {rank} of {e.name} exited with {failure.exitcode} (its log above "
              "says why)", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1  # < 0: killed by a signal
    return 0


def _refuse(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _bad_flag(args) -> str | None:
    """What is wrong with torchrun's own flags, naming the flag; None when nothing: torchrun takes
    them as they are and fails later with a ValueError or AssertionError traceback."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    try:
        low, high = parse_min_max_nnodes(args.nnodes)
    except (ValueError, RuntimeError):
        low = high = 0
    if not 0 < low <= high:
        return f"argument --nnodes: {args.nnodes!r} is not a number of nodes >= 1 or MIN:MAX"
    try:
        nproc = determine_local_world_size(args.nproc_per_node)
    except ValueError as e:
        return f"argument --nproc-per-node: {args.nproc_per_node!r}: {e}"
    if nproc < 1:
        return f"argument --nproc-per-node: {args.nproc_per_node!r} is not a count >= 1"
    for flag, value, top in (("--node-rank", args.node_rank, high - 1),
                             ("--master-port", args.master_port, 65535),
                             ("--max-restarts", args.max_restarts, None)):
        if value is not None and not 0 <= value <= (value if top is None else top):
            return f"argument {flag}: {value} is not " + (">= 0" if top is None else f"in 0..{top}")
    return None


if __name__ == "__main__":
    sys.exit(main())
