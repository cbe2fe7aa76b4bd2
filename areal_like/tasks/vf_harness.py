"""The harness of ``task=verifiers`` episodes: verifiers' own chat program (the null harness's
tool-calling loop over MCP tools), run in the agent worker's process instead of a ``uv`` script in
a runtime (verifiers allows a harness to run its loop in-process when every model call goes to its
interception endpoint). In-process an episode costs about 0.3 s where the program's own process
cost about 4 s on a 2-core machine.
"""
from __future__ import annotations

import argparse
import ssl
import types
from contextlib import AsyncExitStack
from functools import cache

import httpx
from openai import AsyncOpenAI, DefaultAsyncHttpxClient
from verifiers.v1.harnesses.null import NullHarness
from verifiers.v1.harnesses.utils.launch import CHAT_PROGRAM_SOURCE
from verifiers.v1.runtimes import ProgramResult

from areal_like.tasks.verifiers_env import chat_messages


@cache
def tls() -> ssl.SSLContext:
    """httpx's default TLS context, made once a process: each client made its own, reading the CA
    bundle (about a third of an episode's CPU), twice an episode, for loopback http."""
    return httpx.create_ssl_context()


@cache
def chat_program() -> types.ModuleType:
    """verifiers' chat program as a module (its source bundles its utilities into one script)."""
    module = types.ModuleType("verifiers_chat_program")
    exec(compile(CHAT_PROGRAM_SOURCE, "<verifiers chat program>", "exec"), module.__dict__)
    return module


class InProcessChatHarness(NullHarness):
    async def setup(self, runtime) -> None:
        """Nothing to install: the program's packages are the worker's."""

    async def launch(self, ctx, trace, runtime, endpoint, secret, mcp_urls, data,
                     tool_interception_url=None) -> ProgramResult:
        messages = chat_messages(*self.resolve_prompt(data))
        args = argparse.Namespace(tool_interception_url=tool_interception_url or "",
                                  api_key=secret, bash=False, edit=False, search=False)
        servers = {n: {"url": u, "timeout": self.config.tool_timeout} for n, u in mcp_urls.items()}
        program = chat_program()
        async with (AsyncExitStack() as stack,
                    AsyncOpenAI(base_url=endpoint, api_key=secret,
                                http_client=DefaultAsyncHttpxClient(verify=tls())) as client,
                    httpx.AsyncClient(verify=tls()) as tool_client):
            tools, dispatch, live = ([], {}, {}) if not servers else await program.connect_mcp(
                {"mcpServers": servers}, stack, set())
            compactor = program.Compactor(client, ctx.model, tools, False, None)
            compactor.note_good(messages)
            await program.run_chat_loop(args, compactor, messages, dispatch, live, tool_client)
        return ProgramResult(exit_code=0, stdout="", stderr="")


__all__ = ["InProcessChatHarness"]
