"""The staleness benchmark's bookkeeping (benchmarks/bench_staleness.py): what each cell's JSON line
claims is computed from the run records as documented, on records made by hand."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_staleness",
                                              ROOT / "benchmarks" / "bench_staleness.py")
bench = importlib.util.module_from_spec(spec)
sys.modules.setdefault("bench_staleness", bench)
spec.loader.exec_module(bench)


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
    assert bench.lag_exact_fraction(good, 2) == 1.0
    mixed = good[:3] + [rec(4, 0, 1.5, 2)]  # one group 1 version old beside one 2 old
    assert bench.lag_exact_fraction(mixed, 2) == 0.75


def test_divergence_events_count_bad_steps_a_fall_and_a_run_left_worse_than_it_started():
    rising = [0.1 * i for i in range(10)]
    assert bench.divergence_events(run(rising)) == 0
    fallen = rising + [0.0] * 10  # best 10-step mean 0.45, last 0.0: fell more than 0.3
    assert bench.divergence_events(run(fallen)) == 1
    # never rose, ended worse
    assert bench.divergence_events(run([0.2] * 20, start=0.2, final=0.1)) == 1
    nan_step = [rec(1, 0.5, 0, 0, loss=float("nan")), rec(2, 0.5, 1, 1, grad=float("inf"))]
    assert bench.divergence_events(run([], recs=nan_step, final=0.5)) == 2


def test_a_cell_pools_its_seeds_and_its_ratio_is_over_the_same_kernel_at_eta_0():
    on = bench.summarize_cell("vcpo", 0, [run([0.5] * 10, final=0.8, eta=0),
                                          run([0.5] * 10, final=0.6, eta=0)], 10, 1.0)
    off = bench.summarize_cell("vcpo", 2, [run([0.5] * 10, final=0.35),
                                           run([0.5] * 10, final=0.35)], 10, 1.0)
    lines = bench.with_baselines([on, off])
    assert on["figure"] == pytest.approx(0.7) and on["accuracy_min"] == 0.6 and on["ratio"] == 1.0
    assert off["baseline"] == pytest.approx(0.7) and off["ratio"] == pytest.approx(0.5)
    assert off["lag_exact_frac"] == 1.0 and off["staleness_max"] == 2
    table = bench.markdown_table(lines)
    assert "| vcpo | 0.700 [0.80 0.60] (0 div) | 0.350 [0.35 0.35], 0.50 (0 div) |" in table


def test_the_plot_goes_beside_its_json_lines_never_over_the_published_figure(monkeypatch):
    published = ROOT / "benchmarks" / "staleness.png"
    for argv, png in ((["--quick"], "staleness.png"), (["--out", "q.jsonl"], "q.png"),
                      (["--plot", "old.jsonl", "--table"], "old.png"),
                      (["--plot", "a.jsonl", "--png", "b.png"], "b.png")):
        monkeypatch.setattr(sys, "argv", ["bench_staleness.py", *argv])
        got = bench.parse_args().png
        assert got == png and Path(got).resolve() != published


@pytest.mark.parametrize("argv, says", [(["--kernels", "ppo,vcpoo"], "vcpoo"),
                                        (["--kernels", "ppo", "--set", "trainer.lrr=1"],
                                         "trainer.lrr")])
def test_a_bad_kernel_or_override_is_refused_before_the_first_run(argv, says, tmp_path):
    # a typo in the second kernel failed only after every cell of the first had run (minutes),
    # and their lines were lost with it
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_staleness.py"),
                          "--etas", "0", "--keep", str(tmp_path / "runs"), *argv],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and says in out.stderr.splitlines()[-1]
    assert not (tmp_path / "runs").exists()  # no run started
