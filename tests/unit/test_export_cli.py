"""areal-like export of an unreadable (cut, deleted meanwhile) checkpoint: one line, exit 2."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings

import pytest
import torch.distributed.checkpoint as dcp

from areal_like.settings.config import EXPORT_TASK_FILE, export_settings, load_config, to_yaml
from areal_like.weights.hf import build_model
from trainer import checkpoint
from trainer.export import main


def _checkpoint(tmp_path):
    """A run directory holding the model's DCP checkpoint v3 and its config.yaml."""
    cfg = load_config([])
    ckpt = tmp_path / "checkpoints" / "v00000003"
    with warnings.catch_warnings():  # DCP warns that it runs in a single process: it is meant to
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": build_model(cfg.model, device="cpu", dtype="float32").state_dict()},
                 checkpoint_id=str(ckpt), no_dist=True)
    # what marks a complete checkpoint; export reads only the policy version from it (none here)
    (ckpt / "meta.pt").write_bytes(b"")
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    return ckpt


def _export(source, out, capsys) -> tuple[int, str]:
    code = main([str(source), str(out)])
    return code, capsys.readouterr().err


OTHER_SETTINGS = {"other_model": ["model.intermediate_size=192"],
                  "other_lora": ["trainer.lora.rank=4", "export.merged=true"]}


@pytest.mark.parametrize("damage", ["cut", "empty", "planted", *OTHER_SETTINGS])
def test_a_checkpoint_it_cannot_export_is_refused_in_one_line_naming_why(tmp_path, capsys,
                                                                          damage):
    ckpt = _checkpoint(tmp_path)
    if damage == "cut":
        [data] = ckpt.glob("*.distcp")
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage in ("empty", "planted"):
        (ckpt / ".metadata").write_bytes(pickle.dumps({"planted": 1}) if damage == "planted"
                                         else b"")
    else:  # a checkpoint of other settings is not called damaged
        (tmp_path / "config.yaml").write_text(to_yaml(load_config(OTHER_SETTINGS[damage])))
    code, err = _export(ckpt, tmp_path / "out", capsys)
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    if damage == "cut":
        assert f"checkpoint {ckpt} cannot be read" in err and "damaged" in err, err
    elif damage == "empty":
        assert f"checkpoint {ckpt} cannot be read (EOFError: .metadata is empty)" in err, err
        assert "damaged" in err and "not written by this trainer" not in err, err
    elif damage == "planted":
        assert f"{ckpt / '.metadata'} holds objects other than" in err and "(planted" in err, err
    else:
        assert "holds another model's weights" in err and "damaged" not in err, err
        assert "--config-file" in err


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_checkpoint_its_job_deletes_under_the_export_is_named_as_deleted(
        tmp_path, capsys, monkeypatch, when):
    ckpt = _checkpoint(tmp_path)
    read_metadata = checkpoint.read_dcp_metadata

    def deleted(path):  # the job's retention, racing the export's read
        if ckpt.exists() and when == "before":
            shutil.rmtree(ckpt)
        metadata = read_metadata(path)
        if ckpt.exists():
            shutil.rmtree(ckpt)
        return metadata

    monkeypatch.setattr(checkpoint, "read_dcp_metadata", deleted)
    code, err = _export(tmp_path / "checkpoints", tmp_path / "out", capsys)  # its newest
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert f"{ckpt} was deleted while it was read" in err and "keep_checkpoints" in err, err
    assert not (tmp_path / "out").exists()


def test_an_exports_tokenizer_config_carries_no_loader_arguments(tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    from areal_like.tasks.tokenizer import char_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tmp_path / "base"
    base = load_config([])
    build_model(base.model, device="cpu", dtype="float32").save_pretrained(str(source))
    char_tokenizer().save_pretrained(str(source))
    before = json.loads((source / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & before.keys()
    run = tmp_path / "run"
    ckpt = _checkpoint(run)
    (run / "config.yaml").write_text(to_yaml(load_config(["model=local_hf",
                                                          f"model.path={source}"])))
    assert _export(ckpt, tmp_path / "out", capsys)[0] == 0
    # its version for eval from the v%08d name when meta.pt says none (empty here): not a crash
    assert export_settings((tmp_path / "out" / EXPORT_TASK_FILE).read_text())[1] == 3
    written = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & written.keys(), written
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert loaded("a+b=c")["input_ids"] == char_tokenizer()("a+b=c")["input_ids"]
