"""Every benchmark's JSON line: its keys, a higher-is-better ratio against its goal, a load
warning, and benchmarks/results.py's table of the last line per name; bench_reward_pool's line
measures what its docstring says; bench_async's ``speedup_line`` (runs faked): its refusals and
where a run's directory goes; bench_staleness's cells: what each line claims is computed from the
run records as documented, on records made by hand; bench_distill's run directories on a reused
``--root``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
COLUMNS = {"name", "figure", "unit", "baseline", "ratio", "goal"}
sys.path.insert(0, str(BENCH))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"lines_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("script, builder, better, worse", [
    # (trainer s, plain s): a trainer step faster than the plain one beats its baseline
    ("bench_train_step", "step_line", (0.09, 0.10), (0.20, 0.10)),
    # (overlapped ms, blocking ms): the trainer blocked for less than the blocking push
    ("bench_weight_sync", "blocked_line", (0.008, 0.40), (0.50, 0.40)),
])
def test_a_smaller_figure_than_the_baseline_gives_a_ratio_above_1(script, builder, better, worse):
    build = getattr(_load(script), builder)
    good, bad = build(*better), build(*worse)
    assert COLUMNS <= good.keys()
    assert good["figure"] < good["baseline"] and good["ratio"] > 1
    assert bad["figure"] > bad["baseline"] and bad["ratio"] < 1
    if isinstance(good["goal"], float):
        assert good["ratio"] >= good["goal"] > bad["ratio"]  # 1.3x slower fails 1 / 1.3


def test_the_endpoint_overhead_ratio_grows_as_the_overhead_shrinks():
    line = _load("bench_agentic").overhead_line
    small, large = line(13.6, 14.0), line(13.6, 27.2)  # (direct ms, through the endpoint ms)
    assert COLUMNS <= small.keys()
    assert small["figure"] < large["figure"] and small["ratio"] > large["ratio"]
    assert large["ratio"] == 0.5


def test_the_memory_band_is_one_ratio_that_the_estimate_high_or_low_fails_alike():
    line = _load("bench_trainer_memory").memory_line
    gib = 2**30
    close, high, low = line(gib, int(1.02 * gib)), line(int(1.3 * gib), gib), line(gib, 1.3 * gib)
    assert COLUMNS <= close.keys()
    assert close["ratio"] >= close["goal"] == 0.87
    assert high["ratio"] == low["ratio"] == round(1 / 1.3, 3) < high["goal"]
    assert (high["measured_over_estimate"], low["measured_over_estimate"]) == (1.3, 0.769)


def test_the_same_node_transport_line_has_every_key():
    rates = {("stream", "local"): [900.0], ("stream", "ours"): [800.0],
             ("stream", "curve"): [300.0]}
    line = _load("transport_report").local_line(4096, rates, lambda _key: 100.0, rounds=1,
                                                seconds=0.35)
    assert COLUMNS <= line.keys()
    assert (line["figure"], line["baseline"], line["ratio"]) == (900.0, 800.0, 1.125)


@pytest.mark.parametrize("clean, chaos, ratio", [(0.1, 0.05, 2.0), (0.1, 0.2, 0.5),
                                                 (0.1, 0.3, 0.33), (0.0, 0.0, 1.0)])
def test_the_chaos_ratio_is_the_clean_waste_over_the_chaos_waste(
        monkeypatch, tmp_path, capsys, clean, chaos, ratio):
    bench = _load("bench_chaos")  # its two runs (minutes each) faked
    shares = {False: clean, True: chaos}
    monkeypatch.setattr(bench, "run", lambda _d, _a, chaos: {"wasted_share": shares[chaos]})
    monkeypatch.setattr(sys, "argv", ["bench_chaos.py", "--root", str(tmp_path)])
    bench.main()
    line = json.loads(capsys.readouterr().out)
    assert COLUMNS <= line.keys() and (line["figure"], line["baseline"]) == (chaos, clean)
    assert line["ratio"] == ratio and (ratio >= line["goal"]) == (chaos <= 2 * clean)


def test_a_loaded_machine_still_gets_its_line_with_a_warning(monkeypatch, capsys):
    warning, emit = _load("transport_report").load_warning, _load("bench_buffer").emit
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for load, says in ((1.0, None), (2.0, None), (2.5, "1-minute load 2.5 on 2 CPUs"),
                       (7.6, "loaded machine (1-minute load 7.6 on 2")):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 5.0, 5.0))
        emit(name="raw_transport", figure=1.0)
        line = json.loads(capsys.readouterr().out)
        assert line.get("warning") == warning().get("warning")
        assert (says in line["warning"]) if says else "warning" not in line


def test_the_last_line_of_a_name_wins_and_bad_lines_are_skipped(tmp_path, capsys):
    results = _load("results")
    a = _write(tmp_path / "a.jsonl", [
        {"name": "x", "figure": 1.0, "unit": "s", "baseline": 2.0, "ratio": 2.0, "goal": 1.5},
        "not json", {"figure": 3}, {"name": "y", "figure": 5, "unit": "ms"}])
    b = _write(tmp_path / "b.jsonl", [{"name": "x", "figure": 0.5, "unit": "s", "baseline": 2.0,
                                       "ratio": 4.0, "goal": "figure <= 1 | s"}])
    latest = results.latest_lines([a, b])
    assert latest["x"] == ({"name": "x", "figure": 0.5, "unit": "s", "baseline": 2.0, "ratio": 4.0,
                            "goal": "figure <= 1 | s"}, "b.jsonl")
    assert set(latest) == {"x", "y"}
    assert capsys.readouterr().err.count("not a benchmark line") == 2
    rows = results.table(latest).splitlines()
    assert rows[0] == "| name | figure | unit | baseline | ratio | goal | file |"
    assert rows[2] == "| x | 0.5 | s | 2 | 4 | figure <= 1 \\| s | b.jsonl |"
    assert rows[3] == "| y | 5 | ms |  |  |  | a.jsonl |"


def test_every_kept_line_reads_and_states_its_goal_as_a_ratio_or_naming_what_it_bounds(capsys):
    """A goal is null, a number (ratio >= goal) or a string naming the field it bounds."""
    assert _load("results").main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| name |") and "vs_trl_samples_per_s_user_path" in out
    seen = 0
    for path in BENCH.glob("*.jsonl"):
        for text in path.read_text().splitlines():
            goal = json.loads(text).get("goal") if text.strip() else None
            seen += 1
            if isinstance(goal, str):
                assert not re.match(r"\s*[<>]=", goal), (path.name, goal)
                assert not re.search(r"ratio <=|/ bound <=", goal), (path.name, goal)
    assert seen > 100


def test_the_reward_pool_scores_in_two_workers_and_prints_one_full_line():
    # a pool of 0 workers (in-process scoring) would measure nothing of what the line claims
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(BENCH / "bench_reward_pool.py"), "--rounds", "1"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["workers"] == 2 and COLUMNS <= line.keys()


@pytest.fixture()
def speedup_line(monkeypatch, tmp_path):
    """bench_async's speedup_line on two cores, its temporary directories under tmp_path."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return _load("bench_async").speedup_line


