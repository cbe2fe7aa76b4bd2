"""Tools an environment offers the model: their registry, the calls found in generated text
(Qwen's / Hermes' ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), and what the model
reads back.

Invariant: a bad call never ends the episode: ``parse_tool_calls`` never raises (a malformed call
carries its ``error``) and ``ToolRegistry.check`` refuses an unknown tool or arguments against the
schema the same way; the model reads the error as a tool message. A broken schema (checked with
``jsonschema`` when the registry is built) is the environment's bug and fails the episode.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
MAX_RESULT_CHARS = 2000  # a tool result longer than this is cut (the context is the model's budget)


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: dict
    error: str = ""  # non-empty: the call is malformed and is answered with this error


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    function: str  # "pkg.module:fn"
    description: str
    parameters: dict  # JSON schema of the keyword arguments

    def openai(self) -> dict:
        """The spec as chat templates take it (``apply_chat_template(tools=...)``)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>...</tool_call>`` in ``text``, in order (module docstring); an opening tag
    without its closing tag is one malformed call."""
    calls = []
    for body in TOOL_CALL.findall(text):
        calls.append(_parse_one(body.strip()))
    if text.count("<tool_call>") > len(calls):
        calls.append(ToolCall("", {}, "unterminated <tool_call>: close it with </tool_call>"))
    return calls


def _parse_one(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("", {}, f"invalid JSON in tool call: {e.msg} at position {e.pos}")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall("", {}, 'a tool call is {"name": str, "arguments": {...}}')
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some templates put the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            return ToolCall(obj["name"], {},
                            f"invalid JSON in the arguments of {obj['name']}: {e.msg}")
    if not isinstance(args, dict):
        return ToolCall(obj["name"], {}, f"the arguments of {obj['name']} must be an object")
    return ToolCall(obj["name"], args)


class ToolRegistry:
    """Tools by name, their schemas checked once."""

    def __init__(self, specs: list[dict] | None):
        self.specs: dict[str, ToolSpec] = {}
        self.validators: dict[str, jsonschema.protocols.Validator] = {}
        for raw in specs or []:
            if not (isinstance(raw, dict) and isinstance(raw.get("name"), str)
                    and isinstance(raw.get("function"), str)):
                raise ValueError('a tool is {"name": str, "function": "pkg.module:fn", '
                                 f'"description": str, "parameters": JSON schema}}, not {raw!r}')
            spec = ToolSpec(name=raw["name"], function=raw["function"],
                            description=str(raw.get("description", "")),
                            parameters=dict(raw.get("parameters") or {"type": "object"}))
            try:
                jsonschema.Draft202012Validator.check_schema(spec.parameters)
            except jsonschema.SchemaError as e:  # its str is the whole meta-schema walk
                raise ValueError(f"tool {spec.name!r}: parameters is not a JSON schema: "
                                 f"{e.message}") from None
            if spec.name in self.specs:
                raise ValueError(f"tool {spec.name!r} is declared twice")
            self.specs[spec.name] = spec
            self.validators[spec.name] = jsonschema.Draft202012Validator(spec.parameters)

    def __bool__(self) -> bool:
        return bool(self.specs)

    def openai(self) -> list[dict]:
        return [s.openai() for s in self.specs.values()]

    def check(self, call: ToolCall) -> str:
        """Why ``call`` cannot run ("" when it can)."""
        if call.error:
            return call.error
        if call.name not in self.specs:
            return (f"unknown tool {call.name!r}; available: "
                    f"{', '.join(sorted(self.specs)) or 'none'}")
        error = jsonschema.exceptions.best_match(
            self.validators[call.name].iter_errors(call.arguments))
        if error is not None:
            where = "/".join(map(str, error.absolute_path)) or "arguments"
            return f"invalid arguments for {call.name}: {where}: {error.message}"
        return ""


def result_text(value: Any) -> str:
    """A tool's return value as the text the model reads (JSON unless it is a string)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + "...(cut)"


def tool_message(name: str, content: str, error: bool = False) -> dict:
    """The tool message appended after a call (an error reads ``error: ...``)."""
    return {"role": "tool", "name": name or "unknown",
            "content": f"error: {content}" if error else content}
