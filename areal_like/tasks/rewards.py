"""The math-answer reward: a response's final answer graded against the reference by math-verify.

What is normalised, what matches and the known limits: areal_like/tasks/TASKS.md.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache

from math_verify import (
    ExprExtractionConfig,
    LatexExtractionConfig,
    StringExtractionConfig,
    parse,
    verify,
)

PARSE_TIMEOUT_S = 2  # whole seconds (signal.alarm); a parse past it yields nothing: 0.0
VERIFY_TIMEOUT_S = 2  # per comparison of one reference reading with one response reading

# The response: a \boxed{} first (priority 0), then math-verify's usual anchors and fallbacks.
RESPONSE_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
REFERENCE_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
CHOICES = "ABCDE"
CHOICE_CONFIG = (LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
                 StringExtractionConfig(strings=tuple(CHOICES)))

_REFERENCE_CHOICE = re.compile(rf"(?:\\text(?:bf)?\{{)?\s*\(?([{CHOICES}])\)?\s*\}}?")
_PARENTHESISED_CHOICE = re.compile(rf"\(([{CHOICES}])\)")
_PERCENT = re.compile(r"\\?%")
# A minus sign takes no leading zero but zero itself: math-verify reads a bare "-07" as nothing.
_PLAIN_INTEGER = re.compile(r"[0-9]{1,15}|-(?:0+|[1-9][0-9]{0,14})")


def _normalise(text: str) -> str:
    return _PERCENT.sub("", text.replace("{,}", ","))


def _timeout(seconds: int) -> int | None:
    """math-verify's own timeout where its signal.alarm works (the main thread), else none."""
    return seconds if threading.current_thread() is threading.main_thread() else None


def _reference(answer: str) -> tuple:
    """The reference's readings (sympy objects and strings), () when it has none."""
    try:
        return _parsed_reference(answer)
    except LookupError:
        return ()


@lru_cache(maxsize=4096)
def _parsed_reference(answer: str) -> tuple:
    """A group's samples share one parse. No reading raises, so it is not cached: a parse past
    its timeout also yields none (a loaded machine; the first parse imports sympy), and cached it
    scored every later sample of that reference 0."""
    if found := tuple(parse(f"${_normalise(answer)}$", list(REFERENCE_CONFIG),
                            parsing_timeout=_timeout(PARSE_TIMEOUT_S))):
        return found
    raise LookupError(answer)


def _choice(response: str) -> str | None:
    """The choice letter a response gives, upper case, or None."""
    text = _PARENTHESISED_CHOICE.sub(r" \1 ", response)
    found = parse(text, list(CHOICE_CONFIG), parsing_timeout=_timeout(PARSE_TIMEOUT_S))
    letter = str(found[0]).strip().upper() if found else ""
    return letter if len(letter) == 1 and letter in CHOICES else None


def math_reward(response: str, example) -> float:
    """1.0 when the response's final answer equals ``example.answer``, else 0.0."""
    if (plain := _PLAIN_INTEGER.fullmatch(response.strip())) and (
            ref := _PLAIN_INTEGER.fullmatch(example.answer.strip())):
        return 1.0 if int(plain.group()) == int(ref.group()) else 0.0
    choice = _REFERENCE_CHOICE.fullmatch(example.answer.strip())
    if choice is not None:
        return 1.0 if _choice(response) == choice.group(1) else 0.0
    reference = _reference(example.answer)
    if not reference:
        return 0.0
    got = parse(_normalise(response), list(RESPONSE_CONFIG),
                parsing_timeout=_timeout(PARSE_TIMEOUT_S))
    if not got:
        return 0.0
    return 1.0 if verify(list(reference), got, timeout_seconds=_timeout(VERIFY_TIMEOUT_S)) else 0.0