def records(steps: int) -> list[dict]:
    return [{"step": k, "time": float(k), "seqs": 16, "staleness_mean": 0.0,
             "phase_seconds": {"fetch_batch": 0.5, "train_step": 0.5}} for k in range(1, steps + 1)]


def test_a_skip_leaving_no_steps_or_a_keep_directory_of_earlier_runs_is_refused_before_any_run(
        tmp_path, speedup_line):
    def never(*_):
        raise AssertionError("ran")

    for steps, skip in ((3, 2), (6, 6), (6, -1)):
        with pytest.raises(SystemExit, match="--skip"):
            speedup_line("x", "bench_", never, argparse.Namespace(steps=steps, skip=skip,
                                                                  keep=None))
    # resumed finished runs would print their old records as a new measurement
    (tmp_path / "eta0").mkdir()
    with pytest.raises(SystemExit, match="eta0 exist from an earlier run"):
        speedup_line("x", "bench_", never, argparse.Namespace(steps=6, skip=2, keep=str(tmp_path)))


def test_a_failed_run_keeps_the_logs_its_message_names_and_a_finished_one_leaves_nothing(
        tmp_path, speedup_line):
    def failing(run_dir: Path, eta: int, _args):
        (run_dir / "logs").mkdir(parents=True)
        raise SystemExit(f"eta={eta} run failed; logs in {run_dir / 'logs'}")

    args = argparse.Namespace(steps=6, skip=2, keep=None)
    with pytest.raises(SystemExit) as failed:
        speedup_line("x", "bench_", failing, args)
    logs = Path(re.search(r"logs in (\S+)", str(failed.value)).group(1))
    assert logs.is_dir() and tmp_path in logs.parents

    def fine(run_dir: Path, _eta: int, _args):
        run_dir.mkdir(parents=True)
        return records(6)

    before = set(tmp_path.iterdir())
    line = speedup_line("x", "bench_", fine, args)
    assert line["figure"] == 1.0 and set(tmp_path.iterdir()) == before


staleness = _load("bench_staleness")


def rec(step, reward, stale_mean, stale_max, loss=0.1, grad=1.0):
    return {"step": step, "reward_mean": reward, "staleness_mean": stale_mean,
            "staleness_max": stale_max, "loss": loss, "stats": {"grad_norm": grad}}


