"""Study plots as PNG, through ``optuna.visualization.matplotlib``.

* ``history.png``: optimisation history (Dice per trial, best so far);
* ``importances.png``: parameter importances (fANOVA when scikit-learn is installed, else
  PED-ANOVA);
* ``contour.png``: contour of the objective over the first two parameters (``gamma × lambda_``
  for DiffOp-net);
* ``intermediate.png``: the validation Dice reported during training (pruning's input);
* ``pareto_front.png``: two objectives only.

A plot that the study cannot give yet (too few finished trials, a one-parameter space) is
skipped with its reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

__all__ = ["save_plots"]


def _importance_evaluator():
    try:
        import sklearn  # noqa: F401

        from optuna.importance import FanovaImportanceEvaluator

        return FanovaImportanceEvaluator(seed=0)
    except ImportError:
        from optuna.importance import PedAnovaImportanceEvaluator

        return PedAnovaImportanceEvaluator()


def save_plots(study: Any, out_dir: Path, params: list[str], directions: list[str]) -> tuple[list[Path], dict[str, str]]:
    """Write the plots; returns ``(written paths, {plot: reason skipped})``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    multi = len(directions) > 1
    target = (lambda t: t.values[0]) if multi else None
    tname = "val Dice"
    jobs: dict[str, Any] = {
        "history": lambda: ovm.plot_optimization_history(study, target=target, target_name=tname),
        "importances": lambda: ovm.plot_param_importances(study, evaluator=_importance_evaluator(), params=params,
                                                          target=target, target_name=tname),
    }
    if len(params) >= 2:
        jobs["contour"] = lambda: ovm.plot_contour(study, params=params[:2], target=target, target_name=tname)
    if multi:
        jobs["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=["val Dice", "val fold %"])
    else:
        jobs["intermediate"] = lambda: ovm.plot_intermediate_values(study)
    written: list[Path] = []
    skipped: dict[str, str] = {}
    if len(params) < 2:
        skipped["contour"] = "needs two parameters"
    for name, make in jobs.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)
                ax = make()
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
            plt.close("all")
            continue
        fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        plt.close("all")
        written.append(path)
    return written, skipped
