"""``areal-like sft`` refuses, before training, what it cannot do: one ``error:`` line naming the
key or flag, exit 2 (its training: tests/integration/test_sft.py)."""

from __future__ import annotations

import pytest

from launch.cli import main


@pytest.mark.parametrize("args, says", [
    (["warm_start.steps=0"],
     "error: warm_start.steps=0: set warm_start.steps=N, the number of SFT optimizer steps"),
    (["--out", "{tmp}/model"], "error: {tmp}/model exists: give --out a new directory"),
    (["--nproc-per-node", "0"], "argument --nproc-per-node: 0 is not a count >= 1"),
    (["warm_start.steps=5", "warm_start.dataset_path={tmp}/nope.jsonl"],  # checked as run does
     "warm_start.dataset_path='{tmp}/nope.jsonl' does not exist"),
])
def test_sft_refuses_what_it_cannot_do_naming_the_key(tmp_path, capsys, args, says):
    (tmp_path / "model").mkdir()
    try:
        code = main(["sft", *(a.format(tmp=tmp_path) for a in args), f"run_dir={tmp_path / 'run'}"])
    except SystemExit as e:  # argparse's refusal
        code = e.code
    assert code == 2
    assert says.format(tmp=tmp_path) in capsys.readouterr().err
    assert list((tmp_path / "model").iterdir()) == [] and not (tmp_path / "warmstart").exists()
