"""Environments: what a multi-turn episode talks to (``task.env``: a class built with no
arguments, one per sample, with ``reset(example) -> messages`` and ``step(text) -> (messages,
reward, done, info)``, sync or async, optional ``tools``; rollout_server/ROLLOUT.md), and how its
conversation becomes token ids (``ChatRenderer``).

Invariant: a conversation's ids are the prompt ids, then per turn the engine's own generated ids
(never re-tokenized: the ids sampled are the ids trained on), then the ids of the text the
template adds after the assistant's content (the longer rendering minus the shorter). This needs
a template that renders a conversation as a prefix of its continuation; any other is refused with
``TemplateError``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import msgspec

from areal_like.tasks.callables import import_function
from areal_like.tasks.task import chat_template_of


class TemplateError(ValueError):
    """The chat template cannot be continued turn by turn (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class StepResult:
    messages: list[dict]
    reward: float = 0.0
    done: bool = False
    info: dict = field(default_factory=dict)


async def maybe_await(value: Any) -> Any:
    """``value``, awaited when it is awaitable (environments may be sync or async)."""
    return await value if inspect.isawaitable(value) else value


def as_step_result(value: Any, env: str) -> StepResult:
    """A ``StepResult`` from what ``step`` of ``env`` (its ``task.env``) returned; a bad shape
    raises TypeError naming it. Numpy values in ``info`` become plain numbers and lists."""
    if isinstance(value, StepResult):
        value = (value.messages, value.reward, value.done, value.info)
    if isinstance(value, tuple) and len(value) == 4:
        messages, reward, done, info = value
        if not (isinstance(reward, numbers.Real) and math.isfinite(reward)):  # bools are 0/1
            raise TypeError(f"environment {env} step returned reward {reward!r}; expected a "
                            "finite number")
        return StepResult(check_messages(messages, f"{env} step"), float(reward), bool(done),
                          plain_info(info, env))
    raise TypeError(f"environment {env} step returned {type(value).__name__}; "
                    "expected (messages, reward, done, info)")


def plain_info(info: Any, env: str) -> dict:
    """``info`` as the wire carries it (a trajectory's metadata is msgpack): numpy scalars and
    arrays become numbers and lists; a value msgpack cannot carry raises TypeError naming its
    key, here rather than in the frame encoder once the group is done."""
    if not isinstance(info, dict | None):
        raise TypeError(f"environment {env} step returned info {info!r:.80}; expected a dict")
    plain = {}
    for key, value in (info or {}).items():
        try:
            plain[key] = msgspec.msgpack.decode(msgspec.msgpack.encode(value, enc_hook=_tolist))
        except (TypeError, ValueError, OverflowError, msgspec.MsgspecError) as e:
            raise TypeError(f"environment {env} step returned info[{key!r}] = {value!r:.80}, "
                            f"which cannot go on the wire ({e}); expected numbers, strings, "
                            "lists and dicts of them, or numpy values") from None
    return plain


def _tolist(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalar or array
        return value.tolist()
    raise TypeError(f"a {type(value).__name__}")


def check_messages(messages: Any, where: str) -> list[dict]:
    """``messages`` as a list of ``{"role": str, "content": str, ...}``; TypeError naming
    ``where``."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"environment {where} returned {type(messages).__name__}; "
                        "expected a list of messages")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise TypeError(f"environment {where} returned a message that is not "
                            f"{{'role': str, 'content': str}}: {m!r}")
    return [dict(m) for m in messages]


def load_environment(path: str) -> Any:
    """A new environment from the class (or factory) at ``path``; its methods are checked here."""
    factory = import_function(path)
    env = factory()
    for method in ("reset", "step"):
        if not callable(getattr(env, method, None)):
            raise TypeError(f"task.env={path!r} built a {type(env).__name__} without a "
                            f"{method}() method")
    return env


def env_template(tokenizer: Any, task_cfg: Any) -> str:
    """The chat template of a multi-turn task (``none`` is refused by ``TaskConfig``)."""
    if not (template := chat_template_of(tokenizer, task_cfg)):
        raise ValueError("task.env needs a chat template: the tokenizer has none; set "
                         "task.chat_template")
    return template


class ChatRenderer:
    """Conversation text and ids under one chat template (module docstring: the invariant)."""

    def __init__(self, tokenizer: Any, template: str, tools: list[dict] | None = None):
        self.tokenizer, self.template = tokenizer, template
        self.tools = tools or None  # OpenAI-style function specs, for templates that list tools

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template,
                                                  tools=self.tools,
                                                  add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt=True))

    def continuation_ids(self, messages: list[dict], assistant_text: str, generated_ids: list[int],
                         new_messages: list[dict]) -> list[int]:
        """The context ids that follow a turn's generated ids: the rest of the assistant turn's
        markup the engine did not generate (e.g. the newline after ``<|im_end|>``), the new messages
        and the next generation prompt. ``messages`` is the conversation before the assistant
        turn."""
        before = self.render(messages, add_generation_prompt=True)
        after = self.render(messages + [{"role": "assistant", "content": assistant_text}]
                            + new_messages,
                            add_generation_prompt=True)
        if not after.startswith(before):
            raise TemplateError("the chat template renders a conversation differently once it "
                                "continues (earlier turns rewritten); multi-turn episodes need a "
                                "prefix-stable template")
        rest = after[len(before):]
        if not rest.startswith(assistant_text):
            raise TemplateError("the chat template does not render the assistant's content "
                                f"verbatim (expected it to start with {assistant_text[:40]!r}, "
                                f"got {rest[:40]!r})")
        rest = rest[len(assistant_text):]
        # the special token that ended the turn (its EOS) is already in the ids; the content
        # (decoded without special tokens) may have lost others the model generated before it
        last = generated_ids[-1:]
        tail = (self.tokenizer.decode(last, skip_special_tokens=False)
                if last and last[0] in self.tokenizer.all_special_ids else "")
        if tail and rest.startswith(tail):
            rest = rest[len(tail):]
        return self.encode(rest)
