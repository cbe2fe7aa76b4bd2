"""The API key in front of every vLLM route but ``/health``: an ASGI middleware vLLM's
``--middleware`` flag loads into its API server (rollout_server/launch_vllm.py passes it).

vLLM's own ``--api-key`` (and ``VLLM_API_KEY``) checks only paths under ``/v1``, ``/v2``,
``/inference`` and ``/cohere``; its pause, resume, weight-transfer, ``/collective_rpc`` and
``/server_info`` routes (``VLLM_SERVER_DEV_MODE``) answer anyone who reaches the port. This one
answers 401 to any request to another path than ``/health`` without ``Authorization: Bearer
<VLLM_API_KEY>`` (compared in constant time); without a key in its environment it lets all
through, as vLLM does. Imported only in vLLM's API server process.
"""
from __future__ import annotations

import hmac
import json
import os

OPEN_PATHS = ("/health",)  # the rollout server's health poll carries no key (engine_process.py)


class KeyGuard:
    def __init__(self, app):
        self.app = app
        key = os.environ.get("VLLM_API_KEY") or ""
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if (self.expected is None or scope["type"] not in ("http", "websocket")
                or scope.get("path") in OPEN_PATHS):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps({"error": "Unauthorized"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
