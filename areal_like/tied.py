"""``python -I -S tied.py PARENT SIG PROGRAM ARGV0 ARGS...``: ask the kernel for ``SIG`` when the
thread that started this process dies (``PR_SET_PDEATHSIG``, kept across ``exec``), exit 1 if
``PARENT`` is gone already (reparented before the ask), then ``exec`` PROGRAM with ``ARGV0 ARGS``.

A script of its own, started by ``areal_like.daemon.popen_tied``, because the same steps in a
``preexec_fn`` run Python in a forked copy of a threaded parent, which can hang or crash there.
Standard library only, and no import of the package: it runs before anything else in the child.
"""

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

parent, sig, program, *argv = sys.argv[1:]
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
if os.getppid() != int(parent):
    sys.exit(1)
os.execv(program, argv)
