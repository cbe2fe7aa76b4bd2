"""The shared ``spawn_python`` fixture: one thread per child, and nothing it started survives."""

from __future__ import annotations

import psutil


def test_children_get_single_thread_env(spawn_python):
    proc = spawn_python("import os; "
                        "print(os.environ['OMP_NUM_THREADS'], os.environ['PYTHONUNBUFFERED'])")
    out, _ = proc.communicate(timeout=60)
    assert out.split() == ["1", "1"]


def test_cleanup_stops_the_process_and_its_descendants(spawn_python):
    proc = spawn_python("import subprocess, sys, time\n"
                        "c = subprocess.Popen([sys.executable, '-c',"
                        " 'import time; time.sleep(300)'])\n"
                        "print(c.pid, flush=True)\n"
                        "time.sleep(300)\n")
    grandchild = int(proc.stdout.readline())
    spawn_python.cleanup()
    assert proc.returncode is not None
    gone, alive = psutil.wait_procs(
        [psutil.Process(grandchild)] if psutil.pid_exists(grandchild) else [], timeout=10)
    assert not alive
