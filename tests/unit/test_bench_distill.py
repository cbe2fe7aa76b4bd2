"""``benchmarks/bench_distill.py`` on a reused ``--root``: each rerun's two jobs get run directories
no earlier run used (an earlier run's directory holds its checkpoints and WAL), and the pair stays
aligned (``distill.N`` with ``rl_only.N``)."""

from benchmarks.bench_distill import _fresh


def test_a_new_root_gets_the_plain_names(tmp_path):
    got = _fresh(tmp_path / "runs", ("distill", "rl_only"))
    assert got == {"distill": tmp_path / "runs" / "distill",
                   "rl_only": tmp_path / "runs" / "rl_only"}


def test_a_rerun_never_reuses_a_run_directory(tmp_path):
    runs = tmp_path / "runs"
    for name in ("distill", "rl_only", "distill.2", "rl_only.2"):
        (runs / name).mkdir(parents=True)
    got = _fresh(runs, ("distill", "rl_only"))
    assert got == {"distill": runs / "distill.3", "rl_only": runs / "rl_only.3"}


def test_one_used_name_moves_the_pair_on(tmp_path):
    runs = tmp_path / "runs"
    (runs / "rl_only").mkdir(parents=True)  # a first run that died after its distill job's dir
    assert _fresh(runs, ("distill", "rl_only")) == {"distill": runs / "distill.2",
                                                    "rl_only": runs / "rl_only.2"}
