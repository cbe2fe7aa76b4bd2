"""``benchmarks/bench_distill.py`` on a reused ``--root``: each rerun's two jobs get run directories
no earlier run used (they hold its checkpoints and WAL), the pair aligned (distill.N, rl_only.N)."""

import pytest

from benchmarks.bench_distill import _fresh


@pytest.mark.parametrize("used, suffix", [
    ((), ""),  # a new root: the plain names
    (("distill", "rl_only", "distill.2", "rl_only.2"), ".3"),
    (("rl_only",), ".2"),  # a first run that died after its distill job's directory
])
def test_a_rerun_never_reuses_a_run_directory_and_keeps_the_pair_aligned(tmp_path, used, suffix):
    runs = tmp_path / "runs"
    for name in used:
        (runs / name).mkdir(parents=True)
    assert _fresh(runs, ("distill", "rl_only")) == {"distill": runs / f"distill{suffix}",
                                                    "rl_only": runs / f"rl_only{suffix}"}
