"""Reward functions for tests/unit/test_reward_pool.py, imported by path inside reward workers.

``behave`` does what its response names; a number is its own reward. Kept free of heavy imports:
a worker imports this module under a small address-space limit.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time

SECRET_VAR = "AREAL_TEST_API_TOKEN"


def behave(response: str, example) -> object:
    if response == "crash":
        raise ZeroDivisionError("division by zero on purpose")
    if response == "bad_error":  # an exception whose message cannot be made
        raise type("BadError", (Exception,), {"__str__": lambda self: 1 / 0})()
    if response == "hang":
        while True:
            time.sleep(1)
    if response == "hog":
        return len(bytearray(4 * 2**30))  # 4 GiB, far past the worker's address-space limit
    if response == "exit":
        os._exit(3)
    if response == "sys_exit":  # SystemExit, not os._exit: what a reward's exit() raises
        sys.exit(3)
    if response == "huge":
        return 10**400  # an int past a double's range
    if response == "nan":
        return float("nan")
    if response == "text":
        return "1.0"  # a string is not a reward, even one that reads as a number
    if response == "pid":
        return os.getpid()
    if response == "secret":  # 1.0 if the secret is visible to the worker in any way
        with open("/proc/self/environ", "rb") as f:
            initial = f.read()
        return float(SECRET_VAR in os.environ or SECRET_VAR.encode() in initial)
    if response == "memory_limit":  # the worker's address-space limit, in MiB
        return resource.getrlimit(resource.RLIMIT_AS)[0] / 2**20
    if response == "cpu_limit_left":  # CPU seconds this worker may still use before SIGXCPU
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return resource.getrlimit(resource.RLIMIT_CPU)[0] - usage.ru_utime - usage.ru_stime
    if response == "child":  # start a process of its own and leave it running
        return subprocess.Popen(["sleep", "600"]).pid
    if response.startswith("rendezvous "):  # "rendezvous PORT": what a loopback server answers
        # once every worker has connected (workers share no files: each has its own /tmp as root)
        with socket.create_connection(("127.0.0.1", int(response.split()[1]))) as conn:
            return float(conn.makefile().read())
    if response.startswith("reply "):  # "reply N": a result of N characters (not a reward)
        return "x" * int(response.split()[1])
    if response == "forged_frame":  # a frame header of a terabyte, written on the pool's socket
        os.write(int(sys.argv[1]), (2**40).to_bytes(8, "big") + b"x" * 4096)
        time.sleep(60)
    if response.startswith("long "):  # a long response: its length
        return float(len(response))
    # "sleep S V": reward V after S seconds (to shuffle finishing order)
    if response.startswith("sleep "):
        _, seconds, value = response.split()
        time.sleep(float(seconds))
        return float(value)
    return float(response)


def fork_bomb(limit: int) -> int:
    """Fork until refused (at most ``limit`` times, so that a test cannot take the machine down
    should the process limit fail); each child sleeps, then exits. Returns how many forks worked."""
    forked = 0
    for _ in range(limit):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        forked += 1
    return forked


def spin_forks() -> None:
    """A fork bomb that ignores the refusals: it never returns."""
    while True:
        try:
            if os.fork() == 0:
                os._exit(0)
        except OSError:
            pass


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)  # reads address 0: SIGSEGV


def identity() -> dict:
    """What the sandbox lets the call see about itself."""
    return {"uid": os.getuid(), "env": sorted(os.environ),
            "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
            "memory": resource.getrlimit(resource.RLIMIT_AS)[0]}


def add(a: int, b: int) -> dict:
    return {"sum": a + b, "args": [a, b]}


def blas_matmul(n: int) -> dict:
    """numpy imported at the first call, after the worker's RLIMIT_NPROC is set (as a tool module
    that imports numpy is): OpenBLAS starts its thread pool then."""
    import numpy as np

    return {"sum": float((np.ones((n, n)) @ np.ones((n, n))).sum()),
            "threads": {name: os.environ.get(name) for name in
                        ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}


async def async_add(a: int, b: int) -> dict:
    """A tool written as ``async def``; as a reward (``async_add(response, example)``) too."""
    return add(a, b)


NOT_CALLABLE = 3


def behave_or_bomb(response: str, example) -> object:
    return fork_bomb(64) if response == "bomb" else behave(response, example)
