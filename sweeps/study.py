"""Optuna studies over a system's search space, on one dataset of a grid config.

One study per (method, dataset). A trial builds the dataset and method blocks of the grid
config (:func:`benchmark.runner.load_grid_config`), overrides the suggested parameters, fits
with Lightning (learned methods), validates, and returns the validation metrics logged by
:class:`systems.base.RegistrationSystem`:

* ``objectives="dice"``: maximise ``val/dice``; TPE sampler; pruning (median rule) from the
  ``val/dice`` reported at each validation during ``fit``;
* ``objectives="dice+folds"``: maximise ``val/dice``, minimise ``val/fold_pct``; NSGA-II; the
  Pareto front is reported (Optuna does not prune multi-objective trials).

Trial setup: everything that defines a trial's objective besides the searched parameters
(:func:`trial_setup`: dataset block, method class and non-searched arguments, budget,
trainer settings, first seed, objectives) is hashed into a fingerprint that the study keeps
from its creation. Resuming or joining it with another setup is refused in one line naming
what changed: its trials would not compare with the new ones, and ``best.yaml`` would pair
an old trial's parameters with the new setup. The setup is compared by content, not by the
config's path (another machine may hold the same config elsewhere); placement and display
settings (accelerator, progress bar, logging, loader workers, cache folder, the data's root
folder, which each node may mount elsewhere) are left out. A study from before fingerprints
adopts the current setup, with a notice.

Storage: SQLite in the output folder by default; any Optuna URL (``postgresql://…`` for
many machines, ``journal:/shared/disk/study.log`` for a journal file). Several workers on one
study: ``workers=N`` starts N local processes; the same command on other machines with the
same ``--storage`` and ``--study-name`` joins the study. Resume: the same command again —
finished trials are kept, the remaining count is run; trials of a crashed worker stop
beating (RDB heartbeat) and are marked failed and retried with the same parameters.

DDP inside a trial: a trainer with ``strategy: ddp`` runs as ``ddp_spawn`` (the launcher that
re-runs the command line would start a whole sweep per rank). Pruning then follows the
optuna-integration rule: rank 0 reports to a database storage, the decision is broadcast so
every rank stops together, and the prune is raised after ``fit`` returns
(:meth:`PruningCallback.check_pruned`).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from benchmark.core.io import atomic_write_text, plain
from sweeps.space import assemble, space_of, split_name, suggest

__all__ = ["SweepSpec", "PruningCallback", "run_sweep", "run_worker", "open_study", "storage_url", "make_storage", "write_reports",
           "best_config", "OBJECTIVES", "resolve_spec", "trial_setup", "setup_fingerprint"]

OBJECTIVES = {"dice": ["maximize"], "dice+folds": ["maximize", "minimize"]}
_PRUNED_AT = "pruned_at_step"


@dataclasses.dataclass
class SweepSpec:
    """What ``regbench sweep`` was asked.

    Attributes:
        config: grid config path. method / dataset: names in it (dataset: may be omitted
        when the config has one). n_trials: total finished (complete + pruned) trials
        wanted in the study. timeout: seconds per worker. workers: local processes.
        storage: Optuna storage URL (default SQLite in ``output``). study_name: default
        ``<suite>.<dataset>.<method>``. objectives: ``dice`` or ``dice+folds``. prune: median
        pruning of single-objective trials. prune_startup: trials before pruning starts.
        output: folder for the study's reports (default ``results/sweeps/<study_name>``).
        seed: sampler seed (worker ``i`` uses ``seed + i``). heartbeat: seconds between RDB
        heartbeats (stale after twice that).
    """

    config: str
    method: str
    dataset: str | None = None
    n_trials: int | None = 20
    timeout: float | None = None
    workers: int = 1
    storage: str | None = None
    study_name: str | None = None
    objectives: str = "dice"
    prune: bool = True
    prune_startup: int = 3
    output: str | None = None
    seed: int = 0
    heartbeat: float = 10.0


@dataclasses.dataclass
class _Resolved:
    spec: SweepSpec
    cfg: Any
    dataset: Any
    method: Any
    space: dict[str, dict[str, Any]]
    output: Path
    storage: str
    study_name: str
    directions: list[str]


def resolve_spec(spec: SweepSpec) -> _Resolved:
    from benchmark.runner import ConfigError, load_grid_config

    if spec.objectives not in OBJECTIVES:
        raise ConfigError(f"--objectives: expected one of {sorted(OBJECTIVES)}, got {spec.objectives!r}")
    if spec.n_trials is None and spec.timeout is None:
        raise ConfigError("--n-trials or --timeout: at least one is needed")
    if spec.n_trials is not None and (isinstance(spec.n_trials, bool) or int(spec.n_trials) != spec.n_trials or spec.n_trials < 1):
        raise ConfigError(f"--n-trials: expected a positive number of trials, got {spec.n_trials}")
    if spec.timeout is not None and not spec.timeout > 0:
        raise ConfigError(f"--timeout: expected a positive number of seconds, got {spec.timeout}")
    if not spec.heartbeat > 0:
        raise ConfigError(f"--heartbeat: expected a positive number of seconds, got {spec.heartbeat}")
    if spec.workers < 1:
        raise ConfigError("--workers must be >= 1")
    cfg = load_grid_config(spec.config)
    if spec.method not in cfg.methods:
        raise ConfigError(f"--method: {spec.method!r} is not in the config (methods: {sorted(cfg.methods)})")
    if spec.dataset is None:
        if len(cfg.datasets) != 1:
            raise ConfigError(f"--dataset: the config has several datasets {sorted(cfg.datasets)}; name one")
        dname = next(iter(cfg.datasets))
    elif spec.dataset not in cfg.datasets:
        raise ConfigError(f"--dataset: {spec.dataset!r} is not in the config (datasets: {sorted(cfg.datasets)})")
    else:
        dname = spec.dataset
    method = cfg.methods[spec.method]
    try:
        space = space_of(method.cls)
    except ValueError as exc:
        raise ConfigError(f"methods.{spec.method}: {exc}") from exc
    name = spec.study_name or f"{cfg.suite}.{dname}.{spec.method}"
    out = Path(spec.output or Path("results") / "sweeps" / name).resolve()
    storage = spec.storage or f"sqlite:///{out / 'study.db'}"
    return _Resolved(spec, cfg, cfg.datasets[dname], method, space, out, storage, name, OBJECTIVES[spec.objectives])


# --------------------------------------------------------------------------------------
# storage and study


class StorageError(ValueError):
    """The study storage cannot be used; the message (one line) names the URL, password masked."""


def _first_line(exc: BaseException) -> str:
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip()
    return (text.splitlines()[0] if text else type(inner).__name__)[:300]


def resolve_storage_driver(url: str) -> str:
    """A storage URL with an explicit, installed PostgreSQL driver.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` (and ``postgres://``) as psycopg 3; the
    suite's ``postgres`` extra installs psycopg2. A bare URL gets whichever driver is
    installed (psycopg, else psycopg2); a URL that names a driver keeps it, and a missing
    driver is a :class:`StorageError` saying what to install.
    """
    import importlib.util

    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    dialect, _, driver = scheme.partition("+")
    if dialect not in ("postgresql", "postgres"):
        return url
    if not driver:
        for module, name in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
            if importlib.util.find_spec(module) is not None:
                driver = name
                break
        else:
            raise StorageError(f"--storage {storage_url(url)}: no PostgreSQL driver is installed "
                               "(pip install 'regbench[postgres]', which brings psycopg2-binary)")
    module = {"psycopg": "psycopg", "psycopg2": "psycopg2", "pg8000": "pg8000", "asyncpg": "asyncpg"}.get(driver, driver)
    if importlib.util.find_spec(module) is None:
        raise StorageError(f"--storage {storage_url(url)}: the driver {driver!r} is not installed "
                           f"(pip install {'psycopg2-binary' if driver == 'psycopg2' else driver})")
    return f"postgresql+{driver}://{rest}"


def storage_url(url: str) -> str:
    """The URL with any password masked (for reports and logs)."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        user = cred.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def make_storage(url: str, heartbeat: float):
    """The Optuna storage of a study URL (``sqlite:///PATH``, ``postgresql://...``,
    ``journal:PATH``): the parent folder of a file is created; an RDB storage beats every
    ``heartbeat`` seconds, and a trial whose worker stopped beating is failed and retried
    (at most twice). Raises :class:`StorageError` on a string that is not a storage URL."""
    import optuna
    from optuna.storages import RDBStorage

    try:
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
    except ImportError:  # optuna < 4.9
        from optuna.storages import RetryFailedTrialCallback as Retry
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = url[len("journal:"):]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise StorageError(f"--storage: expected an Optuna storage URL (sqlite:///…, postgresql://…, journal:PATH), got {url!r}")
    url = resolve_storage_driver(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    hb = max(1, int(round(heartbeat)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import inspect

    cb_key = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage.__init__).parameters
              else "failed_trial_callback")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, heartbeat_interval=hb, grace_period=2 * hb + 1, **{cb_key: Retry(max_retry=2)}, **kwargs)


def _sampler(res: _Resolved, seed: int):
    import optuna

    if len(res.directions) == 1:
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(10, max(2, (res.spec.n_trials or 20) // 3)))
    else:
        pop = max(4, min(50, (res.spec.n_trials or 100) // 2))
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
    return sampler


def open_study(res: _Resolved, worker: int = 0, log: Callable[[str], None] | None = None):
    """Create or load the study, with the sampler and pruner of this worker.

    The sampler's seed is ``seed + worker`` for a new study and also depends on the number
    of trials already in it: a resumed study continues with a fresh random stream instead
    of replaying the first invocation's (which repeated completed parameter sets). Storage
    problems (driver, connection, permissions) raise :class:`StorageError` (one line). A
    study made with another trial setup (see :func:`trial_setup`) raises ``ValueError``
    naming what changed; ``log`` (default: stderr) gets the notice of an adopted old study.
    """
    try:
        return _open_study(res, worker, log)
    except StorageError:
        raise
    except Exception as exc:
        mod = type(exc).__module__ or ""
        import optuna

        if isinstance(exc, (ImportError, OSError, optuna.exceptions.StorageInternalError)) or mod.startswith("sqlalchemy") \
                or "storages" in mod:
            raise StorageError(f"--storage {storage_url(res.storage)}: {_first_line(exc)}") from exc
        raise


# Settings that say where or how visibly a trial runs, not what it computes: left out of the
# fingerprint, so that a study can be joined from a machine with other devices or folders.
_TRAINER_PLACEMENT = frozenset({"accelerator", "enable_progress_bar", "log_every_n_steps", "enable_model_summary",
                                "logger", "default_root_dir", "enable_checkpointing", "profiler"})
_DATA_PLACEMENT = frozenset({"num_workers", "pin_memory", "persistent_workers", "cache_dir", "use_cache", "cache_hash",
                             "export_fields", "root"})  # root: nodes mount the same data at their own paths
_SETUP_VERSION = 1


def trial_setup(res: _Resolved) -> dict[str, Any]:
    """What defines a trial's objective besides the searched parameters (JSON-able): the
    dataset block, the method's class and non-searched arguments, the budget, the trainer
    settings (placement and display settings left out), the seed every trial starts from
    and the objectives. :func:`setup_fingerprint` hashes it."""
    from benchmark.runner import effective_budget

    budget = effective_budget(res.cfg, res.method)[0]
    trainer = {**res.cfg.trainer, **res.method.trainer}  # as written: the budget beside it sets its limits
    searched = {split_name(n)[0] for n in res.space}
    data_args = res.dataset.raw.get("init_args") or {}
    setup = {
        "version": _SETUP_VERSION,
        "dataset": {"name": res.dataset.name, "class_path": res.dataset.raw.get("class_path"),
                    "init_args": {k: v for k, v in data_args.items() if k not in _DATA_PLACEMENT}},
        "method": {"name": res.spec.method, "class_path": res.method.raw.get("class_path"),
                   "init_args": {k: v for k, v in res.method.init_args.items() if k not in searched}},
        "budget": budget,
        "trainer": {k: v for k, v in trainer.items() if k not in _TRAINER_PLACEMENT},
        "seed": res.cfg.seeds[0],
        "objectives": res.spec.objectives,
    }
    return json.loads(json.dumps(plain(setup), sort_keys=True, default=str))


def setup_fingerprint(setup: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex) of the canonical JSON of a :func:`trial_setup`."""
    return hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _setup_changes(old: Any, new: dict[str, Any], limit: int = 4) -> str:
    """``budget.max_steps 2 -> 4, …``: the leaves of two setups that differ (or why unknown)."""
    if not isinstance(old, dict):
        return "the stored setup is not readable"
    a, b = _flat(old), _flat(new)

    def shown(flat: dict[str, Any], k: str) -> str:
        return json.dumps(flat[k]) if k in flat else "(unset)"

    diffs = [f"{k} {shown(a, k)} -> {shown(b, k)}" for k in sorted(set(a) | set(b))
             if k not in a or k not in b or a[k] != b[k]]
    if not diffs:
        return "the fingerprint's definition changed"
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more


def _check_setup(study, res: _Resolved, attrs: dict[str, Any], log: Callable[[str], None]) -> None:
    """Record the trial setup's fingerprint on a new study; refuse a study made with another
    setup (one line naming what changed); adopt a study from before fingerprints (notice).
    ``attrs``: the study's user attributes as opened."""
    setup = trial_setup(res)
    fp = setup_fingerprint(setup)
    stored = attrs.get("setup_fingerprint")
    if stored is None:
        if "method" in attrs:  # made before fingerprints: its trials are taken to be of this setup
            log(f"[sweep] notice: study {res.study_name!r} predates trial-setup fingerprints; its "
                f"{len(study.get_trials(deepcopy=False))} trial(s) are taken to use the setup of "
                f"{Path(res.cfg.path).resolve()}, "
                "which is now recorded (a later change is refused)")
        study.set_user_attr("setup", setup)
        study.set_user_attr("setup_fingerprint", fp)
        return
    if stored != fp:
        where = attrs.get("config")
        raise ValueError(f"study {res.study_name!r} was made with another trial setup"
                         + (f" (config {where})" if where else "") + f": {_setup_changes(attrs.get('setup'), setup)}; "
                         "its trials would not compare with new ones: choose another --study-name "
                         "(or another --output for the default SQLite storage)")


def _open_study(res: _Resolved, worker: int = 0, log: Callable[[str], None] | None = None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(res.storage, res.spec.heartbeat)
    sampler = _sampler(res, res.spec.seed + worker)
    if res.spec.prune and len(res.directions) == 1:
        pruner: optuna.pruners.BasePruner = optuna.pruners.MedianPruner(n_startup_trials=res.spec.prune_startup, n_warmup_steps=0)
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage, study_name=res.study_name, directions=res.directions, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    n_before = len(study.get_trials(deepcopy=False))
    if n_before:
        study.sampler = _sampler(res, res.spec.seed + worker + 7919 * n_before)
    have = [d.name.lower() for d in study.directions]
    if have != res.directions:
        raise ValueError(f"study {res.study_name!r} exists with directions {have}, not {res.directions} "
                         f"(--objectives {res.spec.objectives}); choose another --study-name")
    attrs = study.user_attrs
    if "method" not in attrs:
        study.set_user_attr("method", res.spec.method)
        study.set_user_attr("dataset", res.dataset.name)
        study.set_user_attr("config", str(Path(res.cfg.path).resolve()))
        study.set_user_attr("objectives", res.spec.objectives)
    elif attrs.get("method") != res.spec.method or attrs.get("dataset") != res.dataset.name:
        raise ValueError(f"study {res.study_name!r} belongs to method {attrs.get('method')!r} on "
                         f"{attrs.get('dataset')!r}; choose another --study-name")
    _check_setup(study, res, attrs, log or (lambda msg: print(msg, file=sys.stderr, flush=True)))
    return study


# --------------------------------------------------------------------------------------
# pruning from Lightning


def _lightning_callback_base():
    from lightning.pytorch.callbacks import Callback

    return Callback


class PruningCallback(_lightning_callback_base()):  # type: ignore[misc]
    """Reports ``monitor`` at every validation during ``fit`` and stops a trial Optuna prunes.

    The trial is not pruned from inside Lightning's loop: the callback sets
    ``trainer.should_stop`` and records the step; :meth:`check_pruned`, called after
    ``fit``, raises :class:`optuna.TrialPruned`. Under DDP only rank 0 talks to the storage
    (which must be a database, so that the spawned ranks and the parent share it), and the
    decision is broadcast so that all ranks stop at the same step.

    Args:
        trial: the ``optuna.Trial``.
        monitor: logged metric (``val/dice``); step = ``trainer.global_step``.
    """

    def __init__(self, trial: Any, monitor: str = "val/dice") -> None:
        super().__init__()
        self.trial = trial
        self.monitor = monitor
        self.pruned_step: int | None = None
        self.reported: dict[int, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            from optuna.storages import RDBStorage

            backend = getattr(self.trial.study._storage, "_backend", self.trial.study._storage)
            if not isinstance(backend, RDBStorage):
                raise ValueError("pruning under DDP needs a database storage (sqlite:///…, postgresql://…)")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        should = False
        if value is not None and trainer.is_global_zero:
            v = float(value)
            step = int(trainer.global_step)
            if math.isfinite(v) and step not in self.reported:
                self.trial.report(v, step)
                self.reported[step] = v
                should = bool(self.trial.should_prune())
                if should:
                    self.trial.set_user_attr(_PRUNED_AT, step)
        if trainer.world_size > 1:
            should = bool(trainer.strategy.broadcast(should, src=0))
        if should:
            self.pruned_step = int(trainer.global_step)
            trainer.should_stop = True

    def check_pruned(self) -> None:
        """Raise :class:`optuna.TrialPruned` when the trial was pruned during ``fit``."""
        import optuna

        step = self.pruned_step
        if step is None:  # spawned ranks: the decision lives in the storage
            frozen = self.trial.study._storage.get_trial(self.trial._trial_id)
            step = frozen.user_attrs.get(_PRUNED_AT)
        if step is not None:
            raise optuna.TrialPruned(f"pruned at step {step}")


# --------------------------------------------------------------------------------------
# one trial


def _trainer_kwargs(res: _Resolved, trial_dir: Path) -> dict[str, Any]:
    from benchmark.runner import apply_budget, effective_budget

    # the config's training budget holds for every trial, as for `regbench run`
    kw = apply_budget({**res.cfg.trainer, **res.method.trainer}, effective_budget(res.cfg, res.method)[0])
    strategy = kw.get("strategy")
    if isinstance(strategy, str) and strategy.startswith("ddp") and "spawn" not in strategy:
        kw["strategy"] = "ddp_spawn"
    kw.update(default_root_dir=str(trial_dir), inference_mode=False, enable_model_summary=False,
              enable_checkpointing=False, logger=False)
    kw.setdefault("enable_progress_bar", False)
    return kw


def _objective(res: _Resolved):
    cache: dict[str, Any] = {}

    def objective(trial) -> float | tuple[float, float]:
        import lightning as L

        from benchmark.progress import quiet_lightning

        quiet_lightning()
        params = suggest(trial, res.space)
        init_args = {**res.method.init_args, **params}
        trial.set_user_attr("init_args", plain(init_args))
        trial.set_user_attr("host", os.uname().nodename)
        trial.set_user_attr("pid", os.getpid())
        trial_dir = res.output / "trials" / f"{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        L.seed_everything(res.cfg.seeds[0], workers=True, verbose=False)
        if "dm" not in cache:  # one data module per worker: its prepared data serve every trial
            cache["dm"] = res.dataset.build()
        dm = cache["dm"]
        system = res.method.cls(**init_args)
        kw = _trainer_kwargs(res, trial_dir)
        t0 = time.perf_counter()
        if getattr(system, "learns", True):
            prune_cb = PruningCallback(trial) if (res.spec.prune and len(res.directions) == 1) else None
            trainer = L.Trainer(**kw, callbacks=[prune_cb] if prune_cb else [])
            trainer.fit(system, datamodule=dm)
            trial.set_user_attr("fit_seconds", time.perf_counter() - t0)
            trial.set_user_attr("steps", int(trainer.global_step))
            if prune_cb is not None:
                prune_cb.check_pruned()
        val_kw = {k: v for k, v in kw.items() if k not in ("max_steps", "max_epochs", "min_steps", "min_epochs",
                                                          "val_check_interval", "check_val_every_n_epoch")}
        if str(val_kw.get("strategy", "")).startswith("ddp"):
            # validation metrics do not depend on the number of ranks (each case once, synced
            # means): one process, no second spawn of the ranks per trial
            val_kw.update(devices=1, strategy="auto", num_nodes=1)
        out = L.Trainer(**val_kw).validate(system, datamodule=dm, verbose=False)
        metrics = out[0] if out else {}
        dice = float(metrics.get("val/dice", float("nan")))
        folds = float(metrics.get("val/fold_pct", float("nan")))
        trial.set_user_attr("val_dice", dice)
        trial.set_user_attr("val_fold_pct", folds)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        if len(res.directions) == 1:
            return dice
        return dice, folds

    return objective


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_worker(res: _Resolved, worker: int = 0, n_trials: int | None = None) -> None:
    """Run trials of the study in this process until ``n_trials`` (this worker's share) are
    done, the study holds ``spec.n_trials`` finished trials, or ``spec.timeout`` passes."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    study = open_study(res, worker)
    if isinstance(getattr(study._storage, "_backend", None), optuna.storages.RDBStorage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    callbacks = []
    if res.spec.n_trials is not None:
        callbacks.append(MaxTrialsCallback(res.spec.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        if n_trials is None:
            n_trials = max(0, res.spec.n_trials - _finished(study))
        if n_trials == 0:
            return
    study.optimize(_objective(res), n_trials=n_trials, timeout=res.spec.timeout, callbacks=callbacks,
                   catch=(RuntimeError, ValueError), gc_after_trial=True)


def _worker_cmd(spec: SweepSpec, res: _Resolved, worker: int, share: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "sweeps.cli", spec.config, "--method", spec.method, "--dataset", res.dataset.name,
           "--storage", res.storage, "--study-name", res.study_name, "--objectives", spec.objectives,
           "--output", str(res.output), "--seed", str(spec.seed), "--heartbeat", str(spec.heartbeat),
           "--prune-startup", str(spec.prune_startup), "--prune" if spec.prune else "--no-prune",
           "--worker-index", str(worker)]
    if spec.n_trials is not None:
        cmd += ["--n-trials", str(spec.n_trials)]
    if share is not None:
        cmd += ["--worker-trials", str(share)]
    if spec.timeout is not None:
        cmd += ["--timeout", str(spec.timeout)]
    return cmd


def run_sweep(spec: SweepSpec, log=print) -> dict[str, Any]:
    """Run (or resume) a study with ``spec.workers`` local processes and write its reports.

    Returns the summary written to ``<output>/summary.json``.
    """
    res = resolve_spec(spec)
    res.output.mkdir(parents=True, exist_ok=True)
    study = open_study(res, log=log)  # created once, before the workers race for it
    done = _finished(study)
    log(f"[sweep] study {res.study_name!r} on {storage_url(res.storage)}: {done} finished trial(s)"
        + (f", {spec.n_trials} wanted" if spec.n_trials is not None else ""))
    remaining = None if spec.n_trials is None else max(0, spec.n_trials - done)
    shares: list[int | None] = [None] * spec.workers
    if remaining is not None:
        shares = [remaining // spec.workers + (1 if i < remaining % spec.workers else 0) for i in range(spec.workers)]
    procs = []
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    for i in range(1, spec.workers):
        if shares[i] == 0:
            continue
        procs.append(subprocess.Popen(_worker_cmd(spec, res, i, shares[i]), env=env))
    try:
        if shares[0] != 0:
            run_worker(res, 0, shares[0])
    finally:
        codes = [p.wait() for p in procs]
    if any(codes):
        log(f"[sweep] worker exit codes: {codes}")
    summary = write_reports(res, open_study(res))
    log(f"[sweep] best: {summary.get('best')}")
    if summary.get("best") is not None:
        log(f"[sweep] wrote {res.output / 'best.yaml'} and {len(summary['plots'])} plot(s) in {res.output / 'plots'}")
    else:
        log(f"[sweep] no complete trial: no best.yaml; trials.csv and summary.json in {res.output}")
    return summary


# --------------------------------------------------------------------------------------
# reports


def best_config(res: _Resolved, params_list: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """A grid config that ``regbench run`` accepts: the swept dataset and one method block per
    ``(name, params)``, with the config's trainer settings."""
    methods = {}
    for name, params in params_list:
        blk: dict[str, Any] = {"class_path": res.method.raw["class_path"],
                               "init_args": plain({**res.method.init_args, **params})}
        if res.method.trainer:
            blk["trainer"] = plain(res.method.trainer)
        if getattr(res.method, "budget", None) is not None:
            blk["budget"] = plain(res.method.budget)
        methods[name] = blk
    ds = {k: copy.deepcopy(res.dataset.raw[k]) for k in ("class_path", "init_args") if k in res.dataset.raw}
    out = {"suite": f"{res.cfg.suite}-{res.spec.method}-best", "seeds": list(res.cfg.seeds), "include_initial": True,
           "trainer": plain(res.cfg.trainer), "loggers": list(res.cfg.loggers), "datasets": {res.dataset.name: ds},
           "methods": methods}
    if getattr(res.cfg, "budget", None) is not None:
        out["budget"] = plain(res.cfg.budget)
    return out


def _write_trials_csv(study, path: Path, params: list[str]) -> None:
    rows = []
    for t in study.get_trials(deepcopy=False):
        vals = t.values or []
        rows.append({"number": t.number, "state": t.state.name,
                     "dice": vals[0] if vals else t.user_attrs.get("val_dice", ""),
                     "fold_pct": vals[1] if len(vals) > 1 else t.user_attrs.get("val_fold_pct", ""),
                     **{f"param_{p}": t.params.get(p, "") for p in params},
                     "last_step": t.last_step if t.last_step is not None else "",
                     "seconds": t.duration.total_seconds() if t.duration else "",
                     "host": t.user_attrs.get("host", ""), "pid": t.user_attrs.get("pid", "")})
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["number"])
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue(), newline="")


def write_reports(res: _Resolved, study) -> dict[str, Any]:
    """``best.yaml`` (and ``pareto.yaml`` for two objectives), ``trials.csv``, ``summary.json``
    and the plots (``plots/*.png``)."""
    from optuna.trial import TrialState

    from sweeps.plots import save_plots

    params = list(res.space)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in
              (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    summary: dict[str, Any] = {"study": res.study_name, "storage": storage_url(res.storage), "method": res.spec.method,
                               "dataset": res.dataset.name, "objectives": res.spec.objectives,
                               "directions": res.directions, "trials": counts, "space": res.space, "best": None,
                               "pareto": []}
    if complete:
        if len(res.directions) == 1:
            best = study.best_trial
            summary["best"] = {"number": best.number, "dice": best.value, "params": best.params,
                               "fold_pct": best.user_attrs.get("val_fold_pct")}
            cfg = best_config(res, [(res.spec.method, assemble(best.params))])
        else:
            front = sorted(study.best_trials, key=lambda t: -t.values[0])
            summary["pareto"] = [{"number": t.number, "dice": t.values[0], "fold_pct": t.values[1], "params": t.params}
                                 for t in front]
            best = front[0]
            summary["best"] = {"number": best.number, "dice": best.values[0], "fold_pct": best.values[1],
                               "params": best.params, "rule": "highest Dice on the Pareto front"}
            cfg = best_config(res, [(res.spec.method, assemble(best.params))])
            pareto_cfg = best_config(res, [(f"{res.spec.method}_p{t.number}", assemble(t.params)) for t in front])
            atomic_write_text(res.output / "pareto.yaml", "# Pareto front (Dice up, fold % down), one method per trial\n"
                         + yaml.safe_dump(pareto_cfg, sort_keys=False))
        header = (f"# Best parameters of study {res.study_name!r} (trial {best.number}); "
                  f"run with: regbench run {res.output / 'best.yaml'}\n")
        atomic_write_text(res.output / "best.yaml", header + yaml.safe_dump(cfg, sort_keys=False))
    _write_trials_csv(study, res.output / "trials.csv", params)
    plots, skipped = save_plots(study, res.output / "plots", params, res.directions)
    summary["plots"] = [str(p) for p in plots]
    summary["plots_skipped"] = skipped
    atomic_write_text(res.output / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary
