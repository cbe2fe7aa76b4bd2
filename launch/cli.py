"""``areal-like``: the command users type (``areal-like --help``; the README's table of commands).

A bad configuration, an unusable input (preflight) or a finished ``run_dir`` prints ``error:``
lines and exits 2 before anything starts. ``--help`` is fast: each command imports what it needs
when it runs, and the daemons and one-shot tools run as their own processes (``python -m
buffer``, ``python -m trainer.export``), never imported here.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

# torchrun's flags that take a value, spelled with dashes (torchrun also takes underscores)
TORCHRUN_FLAGS_WITH_VALUE = {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr",
                             "--master-port", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
                             "--max-restarts", "--local-addr", "--log-dir"}


# commands that hand every argument to ``python -m module`` (``main`` execs it; train under
# torchrun); argparse only shows their help: command -> (module, help, help of the arguments,
# more ``add_parser`` keywords)
PASS_THROUGH = {
    "buffer": ("buffer", "run one buffer daemon in the foreground",
               "[--config-file PATH] Hydra overrides", {}),
    "rollout": ("rollout_server", "run one rollout server in the foreground",
                "[--config-file PATH] Hydra overrides", {}),
    "train": ("trainer", "run the trainer under torchrun (torchrun flags pass through)",
              "[torchrun flags] [--config-file PATH] overrides",
              {"description": "torchrun flags (--nproc-per-node, --nnodes, --node-rank, "
                              "--master-addr, --master-port, --rdzv-*, --log-dir: default with "
                              "--config-file <run_dir>/logs/torchrun) pass through; the rest are "
                              "Hydra overrides."}),
    "eval": ("rollout_server.evaluate",
             "evaluate an HF model directory or a trainer checkpoint on the eval split",
             "MODEL [--config-file F] [--out FILE] [--samples FILE] [overrides]", {}),
    "export": ("trainer.export", "convert a trainer checkpoint into a Hugging Face model directory",
               "CHECKPOINT OUT [options]",
               {"usage": "areal-like export CHECKPOINT OUT [--config-file FILE] [--shard-mb N] "
                         "[--dtype float32|bfloat16|float16]",
                "description": "Convert a trainer checkpoint into a Hugging Face model directory: "
                               "loads the DCP checkpoint (<run_dir>/checkpoints/v<version>, or the "
                               "checkpoints directory for its newest) on one process and writes "
                               "config, safetensors shards, tokenizer and generation config into "
                               "OUT (which must not exist). The run's config defaults to "
                               "<run_dir>/config.yaml; --shard-mb and --dtype to export.shard_mb "
                               "and model.dtype."}),
}
# commands that take Hydra overrides only: command -> (help, description)
OVERRIDES_ONLY = {
    "plan": ("print where `run` would put every process (GPUs, ports) and a GPU job's memory per "
             "GPU; starts nothing",
             "One line per process of `areal-like run` with the same overrides: node, name, GPUs "
             "(its CUDA_VISIBLE_DEVICES) and ports and addresses; a port the config leaves at 0 "
             "shows as 'auto' (run picks it when it starts). A layout that does not fit the GPUs "
             "is refused (exit 2). A GPU job's layout is followed, after a blank line, by its "
             "memory estimate per GPU against launch.gpu_memory_gb (launch/GPU.md). Inputs are "
             "not checked (`areal-like config` does that)."),
    "config": ("print the resolved config as YAML (for --config-file on every node)", None),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="areal-like",
                                description="Asynchronous streaming RL for LLM post-training.",
                                epilog="Overrides are Hydra's key=value, e.g. "
                                       "experiment=quickstart trainer.lr=1e-4")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the whole job on this machine")
    run.add_argument("-q", "--quiet", action="store_true",
                     help="do not echo daemon logs (they stay in run_dir/logs); a failed job still "
                          "prints why")
    run.add_argument("--accept-changes", action="store_true",
                     help="resume a run_dir although settings differ from its settings.yaml "
                          "(they are listed)")
    run.add_argument("overrides", nargs="*", help="Hydra overrides")
    sft = sub.add_parser("sft", help="supervised fine-tuning of the model (the usual first stage "
                                     "before RL)",
                         description="Trains warm_start.steps steps of cross-entropy on the "
                                     "answers of the task (or of warm_start.dataset_path: chat "
                                     "messages or prompt and answer columns) on one process, or "
                                     "K ranks with --nproc-per-node, and writes a Hugging Face "
                                     "model directory. Without --out it "
                                     "goes to the warm-start cache, which `areal-like run` with "
                                     "the same overrides then starts from. Prints one JSON line: "
                                     "steps, loss_first, loss_last, model, greedy_acc.")
    sft.add_argument("--out", help="the model directory to write (must not exist)")
    sft.add_argument("--nproc-per-node", type=int, default=1, metavar="K",
                     help="train on K ranks of this machine (torchrun, FSDP2), as `train` does")
    sft.add_argument("overrides", nargs="*", help="Hydra overrides, as for run")
    for name, (_, help_, args_help, more) in PASS_THROUGH.items():
        sub.add_parser(name, help=help_, **more).add_argument("args", nargs=argparse.REMAINDER,
                                                              help=args_help)
    for name, (help_, description) in OVERRIDES_ONLY.items():
        sub.add_parser(name, help=help_, description=description).add_argument(
            "overrides", nargs="*", help="Hydra overrides")
    _run_dir_commands(sub)
    return p


def _run_dir_commands(sub) -> None:
    """The commands that read or prepare a run directory."""
    tk = sub.add_parser("track", help="feed a run's metrics, evals and samples to its trackers "
                                      "(cfg.tracker)",
                        description="Tails RUN_DIR's metrics/trainer.jsonl, eval.jsonl and "
                                    "samples.jsonl into the trackers of RUN_DIR/config.yaml "
                                    "(overrides apply on top, e.g. 'tracker=[wandb]') until the "
                                    "job is over (the trainer's done record and the final "
                                    "evaluation) or Ctrl-C. For jobs not started "
                                    "by `areal-like run` (which does this itself).")
    tk.add_argument("run_dir", help="run directory (holds config.yaml)")
    tk.add_argument("--once", action="store_true", help="forward what is there now, then exit")
    tk.add_argument("overrides", nargs="*", help="Hydra overrides on top of RUN_DIR/config.yaml")
    ky = sub.add_parser("keys", help="make a job's CURVE keys (buffer keypair, client keypairs, "
                                     "allow-list)",
                        description="Writes the buffer's keypair and one keypair per kind of "
                                    "client (rollout, trainer) into RUN_DIR/keys (mode 0600 files "
                                    "in a 0700 directory); keys that exist are kept. Every node of "
                                    "the job needs this directory (security.keys_dir; "
                                    "launch/MULTINODE.md); and the engine API key, in "
                                    "RUN_DIR/secrets/engine_api_key. `areal-like run` makes them "
                                    "itself.")
    ky.add_argument("run_dir", help="run directory (the keys go to RUN_DIR/keys unless --keys-dir)")
    ky.add_argument("--keys-dir",
                    help="where to write the keys instead (pass it as security.keys_dir)")
    sc = sub.add_parser("scale", help="resize the rollout or trainer pool of a running job",
                        description="Asks the `areal-like run` of RUN_DIR for N rollout servers "
                                    "(added, or the highest-numbered leave: their leases go back) "
                                    "or N trainer ranks (the trainer saves a checkpoint and "
                                    "restarts on N ranks from it), and waits until it is done. "
                                    "launch/OPERATIONS.md, \"Resizing a running job\".")
    sc.add_argument("run_dir", help="run directory of a running job")
    sc.add_argument("size", nargs="+", metavar="POOL=N", help="rollout=N or trainer=N")
    sc.add_argument("--timeout", type=float, default=600.0,
                    help="seconds to wait for the job to apply it (exit 1 after)")
    for name, help_ in (("top", "live terminal view of a running job"),
                        ("status", "health of every daemon"),
                        ("stop", "stop a job as Ctrl-C does, and wait until it has stopped")):
        t = sub.add_parser(name, help=help_)
        t.add_argument("run_dir", nargs="?",
                       help="run directory (default: the newest under ./runs)")
        if name == "stop":
            t.add_argument("--timeout", type=float, default=120.0,
                           help="seconds to wait for every process of the job (exit 1 after)")
        if name == "top":
            t.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes")
            t.add_argument("--once", action="store_true",
                           help="print one plain table (rates over one interval) and exit; without "
                                "a terminal top prints plain tables anyway")


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(sys.argv[1:] if argv is None else list(argv))
        sys.stdout.flush()  # here, not at exit, where a closed pipe is an "Exception ignored"
        return code
    except BrokenPipeError:  # `areal-like plan | head -3`: the reader left, nothing to tell it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush
        return 128 + 13  # as a command killed by SIGPIPE


def _main(argv: list[str]) -> int:
    if argv and argv[0] in PASS_THROUGH and argv[1:2] not in (["-h"], ["--help"]):
        # everything after the command is the module's (--config-file, torchrun flags, overrides):
        # argparse would reject flags it does not know
        return (_exec_trainer(argv[1:]) if argv[0] == "train"
                else _exec_module(PASS_THROUGH[argv[0]][0], argv[1:]))
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    flexible = ("track", "run", "sft")
    if extra and (args.command not in flexible or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # overrides after a flag (--once, -q): argparse leaves them over
    if args.command in flexible:
        args.overrides += extra
    if args.command == "sft":
        if args.nproc_per_node < 1:
            parser.error(f"argument --nproc-per-node: {args.nproc_per_node} is not a count >= 1")
        return _with_config(args.overrides,
                            lambda cfg: _sft(cfg, args.out, args.nproc_per_node, args.overrides))
    if args.command == "run":
        return _stoppable(lambda: _with_config(
            args.overrides, lambda cfg: _run(cfg, args.quiet, args.accept_changes)))
    if args.command in ("config", "plan"):
        return _with_config(args.overrides, _print_config if args.command == "config" else _plan)
    if args.command == "track":
        return _track(args.run_dir, args.overrides, once=args.once)
    if args.command == "keys":
        from areal_like.net.security import SecurityError

        try:
            return _keys(args.run_dir, args.keys_dir)
        except OSError as e:  # RUN_DIR a file, or not writable
            print(f"error: cannot write the keys: {e}", file=sys.stderr)
            return 2
        except SecurityError as e:  # a secret key kept there is readable by others
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.command == "scale":
        from launch.scale import request

        if not args.timeout > 0:  # (nan too) it would ask the job, then not wait for it
            parser.error(f"argument --timeout: {args.timeout:g} is not a number of seconds > 0")

        return request(args.run_dir, args.size, args.timeout)
    if args.command == "top" and not 0 < args.interval < float("inf"):
        parser.error(f"argument --interval: {args.interval} is not a number of seconds > 0")
    if args.command == "stop" and not 0 <= args.timeout < float("inf"):
        parser.error(f"argument --timeout: {args.timeout} is not a number of seconds >= 0")
    from launch import top

    run_dir = args.run_dir or top.newest_run_dir()
    if run_dir is None:
        print("error: no run directory given and no run under ./runs (give RUN_DIR)",
              file=sys.stderr)
        return 2
    if args.command == "status":
        return top.status(run_dir)
    if args.command == "stop":
        return top.stop(run_dir, args.timeout)
    return top.live(run_dir, interval_s=args.interval, once=args.once)


def _exec_module(module: str, rest: list[str]) -> int:
    """Replace this process with ``python -m module rest...`` (signals and exit code go straight
    through)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = [sys.executable, "-m", module, *rest]
    sys.stdout.flush()
    os.execv(sys.executable, argv)
    return 1  # not reached


def split_torchrun_args(rest: list[str]) -> tuple[list[str], list[str]]:
    """``[torchrun flags..., trainer args...]`` -> (torchrun flags with the defaults of those not
    given, trainer args)."""
    flags, other, keys = [], [], set()
    args = iter(rest)
    for a in args:
        key = a.split("=", 1)[0].replace("_", "-")
        if key in TORCHRUN_FLAGS_WITH_VALUE and "=" not in a:
            flags += [a, next(args, None) or _missing(a)]
        elif key in TORCHRUN_FLAGS_WITH_VALUE or a == "--standalone":
            flags.append(a)
        else:
            other.append(a)
            continue
        keys.add(key)
    if not keys & {"--nnodes", "--master-addr", "--rdzv-endpoint", "--standalone"}:
        flags.append("--standalone")  # one node: torchrun picks a free rendezvous port itself
    if "--nproc-per-node" not in keys:
        flags += ["--nproc-per-node", "1"]
    return flags, other


def _missing(flag: str) -> str:
    print(f"error: {flag} needs a value", file=sys.stderr)
    raise SystemExit(2)


def _exec_trainer(rest: list[str]) -> int:
    """torchrun with the trainer, once its config loads: a bad one is one ``error:`` line here, not
    one per rank and torchrun's report of each failed rank. Without ``--log-dir`` torchrun leaves
    a directory in /tmp at every start: with ``--config-file`` (a run's resolved config; composed
    here, a default run_dir stamped with the time could differ from the trainer's own) its files
    go to ``<run_dir>/logs/torchrun``."""
    flags, other = split_torchrun_args(rest)
    if not {"-h", "--help"} & set(other):
        from pathlib import Path

        from areal_like.settings.config import ConfigError, load_daemon_config

        try:
            cfg = load_daemon_config(other, addresses=("trainer.buffer_address",))
        except ConfigError as e:
            print(f"error: bad configuration: {e}", file=sys.stderr)
            return 2
        given = {a.split("=", 1)[0].replace("_", "-") for a in [*flags, *other]}
        if "--config-file" in given and "--log-dir" not in given:
            # absolute, as run_dir is everywhere: a relative "-x" was read by torchrun as a flag
            flags += ["--log-dir", str(Path(cfg.run_dir).resolve() / "logs" / "torchrun")]
    return _exec_module("launch.torchrun", [*flags, "-m", PASS_THROUGH["train"][0], *other])


