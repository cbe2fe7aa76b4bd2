"""``python -m sglang.launch_server`` for CPU tests: the embedded engine's HTTP server.

SGLang needs a GPU. On this directory's ``PYTHONPATH`` a rollout server with
``rollout.engine.kind=sglang`` starts, through its real launcher
(``rollout_server/launch_sglang.py``: ``spawn_tied``, own process group, the API key on argv), this
module in SGLang's place; it becomes (exec, same PID) ``python -m rollout_server.engine``, which
speaks SGLang's HTTP protocol, on the ``--host``/``--port`` SGLang was given, requiring
``--api-key``. The model and engine sizing come from the config in ``AREAL_LIKE_STANDIN_CONFIG``;
its PID is appended to ``AREAL_LIKE_STANDIN_PIDS`` (a file) so that a test can inject faults into
the engine by PID. Other SGLang flags are ignored.
"""

import os
import sys


def main(argv: list[str]) -> None:
    flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1)
             if argv[i] in ("--host", "--port", "--api-key")}
    env = dict(os.environ)
    if "--api-key" in flags:
        env["AREAL_LIKE_ENGINE_API_KEY"] = flags["--api-key"]
    with open(os.environ["AREAL_LIKE_STANDIN_PIDS"], "a") as f:
        f.write(f"{os.getpid()}\n")
    os.execve(sys.executable, [sys.executable, "-m", "rollout_server.engine", "--config-file",
                               os.environ["AREAL_LIKE_STANDIN_CONFIG"], "--host", flags["--host"],
                               "--port", flags["--port"]], env)


if __name__ == "__main__":
    main(sys.argv[1:])
