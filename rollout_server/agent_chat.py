"""OpenAI chat messages in and out of the agent endpoint: the request's checks, the tool-call
formats, how a conversation meets the chat template, and the answer in the OpenAI schema.

Pure functions; ``agent_endpoint.py`` serves them. Invariants:
* a request's wrong shape is refused (``RequestError``, 400); what else the OpenAI API knows is
  ignored;
* tool calls are parsed by transformers' response parser with the model family's template
  (``TOOL_FORMATS``); text it cannot read is plain content;
* ``key(message)`` is what two messages must share to be the same turn (role, text, tool calls as
  name and parsed arguments), so an agent that sends back the assistant message it was given, as
  a dict or as the SDK's object, is recognised;
* ``template_messages`` renders an assistant message the endpoint generated as the text the model
  generated, never a re-serialisation of it.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from openai.types import CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_message_function_tool_call import (
    ChatCompletionMessageFunctionToolCall,
    Function,
)
from transformers.utils.chat_parsing import parse_response

ROLES = ("system", "developer", "user", "assistant", "tool")
_CONTENT_END = r"\s*(?:<\|im_end\|>|<\|endoftext\|>|</s>|<eos>)"
_HERMES_CALLS = {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "repeats": True,
                 "content": "json", "transform": {"type": "function", "function": "{content}"}}
_MISTRAL_CALL = {"type": "function", "function": {"name": "{name}", "arguments": "{arguments}"}}
_MISTRAL_CALLS = {"open": "[TOOL_CALLS]", "close_pattern": r"$|</s>", "content": "json",
                  "transform_each": True, "transform": _MISTRAL_CALL}
_CONTENT = {"close_pattern": _CONTENT_END, "content": "text"}
TOOL_FORMATS = {  # transformers response templates (declarative; the library parses)
    "hermes": {"defaults": {"role": "assistant"}, "start_anchor": "<|im_start|>assistant\n",
               "fields": {"tool_calls": _HERMES_CALLS, "content": _CONTENT}},
    "mistral": {"defaults": {"role": "assistant"}, "start_anchor": "[/INST]",
                "fields": {"tool_calls": _MISTRAL_CALLS, "content": _CONTENT}},
}


class RequestError(ValueError):
    """A request the endpoint refuses (400), with the reason the client reads."""


# a conversation's JSON (a tool's schema, a call's arguments) is a few levels deep; one near what
# Python parses made encoding it again recurse past the interpreter's limit (a 500)
MAX_NESTING = 64
TOO_DEEP = f"the body is JSON nested deeper than {MAX_NESTING} levels"


def nested_deeper_than(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether ``value`` (parsed JSON) has lists or objects nested more than ``limit`` deep."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                  else item))
    return False


def text_of(content: Any) -> str:
    """A message's content as text: a string, None (""), or a list of ``{"type": "text"}`` parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError("message content must be a string or a list of text parts")


