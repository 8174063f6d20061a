"""OpenMP's wait policy for every way into the suite (issue 20, item 6).

OpenMP threads that spin while they wait make 2-thread torch runs many times slower on a
shared machine (measured: ``GreedySyN`` preset ``fast`` 55 s instead of 8 s from a Python
session on a machine at load ~7). ``OMP_WAIT_POLICY`` is read once, when torch loads its
OpenMP runtime, so it must be in the environment before ``import torch``.

:func:`apply_omp_wait_policy` runs when :mod:`benchmark` is imported (every module of the
suite imports it first): when the user has not chosen a policy and torch is not loaded
yet, it sets ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep); the ``regbench`` command does the
same. When torch was imported before the suite, it is too late: the state is recorded and
:func:`warn_if_spinning` (called by the iterative methods' first registration) prints one
warning on a busy machine, saying what to do.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["apply_omp_wait_policy", "warn_if_spinning", "OMP_STATE"]

#: ``"user"`` (the user set OMP_WAIT_POLICY), ``"set"`` (we set PASSIVE before torch
#: loaded) or ``"late"`` (torch was loaded first, OpenMP's default applies).
OMP_STATE: dict[str, str] = {"state": "unknown"}
_warned = False


def apply_omp_wait_policy() -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when nobody chose and torch is not loaded; the state."""
    if "OMP_WAIT_POLICY" in os.environ:
        state = "user" if OMP_STATE["state"] != "set" else "set"
    elif "torch" in sys.modules:
        state = "late"
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        state = "set"
    OMP_STATE["state"] = state
    return state


def warn_if_spinning(threads: int) -> bool:
    """Warn once when OpenMP threads may spin (torch loaded before the suite, no policy
    chosen), ``threads > 1`` and the machine is busier than its cores; whether it warned."""
    global _warned
    if _warned or OMP_STATE["state"] != "late" or threads <= 1:
        return False
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        return False
    if load <= (os.cpu_count() or 1):
        return False
    _warned = True
    warnings.warn(
        f"torch was imported before regbench and OMP_WAIT_POLICY is not set: on this busy machine "
        f"(load {load:.1f}, {os.cpu_count()} cores) OpenMP threads spin and a {threads}-thread run can be "
        f"several times slower; set OMP_WAIT_POLICY=PASSIVE before starting Python (or import benchmark "
        f"before torch), or use torch.set_num_threads(1)",
        RuntimeWarning,
        stacklevel=3,
    )
    return True
