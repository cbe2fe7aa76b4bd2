"""trainer/checkpoint.py's ``dcp_load`` reads DCP's non-tensor values once, with weights_only, and
that object lands in the state (never re-parsed by an unrestricted unpickler)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed.checkpoint as dcp

from trainer.checkpoint import dcp_load


def test_non_tensor_values_are_never_unpickled_unrestricted(tmp_path, monkeypatch):
    saved = {"model": {"w": torch.arange(4.0)},
             "optim": {"param_groups": [{"lr": 0.25, "betas": (0.9, 0.95), "name": "g0"}]}}
    with warnings.catch_warnings():  # DCP warns that it runs in a single process: it is meant to
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(saved, checkpoint_id=str(tmp_path), no_dist=True)
    real_load, unrestricted = torch.load, []

    def load(*args, **kwargs):
        if kwargs.get("weights_only") is False:
            unrestricted.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    state = {"model": {"w": torch.zeros(4)},
             "optim": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "name": ""}]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp_load(state, tmp_path, no_dist=True)
    assert unrestricted == []  # before: one weights_only=False load per non-tensor value
    assert torch.equal(state["model"]["w"], torch.arange(4.0))
    assert state["optim"]["param_groups"][0] == saved["optim"]["param_groups"][0]
