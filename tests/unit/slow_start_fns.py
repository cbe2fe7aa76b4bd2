"""A worker function whose module takes ``START_S`` to import: a worker's startup that a call's
measured seconds must not include (tests/unit/test_tool_sandbox.py)."""

import time

START_S = 3.0
time.sleep(START_S)


def add(a: int, b: int) -> int:
    return a + b
