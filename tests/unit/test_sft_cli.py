"""``areal-like sft`` refuses, before training, what it cannot do: one ``error:`` line naming the
key or flag, exit 2 (its training: tests/integration/test_sft.py)."""

from __future__ import annotations

import pytest

from launch.cli import main


def test_sft_without_steps_names_the_key(tmp_path, capsys):
    assert main(["sft", f"run_dir={tmp_path / 'run'}", "warm_start.steps=0"]) == 2
    err = capsys.readouterr().err
    assert "error: warm_start.steps=0: set warm_start.steps=N, the number of SFT optimizer steps" \
        in err
    assert not (tmp_path / "warmstart").exists()


def test_sft_into_an_existing_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    assert main(["sft", "--out", str(out), f"run_dir={tmp_path / 'run'}"]) == 2
    assert f"error: {out} exists: give --out a new directory" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_sft_ranks_must_be_a_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--nproc-per-node", "0", f"run_dir={tmp_path / 'run'}"])
    assert e.value.code == 2
    assert "argument --nproc-per-node: 0 is not a count >= 1" in capsys.readouterr().err


def test_sft_checks_its_inputs_as_run_does(tmp_path, capsys):
    assert main(["sft", f"run_dir={tmp_path / 'run'}", "warm_start.steps=5",
                 f"warm_start.dataset_path={tmp_path / 'nope.jsonl'}"]) == 2
    assert f"warm_start.dataset_path='{tmp_path / 'nope.jsonl'}' does not exist" in \
        capsys.readouterr().err
