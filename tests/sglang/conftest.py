"""The SGLang tier: the real pinned SGLang (0.5.23) on CPU, launched and driven by the project.

Everything under tests/sglang is marked ``sglang``; the default run deselects it (pyproject
addopts, like ``gpu``). It runs in the environment ``tests/sglang/setup_env.sh DIR`` makes
(sglang==0.5.23 with the ``gpu`` extra's torch 2.14.1 and transformers 5.19.0):

    tests/sglang/setup_env.sh .sglang-env
    .sglang-env/bin/python -m pytest -p no:xdist -m sglang tests/sglang

Run anywhere else it fails, loudly, rather than skipping: a tier that quietly does not run is
the untested path it exists to cover. One SGLang server (``sglang_server``, about 3.4 GB and
30-75 s to start) serves the whole session; the tests that need one of their own (a fault, a
server flag) start it themselves and stop it by PID, and every test checks that no process, port
or /dev/shm file it made is left behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sglang_kit import save_model, start_server

from rollout_server.launch_sglang import installed_sglang
from rollout_server.sglang_cpu import SGLANG_VERSION

_HERE = Path(__file__).resolve().parent
TIMEOUT_S = (
    900  # per test, fixtures included: one SGLang start takes 30-130 s on a loaded 2-core machine
)


@pytest.hookimpl(tryfirst=True)  # mark before `-m 'not sglang'` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.sglang)
            item.add_marker(pytest.mark.timeout(TIMEOUT_S))  # a test's own timeout mark comes first


@pytest.fixture(scope="session", autouse=True)
def pinned_sglang() -> str:
    found = installed_sglang()
    if found != SGLANG_VERSION:
        pytest.fail(
            f"the sglang tier needs sglang=={SGLANG_VERSION} in this Python ({found or 'none'} "
            "found): make its environment with tests/sglang/setup_env.sh DIR and run "
            "DIR/bin/python -m pytest "
            "-m sglang tests/sglang",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def sglang_server(model_dir, tmp_path_factory):
    """The session's SGLang server, serving ``model_dir`` (init seed 0) at weight version "0",
    with ``--enable-metrics`` (the live contract test reads ``/metrics``)."""
    server = start_server(
        model_dir, tmp_path_factory.mktemp("sglang-log") / "sglang.log", enable_metrics=True
    )
    try:
        yield server
    finally:
        server.proc.stop()
