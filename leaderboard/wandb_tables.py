"""wandb Tables: the per-case table of one experiment and the grid's leaderboard.

Both work offline (``WANDB_MODE=offline`` or ``offline: true`` in the grid's ``wandb``
block): wandb then writes the run, tables included, under its ``save_dir`` for a later
``wandb sync``. wandb is optional: without it, or on any wandb error, nothing is logged and
a warning says why — a grid never fails because of its logger.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from benchmark.core.io import plain

__all__ = ["log_tables", "log_leaderboard_wandb"]

_INIT_KEYS = {"project", "entity", "name", "group", "tags", "notes", "job_type", "id", "config"}


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None):
    import wandb

    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    return wandb.Table(columns=cols, data=[[plain(r.get(c), finite=True) for c in cols] for r in rows])


def log_tables(loggers: Iterable[Any], exp_dir: str | Path, key: str = "cases") -> int:
    """Log ``<exp_dir>/cases.csv`` as a wandb Table on every Lightning ``WandbLogger``.

    Other loggers are ignored. Call after the test wrote ``cases.csv`` and before the
    loggers are finished.

    Returns:
        the number of loggers the table was logged to.
    """
    wandb_loggers = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]
    path = Path(exp_dir) / "cases.csv"
    if not wandb_loggers or not path.exists():
        return 0
    try:
        import csv

        from benchmark.core.results import read_cases_csv

        with open(path, newline="") as fh:
            columns = next(csv.reader(fh), [])
        rows = read_cases_csv(path)
        n = 0
        for lg in wandb_loggers:
            lg.experiment.log({key: _table(rows, columns)})
            n += 1
        return n
    except Exception as exc:  # optional logger: warn, never break the grid
        warnings.warn(f"wandb: per-case table of {exp_dir} not logged ({type(exc).__name__}: {exc})", stacklevel=2)
        return 0


def log_leaderboard_wandb(root: str | Path, wandb_options: Mapping[str, Any] | None = None) -> Path | None:
    """Log the leaderboard of ``root`` as one wandb Table per dataset, in a run of its own.

    Args:
        root: the results folder of the grid.
        wandb_options: the grid's ``wandb`` block (WandbLogger options): ``project``,
            ``entity``, ``group``, ``tags``, ``name``, ``save_dir`` and ``offline`` (default
            true, as for the experiments) are used; other keys are ignored.

    Returns:
        the run's local folder, or None when nothing was logged.
    """
    opts = dict(wandb_options or {})
    root = Path(root)
    try:
        import wandb

        from leaderboard.table import build_report, flat_rows

        report = build_report(root)
        if not report.datasets:
            return None
        init = {k: v for k, v in opts.items() if k in _INIT_KEYS}
        init.setdefault("project", "regbench")
        init.setdefault("name", f"{root.name}/leaderboard")
        init.setdefault("group", root.name)
        init.setdefault("job_type", "leaderboard")
        save_dir = Path(opts.get("save_dir") or root)
        save_dir.mkdir(parents=True, exist_ok=True)
        mode = "offline" if opts.get("offline", True) else None
        run = wandb.init(dir=str(save_dir), mode=mode, **init)
        try:
            for ds in report.datasets:
                run.log({f"leaderboard_{ds.name}": _table(flat_rows(ds))})
            run_dir = Path(run.dir).parent
        finally:
            run.finish()
        return run_dir
    except Exception as exc:  # optional logger: warn, never break the grid
        warnings.warn(f"wandb: leaderboard of {root} not logged ({type(exc).__name__}: {exc})", stacklevel=2)
        return None
