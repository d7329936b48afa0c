"""Ranks stop when their launcher dies, so that a requeued job never meets orphans of the old one.

torchrun's workers are its children. When torchrun is killed (``kill -9``, an OOM killer, a lost ssh session), the
workers would be handed to init and train on, writing the run folder beside the requeued job. A torchrun worker
(``TORCHELASTIC_RUN_ID`` set) therefore asks the kernel for SIGTERM when its parent dies (Linux
``prctl(PR_SET_PDEATHSIG)``), and a daemon thread checks once a second that its parent is still the launcher (the
check that also works where ``prctl`` does not exist). SIGTERM is the trainer's stop request: every rank checkpoints
after its iteration and exits. A rank still alive ``ORPHAN_GRACE_SECONDS`` after the launcher died (stuck in a
collective with a dead peer) exits at once.

Other launches are left alone: a trainer started from a shell must survive the shell (``nohup``), and a SLURM task's
parent (``slurmstepd``) kills its tasks itself.
"""

import ctypes
import ctypes.util
import os
import signal
import threading
import time
from collections.abc import Mapping

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 1.0
ORPHAN_GRACE_SECONDS = 120.0
_started = False


def _ask_kernel_for_sigterm() -> bool:
    """``prctl(PR_SET_PDEATHSIG, SIGTERM)`` through libc; False where it is not available (not Linux)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(launcher: int, poll_seconds: float, grace_seconds: float) -> None:
    while os.getppid() == launcher != 1:  # parent 1: the launcher died before this process looked
        time.sleep(poll_seconds)
    print(f"the launcher (pid {launcher}) is gone: this rank checkpoints and stops", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_seconds)
    print(f"this rank did not stop within {grace_seconds:.0f} s of its launcher's death; exiting now", flush=True)
    os._exit(1)


def stop_with_launcher(
    environ: Mapping[str, str] = os.environ,
    poll_seconds: float = POLL_SECONDS,
    grace_seconds: float = ORPHAN_GRACE_SECONDS,
) -> bool:
    """Under torchrun, arrange for this process to stop when the launcher dies (module docstring); True when armed.
    Calling it again does nothing."""
    global _started
    if "TORCHELASTIC_RUN_ID" not in environ or _started:
        return _started
    launcher = os.getppid()
    _ask_kernel_for_sigterm()
    _started = True
    thread = threading.Thread(
        target=_watch, args=(launcher, poll_seconds, grace_seconds), name="franca-launcher-watch", daemon=True
    )
    thread.start()
    return True
