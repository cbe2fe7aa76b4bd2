"""configs/REFERENCE.md is what ``python -m areal_like.settings.reference`` prints from the schema,
and every key in it has a description (a schema field without its comment fails here)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from areal_like.settings.reference import Key, keys, render, walk

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "python -m areal_like.settings.reference > configs/REFERENCE.md"


def test_the_committed_reference_is_what_the_schema_generates():
    out = subprocess.run([sys.executable, "-m", "areal_like.settings.reference"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    committed = (ROOT / "configs" / "REFERENCE.md").read_text()
    assert out == committed, f"configs/REFERENCE.md is stale: run `{REGENERATE}`"


def test_every_key_has_a_description():
    missing = [k.path for k in keys() if not k.description]
    assert not missing, (f"schema fields without a comment (write one above the field or at the "
                         f"end of its line, then `{REGENERATE}`): {missing}")


def test_every_leaf_key_of_the_schema_is_listed_with_its_effective_default():
    text = render()
    rows = {k.path: line for k in keys() for line in text.splitlines()
            if line.startswith(f"| `{k.path}` |")}
    assert len(rows) == len(keys()) > 200
    # configs/config.yaml sets 200 steps over the dataclass's 100: both are shown
    assert "`200 (schema: 100)`" in rows["trainer.steps"]
    # a key that does nothing on SGLang says so, in its own column
    assert "embedded engine" in rows["rollout.engine.max_running_requests"].split("|")[5]
    assert "one of 'grpo', 'drgrpo'" in rows["trainer.estimator"]
    # the bounds declared beside each field, a nullable one's saying so
    assert "in [0, 1]" in rows["trainer.critic.lambda_actor"]
    assert "null or >= 1" in rows["launch.trainer_ranks"]


@dataclass
class _Section:
    """A section."""

    # above the field,
    # on two lines
    documented: int = 1  # and at its end
    scoped: str = "x"  # [sglang only] a flag
    bare: float = 0.5


def test_descriptions_come_from_the_comments_beside_each_field():
    rows = {k.path: k for _, k in walk(_Section) if isinstance(k, Key)}
    assert rows["documented"].description == "above the field, on two lines and at its end"
    assert (rows["scoped"].applies, rows["scoped"].description) == ("sglang", "a flag")
    assert rows["bare"].description == "" and rows["bare"].bounds == ["a finite number"]
