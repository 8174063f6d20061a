"""The one way the perf harness runs a measurement in a child process.

Every target that measures in a fresh process (memory by RSS needs one; a peer package lives in
its own venv) builds the child's environment with :func:`child_env` and runs it with
:func:`run_child`: the child writes one JSON record to a path it is given, the parent reads it
back, and a child that timed out, failed or wrote nothing comes back as a :class:`ChildRun`
whose ``record`` is ``None``, with the tail of its output for the error message.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["PROJECT_ROOT", "KEEP", "ChildRun", "child_env", "run_child"]

#: the repository root: the children's working directory and first ``PYTHONPATH`` entry.
PROJECT_ROOT = Path(__file__).resolve().parents[2]

#: ``wait_policy`` of :func:`child_env` that leaves the parent's ``OMP_WAIT_POLICY`` as it is.
KEEP = "keep"


def child_env(threads: int | None = None, *, wait_policy: str | None = KEEP, on_path: bool = False,
              **extra: str) -> dict[str, str]:
    """The parent's environment for a child: thread counts, OpenMP wait policy, import path.

    Args:
        threads: ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` of the child (``None``: inherited).
        wait_policy: the child's ``OMP_WAIT_POLICY``: :data:`KEEP` leaves the parent's,
            ``None`` removes it (OpenMP's default), a string sets it.
        on_path: put :data:`PROJECT_ROOT` first on ``PYTHONPATH`` (for ``python -m benchmark...``).
        extra: further variables, set last.
    """
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if wait_policy is None:
        env.pop("OMP_WAIT_POLICY", None)
    elif wait_policy != KEEP:
        env["OMP_WAIT_POLICY"] = wait_policy
    if on_path:
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


@dataclass
class ChildRun:
    """What a child left: its JSON record (``None`` when it timed out, failed or wrote none)."""

    record: dict[str, Any] | None
    returncode: int | None  # None: killed at the time limit
    output: str  # stderr, or stdout where stderr is empty
    wall_s: float
    timeout_s: float | None = None

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail_lines(self, n: int) -> str:
        """The last ``n`` lines of the output joined by `` | ``."""
        return " | ".join(self.output.strip().splitlines()[-n:])

    def tail_chars(self, n: int = 2000) -> str:
        """The last ``n`` characters of the output."""
        return self.output[-n:]

    @property
    def timeout_message(self) -> str:
        return f"timed out after {self.timeout_s:.0f} s"


def run_child(cmd: Sequence[str | os.PathLike], out: str | os.PathLike | None, *, timeout_s: float | None = None,
              env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> ChildRun:
    """Run ``cmd`` to completion (output captured) and read the JSON record it wrote to ``out``.

    The record is read only when the child exited 0 and ``out`` exists; ``out=None`` runs a
    child that writes no record (a check such as ``python -c "import x"``). ``wall_s`` is the
    wall-clock of the whole process, start-up included.
    """
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=None if cwd is None else str(cwd), env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return ChildRun(None, None, "", time.perf_counter() - t0, timeout_s)
    wall = time.perf_counter() - t0
    record = None
    if out is not None and proc.returncode == 0 and Path(out).exists():
        with open(out) as fh:
            record = json.load(fh)
    return ChildRun(record, proc.returncode, proc.stderr or proc.stdout or "", wall, timeout_s)