def _with_config(overrides: list[str], command) -> int:
    """``command(cfg)`` on the composed config. A ConfigError prints ``error:`` lines and exits 2:
    one for a bad composition, one per problem past it (preflight, run_dir, a layout that does not
    fit, a port clash, a secret key file readable by others), all before anything started."""
    from areal_like.net.security import SecurityError
    from areal_like.settings.config import ConfigError, load_config

    try:
        cfg = load_config(overrides)
    except ConfigError as e:
        print(f"error: bad configuration: {e}", file=sys.stderr)
        return 2
    try:
        return command(cfg)
    except (ConfigError, SecurityError) as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2


def _print_config(cfg) -> int:
    """The config the daemons would read: hub ids resolved to local directories, inputs checked,
    ``run``'s warm start (trained now or from its cache: ``model.path``) and laid out as ``run``
    lays it out (``launch.job.plan_job``: GPUs, weight path, addresses)."""
    from areal_like.settings.config import to_yaml
    from launch.job import plan_job
    from launch.preflight import checked
    from launch.warmstart import ensure_warm_start

    cfg = checked(cfg)
    plan_job(cfg)  # a layout that does not fit is refused before the warm start, as by `run`
    cfg, _ = plan_job(ensure_warm_start(cfg, log=lambda m: print(f"[warm-start] {m}",
                                                                 file=sys.stderr, flush=True)))
    sys.stdout.write(to_yaml(cfg, redacted=True))  # a credential in a URL is shown as <redacted>
    return 0


