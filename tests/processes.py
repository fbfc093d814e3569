"""Process helpers for tests that kill a real `subq` run the hard way (a crashed machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a driver started with ``start_new_session=True`` and every process it started
    (Ray workers have process groups of their own, so the group alone is not enough)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # it had already finished (and been reaped): its group may live on
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