def run(rewards, start=0.2, final=0.5, eta=2, recs=None):
    recs = recs or [rec(i + 1, r, min(i, eta), min(i, eta)) for i, r in enumerate(rewards)]
    return {"recs": recs, "eval": {"mean@4": final, "greedy_accuracy": 1.0},
            "eval_start": {"mean@4": start, "greedy_accuracy": 1.0}}


def test_lag_exact_fraction_counts_steps_whose_every_group_had_the_forced_lag():
    # step s trains from version s - 1, so its groups must be min(s - 1, eta) old
    good = [rec(1, 0, 0, 0), rec(2, 0, 1, 1), rec(3, 0, 2, 2), rec(4, 0, 2, 2)]
    assert staleness.lag_exact_fraction(good, 2) == 1.0
    mixed = good[:3] + [rec(4, 0, 1.5, 2)]  # one group 1 version old beside one 2 old
    assert staleness.lag_exact_fraction(mixed, 2) == 0.75


def test_divergence_events_count_bad_steps_a_fall_and_a_run_left_worse_than_it_started():
    rising = [0.1 * i for i in range(10)]
    assert staleness.divergence_events(run(rising)) == 0
    fallen = rising + [0.0] * 10  # best 10-step mean 0.45, last 0.0: fell more than 0.3
    assert staleness.divergence_events(run(fallen)) == 1
    # never rose, ended worse
    assert staleness.divergence_events(run([0.2] * 20, start=0.2, final=0.1)) == 1
    nan_step = [rec(1, 0.5, 0, 0, loss=float("nan")), rec(2, 0.5, 1, 1, grad=float("inf"))]
    assert staleness.divergence_events(run([], recs=nan_step, final=0.5)) == 2


def test_a_cell_pools_its_seeds_and_its_ratio_is_over_the_same_kernel_at_eta_0():
    on = staleness.summarize_cell("vcpo", 0, [run([0.5] * 10, final=0.8, eta=0),
                                          run([0.5] * 10, final=0.6, eta=0)], 10, 1.0)
    off = staleness.summarize_cell("vcpo", 2, [run([0.5] * 10, final=0.35),
                                           run([0.5] * 10, final=0.35)], 10, 1.0)
    lines = staleness.with_baselines([on, off])
    assert on["figure"] == pytest.approx(0.7) and on["accuracy_min"] == 0.6 and on["ratio"] == 1.0
    assert off["baseline"] == pytest.approx(0.7) and off["ratio"] == pytest.approx(0.5)
    assert off["lag_exact_frac"] == 1.0 and off["staleness_max"] == 2
    table = staleness.markdown_table(lines)
    assert "| vcpo | 0.700 [0.80 0.60] (0 div) | 0.350 [0.35 0.35], 0.50 (0 div) |" in table


def test_the_plot_goes_beside_its_json_lines_never_over_the_published_figure(monkeypatch):
    published = BENCH / "staleness.png"
    for argv, png in ((["--quick"], "staleness.png"), (["--out", "q.jsonl"], "q.png"),
                      (["--plot", "old.jsonl", "--table"], "old.png"),
                      (["--plot", "a.jsonl", "--png", "b.png"], "b.png")):
        monkeypatch.setattr(sys, "argv", ["bench_staleness.py", *argv])
        got = staleness.parse_args().png
        assert got == png and Path(got).resolve() != published


@pytest.mark.parametrize("argv, says", [(["--kernels", "ppo,vcpoo"], "vcpoo"),
                                        (["--kernels", "ppo", "--set", "trainer.lrr=1"],
                                         "trainer.lrr")])
def test_a_bad_kernel_or_override_is_refused_before_the_first_run(argv, says, tmp_path):
    # a typo in the second kernel failed only after every cell of the first had run (minutes),
    # and their lines were lost with it
    out = subprocess.run([sys.executable, str(BENCH / "bench_staleness.py"),
                          "--etas", "0", "--keep", str(tmp_path / "runs"), *argv],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and says in out.stderr.splitlines()[-1]
    assert not (tmp_path / "runs").exists()  # no run started


@pytest.mark.parametrize("used, suffix", [
    ((), ""),  # a new root: the plain names
    (("distill", "rl_only", "distill.2", "rl_only.2"), ".3"),
    (("rl_only",), ".2"),  # a first run that died after its distill job's directory
])
def test_a_distill_rerun_never_reuses_a_run_directory_and_keeps_the_pair_aligned(tmp_path, used,
                                                                                suffix):
    """Each rerun's two jobs get directories no earlier run used (they hold its checkpoints and
    WAL), the pair aligned (distill.N, rl_only.N)."""
    runs = tmp_path / "runs"
    for name in used:
        (runs / name).mkdir(parents=True)
    fresh = _load("bench_distill")._fresh(runs, ("distill", "rl_only"))
    assert fresh == {"distill": runs / f"distill{suffix}", "rl_only": runs / f"rl_only{suffix}"}