def _sft(cfg, out: str | None, nproc: int, overrides: list[str]) -> int:
    """``areal-like sft``: the inputs checked as for ``run``, then ``launch.warmstart.sft`` in this
    process (its summary as one JSON line), or ``python -m trainer.sft`` on ``nproc`` ranks under
    torchrun (rank 0 prints the line)."""
    import json

    from launch.preflight import checked
    from launch.warmstart import sft, sft_target

    cfg = checked(cfg)
    if nproc > 1:
        resolved = [f"model.path={cfg.model.path}"] if cfg.model.path else []  # a hub id: local
        return _exec_module("launch.torchrun", [
            "--standalone", "--nproc-per-node", str(nproc), "-m", "trainer.sft",
            "--out", str(sft_target(cfg, out)), *overrides, *resolved])
    summary = sft(cfg, out, log=lambda m: print(f"[sft] {m}", file=sys.stderr, flush=True))
    print(json.dumps(summary), flush=True)
    return 0


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP to ``areal-like run`` before its supervisor took over, raised where
    Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, _frame) -> None:
    if signum == signal.SIGHUP:
        from launch.local import console_gone

        console_gone()
    raise Interrupted(signum)


def _stoppable(command) -> int:
    """``command()`` (``areal-like run``), which a stop signal ends as Ctrl-C does in every phase:
    exit 128 + the signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP). Before the supervisor takes over
    (``Supervisor.install_signals``: it stops the daemons, then returns the same) SIGTERM and SIGHUP
    raise ``Interrupted`` (a SIGHUP that ``nohup`` ignores stays ignored), and whatever was started
    is undone as on Ctrl-C (``launch.job.start_job``)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, _interrupt)
    try:
        return command()
    except KeyboardInterrupt as e:  # before the supervisor took over (the checks, the warm start)
        print("[run] interrupted before the job started; nothing is running", file=sys.stderr,
              flush=True)
        return 128 + getattr(e, "signum", signal.SIGINT)


def _run(cfg, quiet: bool, accept_changes: bool) -> int:
    if cfg.launch.cluster == "ray":  # the same job placed on a Ray cluster (launch/RAY.md)
        from launch.ray_job import run_on_ray

        return run_on_ray(cfg, quiet=quiet, accept_changes=accept_changes)
    from launch.job import run_job

    return run_job(cfg, quiet=quiet, accept_changes=accept_changes)


def _plan(cfg) -> int:
    """``run``'s planning step (``launch.job.plan_job``) without writing or starting anything."""
    from launch.job import laid_out, plan_job
    from launch.memory import memory_lines
    from launch.placement import idle_gpus
    from launch.topology import layout_line, plan_lines

    if cfg.launch.cluster == "ray":  # node 0 is whichever Ray node its bundle lands on
        from launch.ray_job import on_hosts

        cfg = on_hosts(cfg, "node0")
    _, topo = plan_job(cfg)
    # the daemons' GPU settings and layout, but the ports as configured (``auto`` where run picks
    # them)
    laid = laid_out(cfg)[0]
    notes = [layout_line(cfg, laid, topo), idle_gpus(laid)]  # the counts the cores chose, and why
    memory = memory_lines(laid)  # a GPU job's estimate per GPU, after a blank line
    memory = ["", *memory] if memory else []
    print("\n".join([*plan_lines(laid, topo), *filter(None, notes), *memory]))
    return 0


