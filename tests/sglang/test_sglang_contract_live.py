"""The SGLang contract, live: our client against the real SGLang 0.5.23, checked with its own types.

``tests/integration/test_sglang_contract.py`` drives the embedded engine through a full cycle with
``SGLangClient`` and validates every body we send and every answer against SGLang's structs, read
from the pinned wheel. Here the same cycle (``drive_engine``: health, info, generate with
log-probs, one episode, pause mid-generation and continue, abort, flush, a 400 for a malformed
request, weight-update group destroy/init, bucketed broadcast from a sender process inside
begin/end weight update, update from disk, metrics) runs against the session's real server, and
the same checks validate what it really answered, with the structs of the installed package
(``api_types`` exec'd on its own, ``io_struct`` parsed: SGLang's ``__init__`` never runs).
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from test_sglang_contract import (  # noqa: E402
    API_TYPES,
    IO_STRUCT,
    check_control_requests,
    check_facts,
    check_generate_and_abort_requests,
    check_responses,
    contract_of,
    drive_engine,
    weight_sync_setup,
)


@pytest.fixture(scope="module")
def installed_contract():
    root = Path(importlib.util.find_spec("sglang").submodule_search_locations[0]).parent
    return contract_of((root / API_TYPES).read_text(), (root / IO_STRUCT).read_text())


@pytest.fixture(scope="module")
def live_run(sglang_server, tmp_path_factory):
    """(requests sent, responses received, facts) of one full cycle on the session's server."""
    plan, sender = weight_sync_setup()
    requests: list = []
    responses: list = []
    try:
        facts = asyncio.run(
            drive_engine(sglang_server.url, tmp_path_factory.mktemp("contract-live"), requests,
                         responses, plan, sender, api_key=sglang_server.api_key, door=True)
        )
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    return requests, responses, facts


def test_every_request_we_send_is_valid_for_the_real_sglang(installed_contract, live_run):
    api, structs = installed_contract
    check_generate_and_abort_requests(api, structs, live_run[0])
    check_control_requests(structs, live_run[0])


def test_every_real_sglang_answer_decodes_with_its_types(installed_contract, live_run):
    check_responses(*installed_contract, live_run[1], live_run[2])


def test_the_real_sglang_behaves_as_the_protocol_says(live_run):
    check_facts(live_run[2], first_version=None)  # the session's server: other tests push too
