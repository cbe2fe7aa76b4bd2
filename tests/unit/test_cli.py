"""areal-like CLI: --help, refusals, torchrun pass-through, top's figures (views: test_top.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch.cli import main, split_torchrun_args
from launch.top import figure, render
from tests.conftest import run_cli

# a trainer started on its own needs the buffer's real address (port 0 is refused)
BUFFER = "buffer.address=tcp://127.0.0.1:5555"


@pytest.fixture
def execs(monkeypatch) -> list[list[str]]:
    """The command lines the CLI would exec (it replaces itself with the daemon or torchrun)."""
    calls: list[list[str]] = []
    monkeypatch.setattr("launch.cli.os.execv", lambda exe, argv: calls.append(argv))
    return calls


@pytest.fixture
def config(tmp_path):
    """A config file whose run_dir is tmp_path/run."""
    from areal_like.settings.config import load_config, to_yaml

    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(load_config([f"run_dir={tmp_path}/run", BUFFER])))
    return path


def test_help_and_export_help_are_fast_and_import_nothing_heavy():
    code = ("import sys\nfrom launch.cli import main\n"
            "for argv in (['--help'], ['export', '--help']):\n"
            "    try:\n        main(argv)\n"
            "    except SystemExit as e:\n        assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'hydra', 'buffer', 'trainer', "
            "'rollout_server') if m in sys.modules]\nassert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for cmd in ("run", "buffer", "rollout", "train", "top", "status", "export"):
        assert cmd in r.stdout
    assert "CHECKPOINT OUT" in r.stdout and "Hugging Face" in r.stdout  # export's


def test_a_bad_override_or_an_unknown_command_exits_2():
    # what each refusal names: test_config.py's test_a_refusal_names_the_key_and_what_it_takes
    r = run_cli("run", "trainer.lr=abc", timeout=120)
    assert r.returncode == 2 and "error: bad configuration" in r.stderr, r.stderr
    assert "trainer.lr" in r.stderr, r.stderr
    with pytest.raises(SystemExit) as e:  # an unknown command: a usage error
        main(["frobnicate"])
    assert e.value.code == 2


def test_torchrun_flags_pass_through():
    flags, rest = split_torchrun_args(["--nproc-per-node", "2", "--nnodes=2", "--node-rank", "1",
                                       "--master-addr", "node-0", "--master-port", "29500",
                                       "--log-dir", "run/logs/torchrun",
                                       "--config-file", "run/config.yaml", "trainer.steps=5"])
    assert flags == ["--nproc-per-node", "2", "--nnodes=2", "--node-rank", "1",
                     "--master-addr", "node-0",
                     "--master-port", "29500", "--log-dir", "run/logs/torchrun"]
    assert rest == ["--config-file", "run/config.yaml", "trainer.steps=5"]
    flags, rest = split_torchrun_args(["trainer.steps=5"])
    assert flags == ["--standalone", "--nproc-per-node", "1"] and rest == ["trainer.steps=5"]


def test_no_config_value_makes_torchrun_print_its_usage(execs, monkeypatch, tmp_path, config):
    """run_dir=-x reached torchrun as ``--log-dir -x/...``, which it read as a flag."""
    from torch.distributed.run import parse_args

    monkeypatch.chdir(tmp_path)
    main(["train", "--nproc-per-node", "2", "--config-file", str(config), "run_dir=-x"])
    args = parse_args(execs[0][3:])  # after `python -m launch.torchrun`
    assert args.log_dir == str(tmp_path / "-x" / "logs" / "torchrun")
    assert args.training_script_args[-1] == "run_dir=-x"


@pytest.mark.parametrize("flags, named", [
    (["--nproc-per-node", "abc"], "--nproc-per-node"), (["--nproc_per_node=0"], "--nproc-per-node"),
    (["--nnodes", "abc"], "--nnodes"), (["--nnodes", "2:1"], "--nnodes"),
    (["--node-rank", "abc"], "--node-rank"), (["--nnodes", "2", "--node-rank", "2"], "--node-rank"),
    (["--master-port", "99999"], "--master-port"), (["--max-restarts", "-1"], "--max-restarts")])
def test_a_bad_torchrun_flag_is_one_error_line_and_exit_2(flags, named, capsys, monkeypatch):
    """Not torchrun's traceback or usage: one line naming the flag, exit 2, before any rank."""
    from launch import torchrun

    def started(_args):
        raise AssertionError("torchrun started its ranks")

    monkeypatch.setattr("torch.distributed.run.run", started)

    with pytest.raises(SystemExit) as e:
        torchrun.main([*flags, "-m", "trainer"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument " + named), err


def test_train_help_and_a_torchrun_flag_without_its_value():
    r = run_cli("train", "--help", timeout=120)
    assert r.returncode == 0 and "--nproc-per-node" in r.stdout
    r = run_cli("train", "--nproc-per-node", timeout=120)  # exited 1, as a trainer's error would
    assert (r.returncode, r.stderr) == (2, "error: --nproc-per-node needs a value\n")


def test_top_figures_values_rates_and_histogram_means():
    now = {"areal_x": 3.0, "areal_c_total": 50.0, "areal_h_sum": 6.0, "areal_h_count": 4.0}
    prev = {"areal_c_total": 30.0}
    assert figure(now, prev, 2.0, "areal_x", "value") == "3"
    assert figure(now, prev, 2.0, "areal_c_total", "rate") == "10"
    assert figure(now, None, 2.0, "areal_c_total", "rate") == "-"
    assert figure(now, prev, 2.0, "areal_h", "mean") == "1.5"
    assert figure(now, prev, 2.0, "areal_missing", "value") == "-"
    info = {"daemons": [{"name": "buffer", "kind": "buffer"},
                        {"name": "rollout-0", "kind": "rollout"},
                        {"name": "trainer", "kind": "trainer"}]}
    tables = render(info, {"buffer": {"areal_buffer_trainer_version": 4.0}, "rollout-0": None,
                           "trainer": {}}, {}, 1)
    assert [t.title for t in tables] == ["buffer", "rollout", "trainer"]
    # reward: the mean of the samples scored in the interval (8 samples, 6.0 in all)
    series = "areal_rollout_reward_sum/areal_rollout_reward_count"
    prev = {"areal_rollout_reward_sum": 10.0, "areal_rollout_reward_count": 40.0}
    now = {"areal_rollout_reward_sum": 16.0, "areal_rollout_reward_count": 48.0}
    assert figure(now, prev, 2.0, series, "ratio") == "0.75"
    assert figure(now, None, 2.0, series, "ratio") == "0.333"  # the first refresh: all so far
    assert figure(now, now, 2.0, series, "ratio") == "-"  # none scored since


def test_daemon_commands_pass_every_argument_through(execs, config):
    main(["rollout", "--config-file", "run/config.yaml", "rollout.server_id=a"])
    main(["buffer", "buffer.metrics_port=9100"])
    main(["train", "--nproc-per-node", "2", "--log-dir", "l", "--config-file", str(config),
          "trainer.steps=3"])
    assert execs[0][1:] == ["-m", "rollout_server", "--config-file", "run/config.yaml",
                            "rollout.server_id=a"]
    assert execs[1][1:] == ["-m", "buffer", "buffer.metrics_port=9100"]
    assert execs[2][1:] == ["-m", "launch.torchrun", "--nproc-per-node", "2", "--log-dir", "l",
                            "--standalone", "-m", "trainer",
                            "--config-file", str(config), "trainer.steps=3"]


@pytest.mark.parametrize("args", [["trainer.lrr=1"], ["--nproc-per-node", "4", "trainer.lr=-1"],
                                  ["--config-file", "missing.yaml"]])
def test_train_with_a_bad_config_is_one_error_line_before_torchrun(args, execs, capsys):
    """Not one refusal per rank plus torchrun's log line and summary."""
    assert main(["train", *args]) == 2 and execs == []
    err = capsys.readouterr().err
    assert err.startswith("error: bad configuration: ") and err.count("\n") == 1, err


def test_train_sends_torchruns_files_to_the_run_dir_unless_told(execs, tmp_path, config):
    main(["train", "--config-file", str(config), "trainer.steps=3"])
    main(["train", "--log-dir", "elsewhere", "--config-file", str(config)])
    # composed here, a time-stamped run_dir could differ: none
    main(["train", "trainer.steps=3", BUFFER])
    assert execs[0][1:] == ["-m", "launch.torchrun", "--standalone", "--nproc-per-node", "1",
                            "--log-dir", f"{tmp_path}/run/logs/torchrun", "-m", "trainer",
                            "--config-file", str(config), "trainer.steps=3"]
    assert execs[1].count("--log-dir") == 1
    assert execs[1][execs[1].index("--log-dir") + 1] == "elsewhere"
    assert "--log-dir" not in execs[2]


def test_export_runs_trainer_export_by_module_name(execs):
    main(["export", "runs/x/checkpoints/v00000012", "out", "--config-file", "runs/x/config.yaml",
          "--shard-mb", "5"])
    assert execs == [[sys.executable, "-m", "trainer.export", "runs/x/checkpoints/v00000012", "out",
                      "--config-file", "runs/x/config.yaml", "--shard-mb", "5"]]


def test_keys_makes_what_a_job_started_by_hand_needs(tmp_path, capsys):
    """The CURVE keys and the engine API key (areal_like/net/auth.py); run again, both are kept."""
    from areal_like.net.auth import KEY_FILE, read_key_file

    assert main(["keys", str(tmp_path)]) == 0
    key = read_key_file(tmp_path)
    assert key and (tmp_path / "keys" / "server.key_secret").is_file()
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert main(["keys", str(tmp_path)]) == 0
    assert read_key_file(tmp_path) == key and "kept in" in capsys.readouterr().out


def test_config_gives_the_daemons_runs_warm_started_model(tmp_path, capsys):
    """The warm start's model included: else a hand-started job trains the untrained model."""
    import yaml

    from areal_like.settings.config import load_config
    from launch.warmstart import cache_path

    overrides = [f"run_dir={tmp_path / 'run'}"]
    cached = cache_path(load_config(overrides))  # what `run` trains or reuses
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert main(["config", *overrides]) == 0
    out = capsys.readouterr()
    assert yaml.safe_load(out.out)["model"]["path"] == str(cached)
    assert f"[warm-start] cached: {cached}" in out.err


def test_keys_into_a_file_and_a_top_interval_of_no_time_are_refused_without_a_traceback(
        tmp_path, capsys):
    run_file = tmp_path / "config.yaml"
    run_file.write_text("")
    assert main(["keys", str(run_file)]) == 2
    assert capsys.readouterr().err.startswith("error: cannot write the keys: ")
    for interval in ("-1", "0", "nan", "inf"):
        with pytest.raises(SystemExit) as exit_:
            main(["top", str(tmp_path), "--interval", interval])
        assert exit_.value.code == 2
        assert "argument --interval" in capsys.readouterr().err


def test_plan_into_a_pipe_its_reader_closed_ends_without_a_traceback():
    """``areal-like plan | head -3`` ended in a BrokenPipeError traceback."""
    p = subprocess.Popen([sys.executable, "-m", "launch.cli", "plan"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # no reader left: plan's first write fails with EPIPE
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141 and not err, err  # 128 + SIGPIPE: as a command the signal killed
