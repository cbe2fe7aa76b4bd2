"""GPU tests: everything under tests/gpu is marked ``gpu`` and skips cleanly without CUDA.

The default run deselects them (``-m 'not gpu'`` in pyproject); ``pytest -m gpu`` runs them
where a GPU exists and reports them as skipped (not failed, not errored) where none does.

``figure(name, value, unit)``: a measured figure of a test (tokens/s, seconds), printed and
recorded as the junit property ``figure:<name>`` = ``"<value> <unit>"``, which
``tests/gpu/kit.py`` collects into ``tests/gpu/RESULTS.md``.

``artifact(name, text)``: a text file a test writes beside the figures (a profiler table): into
the folder the kit names in ``AREAL_KIT_ARTIFACTS`` (``profiles/`` beside ``RESULTS.md``), else
the test's own temporary folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

FIGURE_PREFIX = "figure:"  # tests/gpu/kit.py reads the junit properties with this prefix

_HERE = Path(__file__).resolve().parent


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.hookimpl(tryfirst=True)  # mark before `-m 'not gpu'` deselects
def pytest_collection_modifyitems(config, items):
    has_cuda: bool | None = None
    for item in items:
        if _HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if has_cuda is None:
            has_cuda = _cuda_available()
        if not has_cuda:
            item.add_marker(pytest.mark.skip(
                reason="needs a CUDA GPU (torch.cuda.is_available() is false)"))


@pytest.fixture
def figure(record_property) -> Callable[[str, float, str], None]:
    def record(name: str, value: float, unit: str) -> None:
        print(f"FIGURE {name} = {value:.4g} {unit}", flush=True)
        record_property(FIGURE_PREFIX + name, f"{value:.4g} {unit}")

    return record


ARTIFACTS_ENV = "AREAL_KIT_ARTIFACTS"  # as tests/gpu/kit.py sets it


@pytest.fixture
def artifact(tmp_path) -> Callable[[str, str], Path]:
    def write(name: str, text: str) -> Path:
        folder = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(text)
        print(f"ARTIFACT {path}", flush=True)
        return path

    return write