def check_request(body: Any) -> dict:
    """The request's messages, tools and limits (module docstring); RequestError otherwise."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    if nested_deeper_than(body):
        raise RequestError(TOO_DEEP)
    messages, tools = body.get("messages"), body.get("tools") or []
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"each message needs a role of {', '.join(ROLES)}")
        text_of(m.get("content"))
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(
                c.get("function"), dict) for c in calls):
            raise RequestError("tool_calls must be a list of {'function': {...}}")
        ids = [m.get("tool_call_id"), m.get("name")] + [v for c in calls for v in (
            c.get("id"), c["function"].get("name"))]
        if not all(v is None or isinstance(v, str) for v in ids):  # looked up and rendered
            raise RequestError("a message's name and tool call ids and names must be strings")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RequestError("tools must be a list of tool specs")
    if body.get("n") not in (None, 1):  # null is the API's default, 1
        raise RequestError("n must be 1: one episode samples one answer per call")
    if body.get("stream") not in (None, False, True):
        raise RequestError("stream must be true or false")
    limit = body.get("max_completion_tokens")  # the newer name wins; null counts as unset
    limit = body.get("max_tokens") if limit is None else limit
    if limit is not None and (type(limit) is not int or limit < 1):
        raise RequestError("max_tokens must be a positive integer")
    return {"messages": messages, "tools": tools, "max_tokens": limit,
            "model": str(body.get("model") or ""), "stream": bool(body.get("stream"))}


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, or nested past what Python parses
            return raw
        return raw if nested_deeper_than(parsed) else parsed  # too deep to handle: its text
    return raw


def key(message: dict) -> str:
    """What identifies a turn (module docstring), as a string to compare and look up."""
    calls = [[c["function"].get("name"), _arguments(c["function"].get("arguments"))]
             for c in message.get("tool_calls") or []]
    role = "system" if message["role"] == "developer" else message["role"]
    return json.dumps([role, text_of(message.get("content")), calls], sort_keys=True)


def template_messages(messages: list[dict], generated: dict[str, str]) -> list[dict]:
    """The conversation as the chat template takes it; ``generated``: key -> the text the model
    generated for an assistant message this endpoint answered."""
    names = {c.get("id"): c["function"].get("name") for m in messages
             for c in m.get("tool_calls") or []}
    out = []
    for m in messages:
        role, text = m["role"], text_of(m.get("content"))
        if role == "assistant" and key(m) in generated:
            out.append({"role": "assistant", "content": generated[key(m)]})
        elif role == "assistant" and m.get("tool_calls"):
            calls = [{"type": "function", "function": {"name": c["function"].get("name"),
                      "arguments": _arguments(c["function"].get("arguments"))}}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": text, "tool_calls": calls})
        elif role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id")) or "tool"
            out.append({"role": "tool", "name": name, "content": text})
        else:
            out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def parse_assistant(text: str, fmt: str, tools: list[dict]) -> tuple[str, list[dict]]:
    """(content, tool calls as OpenAI ``{"id", "type", "function": {"name", "arguments"}}``) of
    generated ``text`` in the tool-call format ``fmt``; malformed markup stays content."""
    if not tools:
        return text, []
    try:
        parsed = parse_response(text, TOOL_FORMATS[fmt], prefix="", tools=tools)
    except (ValueError, KeyError, TypeError):
        return text, []
    calls = []
    for c in parsed.get("tool_calls") or []:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return text, []
        args = fn.get("arguments", {})
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {
            "name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
    return (parsed.get("content") or "") if calls else text, calls


def completion(model: str, content: str, calls: list[dict], finish: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    """The answer in the OpenAI schema (the ``openai`` package's own types)."""
    tool_calls = [ChatCompletionMessageFunctionToolCall(
        id=c["id"], type="function", function=Function(**c["function"])) for c in calls]
    message = ChatCompletionMessage(role="assistant", content=content or None if calls else content,
                                    tool_calls=tool_calls or None)
    reason = "tool_calls" if calls else ("length" if finish == "length" else "stop")
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion", created=int(time.time()),
        model=model, choices=[Choice(index=0, message=message, finish_reason=reason)],
        usage=CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens),
    ).model_dump(mode="json")


def stream_events(answer: dict) -> bytes:
    """A ``completion`` as server-sent events for ``stream=true``: one chunk holding the whole
    message, then ``[DONE]`` (the answer is generated whole before it is sent)."""
    choice = answer["choices"][0]
    delta = {k: v for k, v in choice["message"].items() if v is not None}
    for i, call in enumerate(delta.get("tool_calls") or []):
        call["index"] = i
    chunk = {**answer, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": delta, "finish_reason": choice["finish_reason"]}]}
    return f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()


def models(model: str) -> dict:
    """``GET /v1/models``: the one model this endpoint serves."""
    return {"object": "list", "data": [Model(id=model, created=0, object="model",
                                              owned_by="areal-like").model_dump(mode="json")]}