def _keys(run_dir: str, keys_dir: str | None) -> int:
    from pathlib import Path

    from areal_like.net.auth import KEY_FILE, ensure_key_file, read_key_file
    from areal_like.net.security import make_keys

    target = Path(keys_dir) if keys_dir else Path(run_dir) / "keys"
    written = make_keys(target)
    print(f"{len(written)} key files written to {target}" if written
          else f"keys already in {target}: kept")
    had = read_key_file(run_dir)  # the engine API key the daemons read when the variable is unset
    ensure_key_file(run_dir)
    print(f"engine API key {'kept in' if had else 'written to'} {Path(run_dir) / KEY_FILE}")
    return 0


def _track(run_dir: str, overrides: list[str], once: bool) -> int:
    import threading
    from pathlib import Path

    from areal_like.settings.config import ConfigError, load_daemon_config
    from launch.records import job_over
    from launch.track_sink import TrackerSink, follow

    try:
        cfg = load_daemon_config(["--config-file", str(Path(run_dir) / "config.yaml"), *overrides])
        sink = TrackerSink.from_config(cfg, run_dir)
    except ConfigError as e:
        print(f"error: bad configuration: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    if once:
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        sent = follow(sink, lambda: job_over(Path(run_dir), cfg), stop)
    finally:
        sink.close()
    print(f"{sent} rows and tables of {run_dir} sent to {', '.join(cfg.tracker)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
