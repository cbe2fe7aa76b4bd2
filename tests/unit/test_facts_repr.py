"""The engine API key in a daemon's facts never shows in their repr."""

from __future__ import annotations

from areal_like.net.auth import ENGINE_KEY_ENV
from areal_like.settings.config import RunConfig
from rollout_server.facts import RolloutFacts
from trainer.facts import TrainerFacts

KEY = "engine-key-that-must-not-leak"


def test_the_engine_key_is_kept_but_not_shown(tmp_path, monkeypatch):
    monkeypatch.setenv(ENGINE_KEY_ENV, KEY)
    cfg = RunConfig(run_dir=str(tmp_path))
    for facts in (RolloutFacts.from_run(cfg), TrainerFacts.from_run(cfg)):
        assert facts.engine_key == KEY
        assert KEY not in repr(facts), type(facts).__name__
