"""The shared ``spawn_python`` fixture: one thread per child, and nothing it started survives."""

from __future__ import annotations

import psutil


def test_a_child_runs_single_threaded_and_cleanup_stops_it_and_its_descendants(spawn_python):
    proc = spawn_python("import os, subprocess, sys, time\n"
                        "c = subprocess.Popen([sys.executable, '-c',"
                        " 'import time; time.sleep(300)'])\n"
                        "e = os.environ\n"
                        "print(e['OMP_NUM_THREADS'], e['PYTHONUNBUFFERED'], c.pid, flush=True)\n"
                        "time.sleep(300)\n")
    omp, unbuffered, grandchild = proc.stdout.readline().split()
    assert (omp, unbuffered) == ("1", "1")
    spawn_python.cleanup()
    assert proc.returncode is not None
    gone, alive = psutil.wait_procs(
        [psutil.Process(int(grandchild))] if psutil.pid_exists(int(grandchild)) else [], timeout=10)
    assert not alive
