"""``python -m sglang.launch_server`` for CPU tests: the embedded engine's HTTP server.

SGLang needs a GPU. On this directory's ``PYTHONPATH`` a rollout server with
``rollout.engine.kind=sglang`` starts, through its real launcher
(``rollout_server/engine_process.py``: ``spawn_tied``, own process group, the API key in its
``--config`` file), this module in SGLang's place; it becomes (exec, same PID)
``python -m rollout_server.engine``, which speaks SGLang's HTTP protocol, on the
``--host``/``--port`` SGLang was given, requiring the ``api_key`` of that file. The model and
engine sizing come from the config in ``AREAL_LIKE_STANDIN_CONFIG``; its PID is appended to
``AREAL_LIKE_STANDIN_PIDS`` (a file) so that a test can inject faults into
the engine by PID. Other SGLang flags are ignored.

With ``AREAL_LIKE_STANDIN_EXIT_LAG_S`` the engine runs as a child instead (its PID in the file) and
this process exits as it did (``kill -9``: by SIGKILL) that many seconds after it: a dying SGLang
closes its sockets a moment before its parent can see it exit; this widens that moment.
"""

import os
import signal
import sys
import time

from areal_like.daemon import popen_tied


def main(argv: list[str]) -> None:
    flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1)
             if argv[i] in ("--host", "--port", "--config")}
    env = dict(os.environ)
    if "--config" in flags:  # SGLang's file of options: the launcher passes the API key there
        import yaml

        with open(flags["--config"]) as f:
            key = (yaml.safe_load(f) or {}).get("api-key")
        if key:
            env["AREAL_LIKE_ENGINE_API_KEY"] = key
    argv = [sys.executable, "-m", "rollout_server.engine", "--config-file",
            os.environ["AREAL_LIKE_STANDIN_CONFIG"], "--host", flags["--host"], "--port",
            flags["--port"], "rollout.engine.kind=embedded"]  # the engine itself, not a launch
    lag = os.environ.get("AREAL_LIKE_STANDIN_EXIT_LAG_S")
    if lag is None:
        record_pid(os.getpid())
        os.execve(sys.executable, argv, env)
    engine = popen_tied(argv, signal.SIGKILL, env=env)
    record_pid(engine.pid)
    code = engine.wait()
    time.sleep(float(lag))  # the injected fault: the exit reported late
    if code < 0:
        os.kill(os.getpid(), -code)
    sys.exit(code)


def record_pid(pid: int) -> None:
    with open(os.environ["AREAL_LIKE_STANDIN_PIDS"], "a") as f:
        f.write(f"{pid}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
