"""What ``regbench`` prints while it works: verbosity, the grid line, the step bar.

* :func:`set_verbosity` chooses, once per process, how much Lightning and the libraries
  under it say. At the default level (0) Lightning's informational records (the
  accelerator banner, the "💡 Tip" lines, "`weights_only` was not set", "seed set to")
  are below the threshold of their loggers, and the warnings that are known to be harmless
  for this suite are ignored by their category and module (never by matching printed
  text). ``-v`` (1) shows Lightning's informational records; ``-vv`` (2) also every
  warning.
* :class:`GridProgress` prints one line per experiment of a grid: ``experiment k of N``,
  its method, dataset and seed, the time elapsed since the grid started and an estimate
  of the time left (mean time of the experiments that actually ran, times those left).
* :class:`benchmark.progress_bar.StepProgressBar` (a separate module: it imports Lightning,
  this one must not, so that ``regbench --help`` stays fast) is Lightning's tqdm bar counting optimiser steps over the whole
  fit (``step k of total``, not one bar per epoch that fills to 100/100 each time) and, in
  test, cases (``case k of N`` with the case id and its Dice).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Callable

__all__ = ["set_verbosity", "verbosity", "GridProgress", "format_seconds", "quiet_lightning"]

_VERBOSITY = 0

#: Loggers whose INFO records are Lightning's chatter (banner, tips, checkpoint notes).
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


def verbosity() -> int:
    """The level chosen by :func:`set_verbosity` (0 quiet, 1 ``-v``, 2 ``-vv``)."""
    return _VERBOSITY


def set_verbosity(level: int | None = None, lightning: bool = False) -> None:
    """Set how much Lightning and its libraries print (see the module docstring).

    Called by the CLI before any subcommand runs and by :func:`benchmark.runner.run_grid`
    (idempotent; ``level=None`` keeps the level chosen before). Only logger levels and
    warning filters by category and module are touched. ``lightning=True`` also installs
    the filter on Lightning's ``PossibleUserWarning`` class, which imports Lightning (and
    torch): commands that never train leave it out and start fast.
    """
    global _VERBOSITY
    if level is not None:
        _VERBOSITY = int(level)
    level = _VERBOSITY
    PossibleUserWarning = None
    if lightning:
        # Imported first: importing lightning.pytorch / lightning.fabric sets their loggers
        # to INFO, which would undo a level set before.
        import lightning.pytorch  # noqa: F401
        from lightning.fabric.utilities.warnings import PossibleUserWarning
    lvl = logging.INFO if level >= 1 else logging.WARNING
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(lvl)
    if level >= 2:
        warnings.simplefilter("default")
        return
    if PossibleUserWarning is not None:
        # "The dataloader does not have many workers", "The number of training batches is
        # smaller than the logging interval": advice for large data sets, not errors, and our
        # data modules choose their workers on purpose (2-core machines).
        warnings.filterwarnings("ignore", category=PossibleUserWarning)
    # torch.utils._pytree's LeafSpec deprecation is raised inside Lightning's own code (not
    # ours; nothing we call can avoid it) on every fit with this torch.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"lightning\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.utils\._pytree")


def format_seconds(s: float) -> str:
    """``75.2`` → ``"1m15s"``, ``3720`` → ``"1h02m"``, NaN → ``"?"``."""
    if s is None or not math.isfinite(s):
        return "?"
    s = max(0, round(float(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


class GridProgress:
    """One line per experiment of a grid with elapsed time and an estimate of time left.

    Args:
        total: number of experiments the grid will visit (skipped ones included).
        log: where lines go (the runner's rank-0 logger).
        clock: seconds source (``time.monotonic``; injectable for tests).

    The estimate is the mean wall time of the experiments that did work times the
    experiments still to start, counting the current one; it is ``?`` until one has
    finished. Left out of the mean: experiments skipped as already complete (no time) and
    the ``initial`` rows (no registration, seconds where a method takes minutes), so the
    estimate does not promise seconds for a grid of minutes.
    """

    def __init__(self, total: int, log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = int(total)
        self.log = log
        self.clock = clock
        self.t0 = clock()
        self.k = 0
        self._started: float | None = None
        self._method = ""
        self.durations: list[float] = []

    def eta(self) -> float:
        """Seconds left by the mean-duration estimate (NaN before any experiment ran)."""
        if not self.durations:
            return math.nan
        left = self.total - self.k + (1 if self._started is not None else 0)
        return float(sum(self.durations) / len(self.durations)) * max(0, left)

    def start(self, method: str, dataset: str, seed: int) -> str:
        """Announce the next experiment; returns the line printed."""
        self.k += 1
        self._started = self.clock()
        self._method = method
        line = (f"[{self.k}/{self.total}] experiment {self.k} of {self.total}: {method} on {dataset}, seed {seed} · "
                f"elapsed {format_seconds(self._started - self.t0)} · left ~{format_seconds(self.eta())}")
        self.log(line)
        return line

    def finish(self, status: str) -> None:
        """Close the current experiment; ``status`` ``"skipped"`` leaves it out of the estimate."""
        if self._started is None:
            return
        if status != "skipped" and self._method != "initial":
            self.durations.append(self.clock() - self._started)
        self._started = None


def quiet_lightning() -> None:
    """Keep the runner's output to what matters: Lightning's banner lines and tips go."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*weights_only.*")
