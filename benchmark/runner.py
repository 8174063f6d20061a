"""`regbench run`: a grid of methods × datasets × seeds, resumable, DDP-exact.

Config (YAML)::

    suite: quickstart                 # name of the suite (results/<suite> by default)
    output: results/quickstart        # optional; --output overrides
    seeds: [0]
    include_initial: true             # add the no-registration row ('initial') per dataset
    trainer: {max_epochs: 1, accelerator: auto, devices: 1}   # lightning.Trainer arguments
    loggers: [csv]                    # csv (default), tensorboard, wandb
    wandb: {project: regbench, offline: true}                 # options of WandbLogger
    datasets:
      synthetic_brain:
        class_path: datamodules.SyntheticBrainDataModule
        init_args: {size: 48}
    methods:
      voxelmorph:
        class_path: systems.VoxelMorph
        init_args: {lambda_: 1.0}
        trainer: {max_steps: 200}     # per-method trainer overrides

Strings may name environment variables, ``${LUMIR_ROOT}`` or ``${LUMIR_ROOT:-/data/LUMIR}``
(an unset variable without a default is an error naming the key), and any value can be
overridden on the command line: ``regbench run CONFIG --set datasets.lumir.init_args.root=/data/LUMIR``
(the value is read as YAML, so ``--set methods.voxelmorph.trainer.max_steps=50`` is an int).

``class_path`` / ``init_args`` blocks are LightningCLI's, so a block can be copied into a
``regbench fit --config`` file and back. The whole config is checked (every key's type and
range, every class, every init argument against its class's signature, every dataset path)
before any work starts, by ``jsonargparse`` (:mod:`benchmark.config`); a bad value is one
line naming the file and the key. ``regbench run CONFIG --print_config`` prints the
resolved config (defaults of its own keys filled in) and exits.

Per experiment the runner fits (learned methods; checkpoints kept under ``ckpt/``), tests,
and writes ``cases.csv`` and ``run.json`` (see :mod:`benchmark.core.results`). Finished cases
are logged per rank as they complete, so a killed run resumes where it stopped: a finished
experiment with the same config hash (and a ``cases.csv`` that passes
:func:`benchmark.core.results.check_cases_csv`) is skipped, a half-tested one (or one whose
``cases.csv`` is damaged: its whole rows are kept) computes only its missing cases, an
interrupted fit continues from ``ckpt/last.ckpt``. ``partial/`` and ``ckpt/`` are reused only
when a readable ``run.json`` of the same config hash vouches for them; a folder whose
``run.json`` is missing or unreadable is moved aside (``.seed<k>.unverified-<UTC time>``, never
deleted) and the experiment starts afresh. A redo swap cut by a crash is finished (or undone)
on the next start (:func:`_recover_swap`).

Under DDP (``trainer: {devices: N, strategy: ddp}``, or launched by torchrun / SLURM) every
rank runs this same loop; the test cases are split over ranks without padding, so each
case is computed exactly once, and rank 0 writes the results.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import inspect
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmark.core.classpath import ClassPathError, import_object, resolve_alias
from benchmark.config import (
    BLOCK_KEYS,
    ConfigError,
    apply_overrides,
    check_budget,
    check_init_args,
    check_trainer,
    class_defaults,
    dump_config,
    expand_env,
    read_config,
    resolve_top,
)
from benchmark.core.io import DataError, atomic_path, atomic_write_json, replace_folder
from benchmark.reliability import (
    ExperimentLock,
    FitStateCallback,
    LockHeld,
    RunInterrupted,
    critical,
    describe_holder,
    install_signal_handlers,
    make_resumable,
    one_line_error,
)
from benchmark.core.results import (
    PartialCaseLog,
    check_cases_csv,
    experiment_dir,
    read_partial_records,
    read_run_json,
    read_whole_case_rows,
    records_complete,
    write_cases_csv,
)

__all__ = ["ConfigError", "check_grid_config", "print_config", "load_grid_config", "apply_overrides", "expand_env", "run_grid", "experiment_config", "config_hash", "cmd_run", "ResultsWriter"]

# --------------------------------------------------------------------------------------
# config


@dataclasses.dataclass
class Block:
    name: str
    where: str
    cls: type
    init_args: dict[str, Any]
    trainer: dict[str, Any]
    raw: dict[str, Any]
    variant_of: str | None = None  # a variant's base method (benchmark.variants)
    variant: str | None = None
    budget: dict[str, Any] | None = None  # a method's own budget (overrides the top-level one)

    def build(self) -> Any:
        return self.cls(**self.init_args)


@dataclasses.dataclass
class GridConfig:
    path: str
    suite: str
    output: Path
    seeds: list[int]
    include_initial: bool
    trainer: dict[str, Any]
    loggers: list[str]
    wandb: dict[str, Any]
    datasets: dict[str, Block]
    methods: dict[str, Block]
    budget: dict[str, Any] | None = None
    checkpoint_every_n_steps: int = 50


def import_class(class_path: str, where: str) -> type:
    """The class a config block names (:func:`benchmark.core.classpath.import_object`), or a
    :class:`ConfigError` that names the block."""
    try:
        cls = import_object(class_path)
    except ClassPathError as exc:
        if exc.kind == "name":
            raise ConfigError(f"{where}.class_path: {exc.module!r} has no class {exc.name!r}") from None
        raise ConfigError(f"{where}.class_path: {exc.reason}") from exc.__cause__
    if not inspect.isclass(cls):
        mod_name, _, cls_name = resolve_alias(class_path).rpartition(".")
        raise ConfigError(f"{where}.class_path: {mod_name!r} has no class {cls_name!r}")
    return cls


def require_data_protocol(dm: Any, where: str) -> None:
    """Refuse a data module that does not implement :class:`datamodules.base.RegistrationData`
    (what the runner, the results writer and the test loop use), naming the config block."""
    from datamodules.base import protocol_problems

    problems = protocol_problems(dm)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def initial_system(dm: Any) -> Any:
    """The ``initial`` row's system of a data module: the class its ``initial_system`` names
    (e.g. 2D/3D: the starting pose, unchanged), else :class:`systems.base.NoRegistration`."""
    path = dm.initial_system
    if path is None:
        from systems.base import NoRegistration

        return NoRegistration()
    return import_class(path, f"{type(dm).__name__}.initial_system")()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_budget_conflicts(blk: Block, top: dict[str, Any] | None, trainer: dict[str, Any]) -> None:
    """A budget and a trainer limit of the same kind on one learned method is ambiguous: refuse it."""
    if not getattr(blk.cls, "learns", True):
        return
    budget = blk.budget if blk.budget is not None else top
    if budget is None:
        return
    where_budget = f"{blk.where}.budget" if blk.budget is not None else "budget"
    for bkey, tkey in (("max_steps", "max_steps"), ("max_time_s", "max_time")):
        if budget.get(bkey) is None:
            continue
        for src, where in ((blk.trainer, f"{blk.where}.trainer"), (trainer, "trainer")):
            if tkey in src:
                raise ConfigError(f"{where}.{tkey}: conflicts with {where_budget}.{bkey}; set the training length in one "
                                  f"place (a method's own budget goes in {blk.where}.budget)")


def effective_budget(cfg: GridConfig, blk: Block | None) -> tuple[dict[str, Any] | None, bool]:
    """``(budget, overridden)`` of a method: its own ``budget`` block, else the top-level one;
    ``None`` for methods that do not learn or when no budget is configured."""
    if blk is None or not getattr(blk.cls, "learns", True):
        return None, False
    if blk.budget is not None:
        return dict(blk.budget), True
    return (dict(cfg.budget), False) if cfg.budget is not None else (None, False)


def apply_budget(trainer_kwargs: dict[str, Any], budget: dict[str, Any] | None) -> dict[str, Any]:
    """Trainer arguments with a budget applied: ``max_steps`` (and ``max_epochs = -1`` so that
    the budget, not an epoch count, ends training) and ``max_time`` (seconds)."""
    kw = dict(trainer_kwargs)
    if budget is None or (budget.get("max_steps") is None and budget.get("max_time_s") is None):
        return kw
    kw["max_epochs"] = -1
    kw["max_steps"] = budget["max_steps"] if budget.get("max_steps") is not None else -1
    if budget.get("max_time_s") is not None:
        kw["max_time"] = {"seconds": float(budget["max_time_s"])}
    return kw


def _parse_block(name: str, raw: Any, where: str, dataset: bool = False) -> Block:
    """One ``class_path`` block, checked against its class (:mod:`benchmark.config`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with class_path/init_args, got {type(raw).__name__}")
    for key in raw:
        if key not in BLOCK_KEYS:
            raise ConfigError(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(BLOCK_KEYS))})")
    if "class_path" not in raw:
        raise ConfigError(f"{where}.class_path: missing")
    cls = import_class(raw["class_path"], where)
    init_args = raw.get("init_args") or {}
    check_init_args(cls, init_args, where, counts=dataset)
    trainer = check_trainer(raw.get("trainer"), f"{where}.trainer")
    budget = check_budget(raw.get("budget"), f"{where}.budget")
    return Block(name, where, cls, dict(init_args), trainer, raw, budget=budget)


def check_grid_config(path: str | os.PathLike, output: str | None = None,
                      overrides: list[str] | None = None) -> tuple[dict[str, Any], GridConfig]:
    """Every check of a grid config that builds nothing (keys, types and ranges, classes and
    their arguments, trainer arguments, variants, budgets); a :class:`ConfigError` names the
    file and the key.

    Returns:
        ``(resolved, cfg)``: the config with the defaults of its own keys filled in (what
        ``--print_config`` prints; it loads back to the same experiments and config hashes)
        and the :class:`GridConfig`, whose data modules have not been built yet.
    """
    p = Path(path)
    try:
        return _check_grid_config(p, output, overrides)
    except ConfigError as exc:
        if str(exc).startswith(f"{p}:"):
            raise
        raise ConfigError(f"{p}: {exc}") from exc


def _check_grid_config(p: Path, output: str | None, overrides: list[str] | None) -> tuple[dict[str, Any], GridConfig]:
    top = resolve_top(read_config(p, overrides), p, output)
    trainer = check_trainer(top["trainer"], "trainer")
    budget = top["budget"]
    datasets = {n: _parse_block(n, b, f"datasets.{n}", dataset=True) for n, b in top["datasets"].items()}
    from benchmark.variants import VariantError, expand_variants

    try:
        raw_methods, origin = expand_variants(top["methods"])
    except VariantError as exc:
        raise ConfigError(str(exc)) from exc
    methods = {n: _parse_block(n, b, f"methods.{origin[n][0]}.variants.{origin[n][1]}" if n in origin else f"methods.{n}")
               for n, b in raw_methods.items()}
    for n, (base, var) in origin.items():
        methods[n].variant_of, methods[n].variant = base, var
    if "initial" in methods:
        raise ConfigError("methods.initial: the name 'initial' is reserved for the no-registration row")
    for name, blk in datasets.items():
        if blk.budget is not None:
            raise ConfigError(f"datasets.{name}.budget: a budget belongs to a method block (or the top level)")
    for name, blk in methods.items():
        _check_budget_conflicts(blk, budget, trainer)
    cfg = GridConfig(str(p), top["suite"], Path(top["output"]), top["seeds"], top["include_initial"], trainer, top["loggers"],
                     top["wandb"], datasets, methods, budget=budget, checkpoint_every_n_steps=top["checkpoint_every_n_steps"])
    return top, cfg


def print_config(path: str | os.PathLike, output: str | None = None, overrides: list[str] | None = None) -> str:
    """``--print_config``: the resolved config as YAML, after every check of
    :func:`check_grid_config` (nothing is built or run), then each block's class defaults
    that it does not set, as comments."""
    resolved, cfg = check_grid_config(path, output, overrides)
    blocks = [*cfg.datasets.values(), *(b for b in cfg.methods.values() if b.variant_of is None)]
    return dump_config(resolved, {f"{b.where} ({b.raw['class_path']})": class_defaults(b.cls, b.init_args) for b in blocks})


def load_grid_config(path: str | os.PathLike, output: str | None = None, overrides: list[str] | None = None) -> GridConfig:
    """Read and fully check a grid config; raises :class:`ConfigError` naming the key.

    ``overrides`` are ``dotted.key=value`` strings applied before environment variables
    are expanded. The checks of :func:`check_grid_config` come first, then every data
    module is built and checks its inputs, and every method is built.
    """
    _, cfg = check_grid_config(path, output, overrides)
    datasets, methods = cfg.datasets, cfg.methods
    # Datasets check their inputs (paths, files) now, before any work.
    for name, blk in datasets.items():
        try:
            dm = blk.build()
        except (DataError, FileNotFoundError, ValueError, TypeError) as exc:
            raise ConfigError(f"datasets.{name}: {exc}") from exc
        require_data_protocol(dm, f"datasets.{name}")
        try:
            dm.check_inputs()
        except (DataError, FileNotFoundError) as exc:
            raise ConfigError(f"datasets.{name}: {exc}") from exc
    for name, blk in methods.items():
        try:
            blk.build()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"methods.{name}: {exc}") from exc
    return cfg


# --------------------------------------------------------------------------------------
# provenance


def _git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("regbench", "torch", "lightning", "numpy", "scipy", "nibabel", "optuna", "wandb"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def config_hash(resolved: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of an experiment's resolved config (first 16 hex)."""
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------
# results writer callback


def _make_callback_base():
    import lightning as L

    return L.Callback


class ResultsWriter(_make_callback_base()):
    """Writes every finished test case as it completes, and ``cases.csv`` at the end.

    It receives what the system's ``test_step`` returns (:class:`systems.base.TestOutput`:
    the batch's records and the registration's estimate) through Lightning's
    ``on_test_batch_end`` and sets nothing on the system. It reads the data module through
    its declared protocol (:class:`datamodules.base.RegistrationData`): ``case_ids``,
    ``export_fields``, ``field_record`` and ``task`` (the ``cases.csv`` columns).

    Each rank appends its records to ``<exp_dir>/partial/cases.rank<r>.jsonl`` (fsynced per
    case). At the end of the test loop all ranks meet at a barrier and rank 0 merges every
    partial record, from this attempt and earlier ones, into ``cases.csv`` (atomic).

    It also keeps what the report needs: ``panel.npz``, the qualitative panel of the first
    test case (the same case for every method of a dataset; written by the rank that holds
    it, from the system's ``panel_arrays``), and, when the data module sets
    ``export_fields = True`` (data without labels, e.g. LUMIR's hidden test labels), every
    displacement field in Learn2Reg format under ``fields/disp_{fixed_id}_{moving_id}.nii.gz``
    for the official evaluation.

    Args:
        exp_dir: the experiment folder.
        ids: columns added to every record (dataset, method, seed).
    """

    def __init__(self, exp_dir: str | os.PathLike, ids: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.exp_dir = Path(exp_dir)
        self.ids = dict(ids or {})
        self.computed = 0
        self._log = None
        self._dm: Any = None
        self.panel_case: str | None = None

    def on_test_start(self, trainer, pl_module) -> None:
        from benchmark.core.results import PartialCaseLog

        self._log = PartialCaseLog(self.exp_dir, trainer.global_rank)
        self.computed = 0
        self._dm = trainer.datamodule  # None when the test loop was given bare loaders
        ids = self._dm.case_ids("test") if self._dm is not None else []
        self.panel_case = str(ids[0]) if ids and not (self.exp_dir / "panel.npz").exists() else None

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Fields (when exported), the panel case, then the records (what a resumed run trusts)."""
        estimate = outputs["estimate"]
        if self._dm is not None and self._dm.export_fields:
            self._save_fields(batch, estimate)
        for b, rec in enumerate(outputs["records"]):
            if self.panel_case is not None and rec["case_id"] == self.panel_case:
                self._save_panel(self.panel_case, pl_module.panel_arrays(batch, estimate, b, rec))
            with critical():  # a SIGTERM waits until the finished case is on disk
                self._log.append({**self.ids, **rec})
                self.computed += 1

    def _save_panel(self, case_id: str, arrays: dict[str, Any]) -> None:
        import numpy as np

        with atomic_path(self.exp_dir / "panel.npz", prefix=".tmp_panel_", suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, case_id=np.array(case_id), **{k: np.asarray(v) for k, v in arrays.items()})

    def _save_fields(self, batch: dict[str, Any], disp) -> None:
        from benchmark.core.io import write_displacement

        for b in range(disp.shape[0]):
            name = f"disp_{batch['fixed_id'][b]}_{batch['moving_id'][b]}.nii.gz"
            affine = batch["fixed_affine"][b].detach().cpu().numpy() if "fixed_affine" in batch else None
            path = write_displacement(self.exp_dir / "fields" / name, disp[b].detach().float().cpu().numpy(), affine)
            # The data module's record of each field's grids (written beside it as JSON).
            record = self._dm.field_record(batch, b)
            if record is not None:
                from benchmark.core.io import field_sidecar_path

                atomic_write_json(field_sidecar_path(path), record)

    def on_test_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier("regbench-results")
        if trainer.is_global_zero:
            task = self._dm.task if self._dm is not None else None  # None: inferred from the records (legacy)
            write_cases_csv(self.exp_dir / "cases.csv", read_partial_records(self.exp_dir), task=task)


# --------------------------------------------------------------------------------------
# experiments


def _loggers(cfg: GridConfig, exp_dir: Path, run_name: str, resolved: dict[str, Any]):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    out = []
    for lg in cfg.loggers:
        if lg == "csv":
            out.append(CSVLogger(str(exp_dir), name="logs"))
        elif lg == "tensorboard":
            out.append(TensorBoardLogger(str(exp_dir), name="tensorboard"))
        elif lg == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            opts = dict(cfg.wandb)
            opts.setdefault("project", "regbench")
            opts.setdefault("offline", True)  # no network unless the user says so
            opts.setdefault("save_dir", str(exp_dir))
            opts.setdefault("name", run_name)
            opts.setdefault("group", cfg.suite)
            out.append(WandbLogger(**opts))
    for lg in out:
        lg.log_hyperparams(resolved)
    return out


def _finish_loggers(loggers) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                import wandb

                if wandb.run is not None:
                    wandb.finish()
            except Exception:  # wandb is optional and must never break a grid
                pass


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_rank_zero() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _rank() == 0


@dataclasses.dataclass
class Experiment:
    dataset: Block
    method: Block | None  # None = initial (no registration)
    method_name: str
    seed: int


def _resolved(cfg: GridConfig, exp: Experiment, trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        "suite": cfg.suite,
        "dataset": {"name": exp.dataset.name, **{k: exp.dataset.raw[k] for k in ("class_path", "init_args") if k in exp.dataset.raw}},
        "method": {"name": exp.method_name, "class_path": "systems.NoRegistration"}
        if exp.method is None
        else {"name": exp.method_name, **{k: exp.method.raw[k] for k in ("class_path", "init_args") if k in exp.method.raw},
              **({"variant_of": exp.method.variant_of, "variant": exp.method.variant} if exp.method.variant_of else {})},
        "seed": exp.seed,
        "trainer": trainer_kwargs,
    }


def experiment_config(cfg: GridConfig, exp: Experiment) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(resolved, trainer_kwargs)`` of an experiment: its resolved config, which
    :func:`config_hash` hashes (class arguments as the file writes them, the budget applied),
    and its Trainer arguments."""
    budget, overridden = effective_budget(cfg, exp.method)
    trainer_kwargs = apply_budget({**cfg.trainer, **(exp.method.trainer if exp.method else {})}, budget)
    resolved = _resolved(cfg, exp, trainer_kwargs)
    if budget is not None:
        resolved["budget"] = {**budget, "overridden": overridden}
    return resolved, trainer_kwargs


def lock_path(cfg: GridConfig, exp: Experiment) -> Path:
    """``<output>/.locks/<dataset>/<method>/seed<k>.lock`` (outside the experiment folder, which a
    redo swaps)."""
    return Path(cfg.output) / ".locks" / exp.dataset.name / exp.method_name / f"seed{int(exp.seed)}.lock"


def _multi_process(cfg: GridConfig, exp: Experiment) -> bool:
    """Whether the experiment runs on several processes (DDP), so that one rank cannot skip alone."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return True
    kw = {**cfg.trainer, **(exp.method.trainer if exp.method else {})}
    d = kw.get("devices", 1)
    many = (_is_int(d) and (d > 1 or d == -1)) or (isinstance(d, list) and len(d) > 1) \
        or (isinstance(d, str) and ("," in d.strip(", ") or d.strip() == "-1"))
    return bool(many or int(kw.get("num_nodes", 1) or 1) > 1)


def run_experiment(cfg: GridConfig, exp: Experiment, log=print) -> str:
    """Fit (if the method learns) and test one experiment; returns its final status.

    Rank 0 holds the experiment's lock (:func:`lock_path`) while it works; when another live
    process holds it, :class:`benchmark.reliability.LockHeld` is raised before anything is
    touched.
    """
    lock = ExperimentLock(lock_path(cfg, exp))
    if is_rank_zero() and not lock.acquire():
        raise LockHeld(lock.path, lock.holder())
    try:
        return _run_experiment_locked(cfg, exp, log)
    finally:
        lock.release()


def _fit_stats_start(device) -> Any:
    """Start measuring training memory: CUDA peak counters, else an RSS sampler thread."""
    import torch

    if device is not None and getattr(device, "type", "cpu") == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
        return None
    from benchmark.core.timing import RssSampler

    return RssSampler(0.05).__enter__()


def _fit_stats_end(device, sampler) -> tuple[float, str]:
    import torch

    if sampler is None:
        return float(torch.cuda.max_memory_allocated(device)) / 2**20, "cuda_max_allocated"
    sampler.__exit__(None, None, None)
    return float(sampler.peak), "rss_sampled_50ms"


def _median(values: list[float]) -> float | None:
    vals = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    if not vals:
        return None
    n = len(vals)
    return float(vals[n // 2]) if n % 2 else float(0.5 * (vals[n // 2 - 1] + vals[n // 2]))


# --------------------------------------------------------------------------------------
# what a start may reuse: run.json vouches, damaged results, cut swaps

#: What an experiment folder holds that a later start could reuse or mistake for its own.
_STATE = ("run.json", "cases.csv", "partial", "ckpt", "panel.npz", "fields")


def _holds_state(d: Path) -> bool:
    return any((d / name).exists() for name in _STATE)


def _holds_other_result(final_dir: Path, prev: dict[str, Any] | None, chash: str) -> bool:
    """Whether ``seed<k>`` holds a complete result of another config (``prev``: its run.json),
    which a redo recomputes in a staging folder and swaps out only when the new one is complete."""
    return bool(prev and prev.get("status") == "complete" and prev.get("config_hash") != chash
                and (final_dir / "cases.csv").exists())


def _read_or_set_aside(d: Path, final_dir: Path, log) -> dict[str, Any] | None:
    """``run.json`` of ``d``; an unreadable one moves ``d`` aside (:func:`_set_aside`) and reads
    as absent, so that nothing it cannot vouch for is reused.

    Aside rather than a stop (:class:`DataError`): the runner writes ``run.json`` atomically,
    so the damage came from outside; a stop would halt an unattended grid over state that can
    be recomputed, and the folder moved aside keeps every computed byte for inspection."""
    try:
        return read_run_json(d)
    except DataError as exc:
        _set_aside(d, final_dir, str(exc), log)
        return None


def _prepare_folder(final_dir: Path, chash: str, log) -> None:
    """Rank 0, before an experiment starts: make its folder state one that :func:`_locate` may
    trust (the only writes before the ranks meet).

    A redo swap cut by a crash is finished or undone (:func:`_recover_swap`). In the folder
    this run works in (``seed<k>``, or the redo staging folder), state no ``run.json`` vouches
    for (missing, unreadable, or without a config hash) is moved aside; a half-done run of
    another config hash is discarded (records, checkpoints, ``cases.csv``, panel, fields); a
    complete run of this config whose ``cases.csv`` is damaged gets its whole rows put back
    into ``partial/`` (the rest is recomputed); a complete redo whose swap never ran is swapped in.
    """
    _recover_swap(final_dir, chash, log)
    d, replaces = final_dir, None
    prev = _read_or_set_aside(d, final_dir, log)
    if _holds_other_result(final_dir, prev, chash):
        d, replaces = final_dir.parent / f".{final_dir.name}.redo-{chash}", str(prev.get("config_hash"))
        prev = _read_or_set_aside(d, final_dir, log)
    if prev is None:
        if _holds_state(d):
            _set_aside(d, final_dir, "results without a run.json", log)
    elif prev.get("config_hash") is None:
        _set_aside(d, final_dir, "its run.json records no config hash", log)
    elif prev.get("config_hash") != chash:
        # Nothing of another config belongs to this one: its records and checkpoint would be
        # resumed, its panel and fields shown under this config's label.
        gone = _discard_other_config(d)
        if gone:
            log(f"[discard] {d}: a half-done run of config hash {prev.get('config_hash')} (now {chash}); "
                f"removed its {', '.join(gone)}")
    elif prev.get("status") == "complete":
        problems = _result_problems(d, chash, prev)
        if problems:  # a damaged cases.csv is no result: keep its whole rows, recompute the rest
            kept = _salvage_cases(d)
            log(f"[resume] {problems[0]}; kept {kept} whole case row(s), recomputing the missing cases")
        elif replaces:  # a finished redo whose swap never ran
            _swap_in(d, final_dir, replaces, chash, log)


def _locate(final_dir: Path, chash: str) -> tuple[Path, dict[str, Any] | None, str | None]:
    """``(folder this run works in, its run.json, config hash of the result it replaces)``, read
    after :func:`_prepare_folder`: the redo staging folder when ``seed<k>`` holds a complete
    result of another config, else ``seed<k>``."""
    def read(d: Path) -> dict[str, Any] | None:
        try:
            return read_run_json(d)
        except DataError:  # set aside by rank 0; nothing to reuse
            return None

    prev = read(final_dir)
    if _holds_other_result(final_dir, prev, chash):
        staging = final_dir.parent / f".{final_dir.name}.redo-{chash}"
        return staging, read(staging), str(prev.get("config_hash"))
    return final_dir, prev, None


def _set_aside(d: Path, final_dir: Path, why: str, log) -> Path | None:
    """Move folder ``d`` to ``.<seed folder>.unverified-<UTC time>`` beside ``final_dir`` (kept for
    inspection, never reused, never cleaned) and say so in one line."""
    if not d.exists():
        return None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = final_dir.parent / f".{final_dir.name}.unverified-{stamp}"
    n = 1
    while aside.exists():
        aside, n = final_dir.parent / f".{final_dir.name}.unverified-{stamp}-{n}", n + 1
    with critical():
        os.replace(d, aside)
    log(f"[unverified] {d}: {why}; moved to {aside.name} (kept, not reused), starting afresh")
    return aside


def _discard_other_config(d: Path) -> list[str]:
    """Remove what a half-done run of another config left in ``d`` (its case records,
    checkpoints, ``cases.csv``, panel and exported fields; its ``run.json`` is rewritten);
    returns the names removed."""
    gone = [name for name in ("partial", "ckpt", "fields", "cases.csv", "panel.npz") if (d / name).exists()]
    for name in gone:
        if (d / name).is_dir():
            shutil.rmtree(d / name, ignore_errors=True)
        else:
            (d / name).unlink(missing_ok=True)
    return gone


def _result_problems(d: Path, chash: str, run: dict[str, Any] | None = None) -> list[str]:
    """Why ``d`` is not a complete, whole result of config ``chash`` (empty: it is): its
    ``run.json`` (``run``, else read) says ``complete`` with that hash, and its ``cases.csv``
    passes :func:`check_cases_csv` against the ``cases_total`` recorded there."""
    if run is None:
        try:
            run = read_run_json(d)
        except DataError as exc:
            return [str(exc)]
    if not run or run.get("status") != "complete" or run.get("config_hash") != chash:
        return [f"{d}: no complete run.json of config hash {chash}"]
    total = run.get("cases_total")
    return check_cases_csv(d / "cases.csv", expected_rows=total if _is_int(total) else None)


def _salvage_cases(d: Path) -> int:
    """Put the whole rows of ``d/cases.csv`` (:func:`read_whole_case_rows`) that ``partial/`` lacks
    into ``partial/``, so a resumed test skips them; returns how many cases are kept there."""
    have = {str(r.get("case_id")) for r in read_partial_records(d)}
    rows = [r for r in read_whole_case_rows(d / "cases.csv") if str(r["case_id"]) not in have]
    if rows:
        with critical():
            PartialCaseLog(d, 0).extend(rows)
    return len(have) + len({str(r["case_id"]) for r in rows})


def _swap_in(new: Path, final_dir: Path, replaces: str, chash: str, log) -> None:
    """Swap a complete redo (``new``) in for the result at ``final_dir``, then drop the old one
    and the unfinished redos of other configs. A crash between the two renames is repaired by
    :func:`_recover_swap` on the next start."""
    old = final_dir.parent / f".{final_dir.name}.old-{replaces}"
    with critical():
        shutil.rmtree(old, ignore_errors=True)
        replace_folder(new, final_dir, old)
    shutil.rmtree(old, ignore_errors=True)
    for stale in final_dir.parent.glob(f".{final_dir.name}.redo-*"):  # unfinished redos of other configs
        shutil.rmtree(stale, ignore_errors=True)
    log(f"[redo] {final_dir}: replaced (config hash {replaces} -> {chash})")


def _recover_swap(final_dir: Path, chash: str, log) -> None:
    """Repair a redo swap cut by a crash (rank 0, before anything reads the folder).

    The swap renames the result to ``.seed<k>.old-<hash>``, then the complete redo
    ``.seed<k>.redo-<hash>`` to ``seed<k>``, then removes the backup. With ``seed<k>`` missing,
    a complete redo of the current config is renamed into place (the swap finished), else the
    newest backup is put back (the swap undone; the redo, if any, resumes or is redone as
    usual). A backup is removed only when provably redundant: the result in place is complete,
    whole and records that it replaced exactly that config hash. Other dot folders are left.
    """
    parent = final_dir.parent
    if not parent.is_dir():
        return
    if not final_dir.exists():
        redo = parent / f".{final_dir.name}.redo-{chash}"
        backups = sorted(parent.glob(f".{final_dir.name}.old-*"), key=lambda p: p.stat().st_ctime)
        if redo.is_dir() and not _result_problems(redo, chash):
            with critical():
                os.replace(redo, final_dir)
            log(f"[recover] {final_dir}: a crash had cut the swap of a complete redo (config hash {chash}); finished it")
        elif backups:
            with critical():
                os.replace(backups[-1], final_dir)
            log(f"[recover] {final_dir}: a crash had cut a redo's swap; restored the previous result from {backups[-1].name}")
        else:
            return
    try:
        run = read_run_json(final_dir) or {}
    except DataError:
        return
    replaced = run.get("replaces_config_hash")
    backup = parent / f".{final_dir.name}.old-{replaced}"
    if replaced and backup.exists() and not _result_problems(final_dir, str(run.get("config_hash")), run):
        shutil.rmtree(backup, ignore_errors=True)
        log(f"[recover] {final_dir}: removed {backup.name}, the backup of a swap that had finished")


def _run_experiment_locked(cfg: GridConfig, exp: Experiment, log=print) -> str:
    import lightning as L
    import torch

    from benchmark.core.timing import device_description
    from systems.base import DivergenceError

    final_dir = experiment_dir(cfg.output, exp.dataset.name, exp.method_name, exp.seed)
    budget, overridden = effective_budget(cfg, exp.method)
    resolved, trainer_kwargs = experiment_config(cfg, exp)
    chash = config_hash(resolved)
    if is_rank_zero():  # repairs and set-asides; every rank then reads the same folder state
        _prepare_folder(final_dir, chash, log)
    _barrier()
    exp_dir, prev, replaces = _locate(final_dir, chash)
    if replaces:
        # Never delete a complete result before its replacement is complete: recompute in a
        # staging folder next to it and swap when done (a half-done redo resumes there).
        log(f"[redo] {final_dir}: config changed (hash {replaces} -> {chash}); recomputing in {exp_dir.name}, "
            "the previous result stays in place until the new one is complete")
    if prev and prev.get("status") == "complete" and not _result_problems(exp_dir, chash, prev):
        log(f"[skip] {final_dir} is complete")
        return "complete"
    same = bool(prev and prev.get("config_hash") == chash)

    L.seed_everything(exp.seed, workers=True, verbose=False)
    dm = exp.dataset.build()
    require_data_protocol(dm, f"datasets.{exp.dataset.name}")
    if exp.method is not None:
        system = exp.method.build()
    else:
        system = initial_system(dm)
    run = {
        "suite": cfg.suite,
        "dataset": exp.dataset.name,
        "method": exp.method_name,
        "seed": exp.seed,
        "task": dm.task,
        "config": resolved,
        "config_hash": chash,
        "config_file": str(Path(cfg.path).resolve()),
        "git_revision": _git_revision(),
        "packages": _package_versions(),
        "host": platform.node(),
        "pid": os.getpid(),
        "threads": {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()},
        "started": _now(),
        "ended": None,
        "status": "running",
        "error": None,
        "fit": (prev or {}).get("fit") if same else None,
        "fit_resumes": ((prev or {}).get("fit_resumes") or []) if same else [],
        "attempts": ((prev or {}).get("attempts") or []) if same else [],
    }
    if replaces:
        run["replaces_config_hash"] = replaces

    def save_run() -> None:
        if is_rank_zero():
            with critical():
                atomic_write_json(exp_dir / "run.json", run)

    exp_dir.mkdir(parents=True, exist_ok=True)
    save_run()
    run_name = f"{cfg.suite}/{exp.dataset.name}/{exp.method_name}/seed{exp.seed}"
    loggers = _loggers(cfg, exp_dir, run_name, resolved) if exp.method is not None else []
    base_kwargs = {"default_root_dir": str(exp_dir), "inference_mode": False, "enable_model_summary": False}
    kw = {**trainer_kwargs, **base_kwargs}
    ckpt_dir = exp_dir / "ckpt"
    t_start = time.perf_counter()
    try:
        if system.learns and not (run["fit"] or {}).get("done"):
            from lightning.pytorch.callbacks import ModelCheckpoint

            ckpt_cb = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0,
                                      every_n_train_steps=cfg.checkpoint_every_n_steps)
            state_cb = FitStateCallback()
            trainer = L.Trainer(**{**kw, "logger": loggers or False, "callbacks": [ckpt_cb, state_cb]})
            last = ckpt_dir / "last.ckpt"
            # The training stream is resumable: the loader's position is saved in every checkpoint.
            orig_train_dataloader = dm.train_dataloader
            dm.train_dataloader = lambda: make_resumable(orig_train_dataloader())
            sampler = _fit_stats_start(trainer.strategy.root_device)
            try:
                trainer.fit(system, datamodule=dm, ckpt_path=str(last) if last.exists() else None)
            finally:
                peak_mb, peak_src = _fit_stats_end(trainer.strategy.root_device, sampler)
            if trainer.interrupted:
                raise KeyboardInterrupt("training interrupted")
            if state_cb.resumed_from_step is not None:
                run["fit_resumes"].append({"from_step": state_cb.resumed_from_step, "at": _now(), "checkpoint": "ckpt/last.ckpt"})
                log(f"[resume] {exp_dir}: fit continued from step {state_cb.resumed_from_step} (ckpt/last.ckpt)")
            trainer.save_checkpoint(str(ckpt_dir / "final.ckpt"), weights_only=False)  # resumable, says so
            eff = budget if budget is not None else {"max_steps": trainer_kwargs.get("max_steps"),
                                                     "max_time_s": None}
            run["fit"] = {"done": True, "steps": int(trainer.global_step), "seconds": state_cb.seconds,
                          "cpu_seconds": state_cb.cpu_seconds,
                          "params": int(sum(p.numel() for p in system.parameters() if p.requires_grad)),
                          "peak_train_mem_mb": peak_mb, "peak_train_mem_source": peak_src,
                          "budget": {**eff, "overridden": overridden,
                                     "source": ("method budget" if overridden else "budget") if budget is not None else "trainer"},
                          "resumes": list(run["fit_resumes"]),
                          "checkpoint": "ckpt/final.ckpt"}
            save_run()
        elif system.learns:
            final = Path((run["fit"] or {}).get("checkpoint") or "ckpt/final.ckpt")
            final = final if final.is_absolute() else exp_dir / final
            state = torch.load(final, map_location="cpu", weights_only=False)["state_dict"]
            system.load_state_dict(state)
            log(f"[resume] {exp_dir}: fit already done, weights from {final}")

        # ---- test: only the cases not yet recorded
        done = read_partial_records(exp_dir)
        done_ids = {str(r["case_id"]) for r in done}
        dm.skip_cases = set(done_ids)
        writer = ResultsWriter(exp_dir, {"dataset": exp.dataset.name, "method": exp.method_name, "seed": exp.seed})
        test_kw = {k: v for k, v in kw.items() if k not in ("max_steps", "max_epochs", "min_steps", "min_epochs", "max_time",
                                                            "val_check_interval", "check_val_every_n_epoch")}
        trainer = L.Trainer(**{**test_kw, "logger": loggers or False, "callbacks": [writer], "enable_checkpointing": False})
        dev = trainer.strategy.root_device
        trainer.test(system, datamodule=dm, verbose=False)
        expected = dm.case_ids("test")
        records = read_partial_records(exp_dir)
        complete = records_complete(records, expected)
        run.update(device_description(dev))
        run["world_size"] = trainer.world_size
        run["warmup_runtime_s"] = list(system.warmup_seconds)
        run["registration_s_median"] = _median([r.get("runtime_s") for r in records])
        if isinstance(run.get("fit"), dict):
            run["fit"]["registration_s_median"] = run["registration_s_median"]
        run["attempts"].append({"started": run["started"], "cases_resumed": len(done_ids),
                                "cases_computed": len(records) - len(done_ids), "seconds": time.perf_counter() - t_start})
        run["cases_total"] = len(expected)
        run["status"] = "complete" if complete else "incomplete"
        if not complete:
            missing = sorted(set(expected) - {str(r["case_id"]) for r in records})
            run["error"] = f"{len(missing)} cases missing after test: {missing[:5]}"
    except DivergenceError as exc:
        run["status"] = "failed"
        run["error"] = f"diverged: {exc}"
        log(f"[failed] {exp_dir}: {exc}" + (f" (the previous result, config hash {replaces}, stays in {final_dir})"
                                            if replaces else ""))
    except (KeyboardInterrupt, RunInterrupted, SystemExit) as exc:
        run["status"] = "interrupted"
        run["error"] = str(exc) or type(exc).__name__
        run["ended"] = _now()
        run["attempts"].append({"started": run["started"], "interrupted": run["error"], "seconds": time.perf_counter() - t_start})
        save_run()
        _finish_loggers(loggers)
        raise
    except Exception as exc:  # one broken experiment must not stop the grid
        run["status"] = "failed"
        run["error"] = one_line_error(exc)
        run["traceback"] = traceback.format_exc()
        log(f"[failed] {exp_dir}: {run['error']}" + (f" (the previous result, config hash {replaces}, stays in {final_dir})"
                                                       if replaces else ""))
    run["ended"] = _now()
    save_run()
    if is_rank_zero() and run["status"] == "complete" and loggers:
        from leaderboard.wandb_tables import log_tables

        log_tables(loggers, exp_dir)  # the per-case table, when a wandb logger is on
    _finish_loggers(loggers)
    if run["status"] == "complete" and is_rank_zero():
        shutil.rmtree(exp_dir / "partial", ignore_errors=True)
        if replaces:  # the new result is complete: swap it in, then drop the old one
            _swap_in(exp_dir, final_dir, replaces, chash, log)
    _barrier()
    return run["status"]


def experiments(cfg: GridConfig) -> list[Experiment]:
    out: list[Experiment] = []
    for dname, dblk in cfg.datasets.items():
        if cfg.include_initial:
            out.append(Experiment(dblk, None, "initial", cfg.seeds[0]))
        for mname, mblk in cfg.methods.items():
            # a method that does not learn is deterministic: its first seed stands for all
            for seed in (cfg.seeds if getattr(mblk.cls, "learns", True) else cfg.seeds[:1]):
                out.append(Experiment(dblk, mblk, mname, seed))
    return out


def _check_output_writable(out: Path) -> None:
    """The results folder can be created and written, or a :class:`ConfigError` naming it."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        probe = Path(out) / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--output {out}: cannot write there ({exc.strerror or exc})") from None


def _run_or_defer(cfg: GridConfig, exp: Experiment, log, deferred: list[Experiment]) -> str:
    """:func:`run_experiment`, or ``"held"`` (and the experiment queued in ``deferred``) when
    another live process holds it. Under DDP a held experiment is an error (all ranks must
    take the same path). An interrupt carries the results folder for the CLI's leaderboard."""
    try:
        return run_experiment(cfg, exp, log=log)
    except LockHeld as held:
        who = describe_holder(held.holder)
        if _multi_process(cfg, exp):
            raise ConfigError(f"{experiment_dir(cfg.output, exp.dataset.name, exp.method_name, exp.seed)}: in use by {who}; "
                              "a multi-process run does not share a results folder (wait for it, or use another --output)") from None
        log(f"[held] {exp.dataset.name}/{exp.method_name}/seed{exp.seed} is being computed by {who}; coming back to it at the end")
        deferred.append(exp)
        return "held"
    except RunInterrupted as stop:
        stop.output = cfg.output  # type: ignore[attr-defined]
        raise


def _run_deferred(cfg: GridConfig, deferred: list[Experiment], statuses: dict[str, str], log) -> None:
    """Wait for each experiment another process held, then run it (a no-op skip when that
    process completed it; a resume when it stopped half-way)."""
    for exp in deferred:
        d = experiment_dir(cfg.output, exp.dataset.name, exp.method_name, exp.seed)
        lock = ExperimentLock(lock_path(cfg, exp))
        again = [exp]
        while again:  # a third process may take it between our wait and our run
            log(f"[wait] {d}: waiting for {describe_holder(lock.holder())}")
            try:
                lock.acquire(blocking=True)
            except RunInterrupted as stop:
                stop.output = cfg.output  # type: ignore[attr-defined]
                raise
            finally:
                lock.release()
            again = []
            statuses[str(d)] = _run_or_defer(cfg, exp, log, again)


def run_grid(config: str | os.PathLike, output: str | None = None, methods: list[str] | None = None, leaderboard: bool = True,
             log=print, overrides: list[str] | None = None) -> dict[str, str]:
    """Run every experiment of a grid config; returns ``{experiment_dir: status}``.

    Prints ``[k/N] experiment k of N: method on dataset, seed s · elapsed · left ~ETA``
    before each experiment (:class:`benchmark.progress.GridProgress`) and ends by naming
    the files it wrote."""
    from benchmark.progress import GridProgress, set_verbosity

    set_verbosity(lightning=True)  # Lightning's tips and banner below the threshold unless -v
    user_log = log

    def log(msg: str) -> None:  # every rank runs the grid; one of them talks
        if is_rank_zero():
            user_log(msg)

    cfg = load_grid_config(config, output, overrides)
    _check_output_writable(cfg.output)
    if methods:
        unknown = set(methods) - set(cfg.methods) - {"initial"}
        if unknown:
            raise ConfigError(f"--methods: unknown method(s) {sorted(unknown)} (config has {sorted(cfg.methods)})")
    statuses: dict[str, str] = {}
    todo = [exp for exp in experiments(cfg) if not methods or exp.method_name in methods]
    progress = GridProgress(len(todo), log)
    deferred: list[Experiment] = []  # held by another live process: run (or skip) once it lets go
    for exp in todo:
        d = experiment_dir(cfg.output, exp.dataset.name, exp.method_name, exp.seed)
        progress.start(exp.method_name, exp.dataset.name, exp.seed)
        log(f"[run] {d}")
        skipped = []

        def exp_log(msg: str, _skipped=skipped) -> None:
            _skipped.append(msg.startswith("[skip]"))
            log(msg)

        statuses[str(d)] = _run_or_defer(cfg, exp, exp_log, deferred)
        progress.finish("skipped" if any(skipped) else statuses[str(d)])
    _run_deferred(cfg, deferred, statuses, log)
    if statuses:
        log(f"[results] {len(statuses)} experiment folder(s) under {cfg.output}/ (cases.csv, run.json, panel.npz each)")
    if leaderboard and is_rank_zero():
        from leaderboard.cli import check_results_folder
        from leaderboard.write import write_leaderboard

        # this run's experiments were checked before they were skipped or resumed; others in
        # the folder (outside --methods, another config's) are checked as `regbench leaderboard` does
        problems = check_results_folder(cfg.output)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            log(f"[leaderboard] not written: {problems[0]}{more}; re-run that experiment, then `regbench leaderboard "
                f"{cfg.output}`")
            return statuses
        md = write_leaderboard(cfg.output)
        log(f"[leaderboard] wrote {md}, {md.with_suffix('.csv')}, {md.with_suffix('.html')}")
        if "wandb" in cfg.loggers:
            from leaderboard.wandb_tables import log_leaderboard_wandb

            log_leaderboard_wandb(cfg.output, {**cfg.wandb, "group": cfg.suite})
    return statuses


# --------------------------------------------------------------------------------------
# CLI


def set_threads(n: int | None) -> None:
    """``--threads N``: torch intra-op and inter-op threads (inter-op only before torch's pool starts)."""
    if n is None:
        return
    import torch

    torch.set_num_threads(int(n))
    try:
        torch.set_num_interop_threads(int(n))
    except RuntimeError:  # the inter-op pool already runs: keep its size
        pass


def cmd_run(args) -> int:
    """``regbench run`` (its options are declared in :mod:`benchmark.cli`)."""
    # `regbench --debug` is taken off the line by benchmark.cli before parsing
    debug = bool(getattr(args, "debug", False)) or "--debug" in sys.argv[1:]
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        print(f"regbench run: --threads: expected a positive integer, got {threads}", file=sys.stderr)
        return 2
    set_threads(threads)
    restore = install_signal_handlers()
    try:
        if getattr(args, "print_config", False):  # check and print; nothing runs
            sys.stdout.write(print_config(args.config, output=args.output, overrides=args.set))
            return 0
        statuses = run_grid(args.config, output=args.output, methods=args.methods.split(",") if args.methods else None,
                            overrides=args.set)
    except ConfigError as exc:
        if debug:
            raise
        print(f"regbench run: config error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        out = getattr(stop, "output", None)
        if out is not None and is_rank_zero():
            try:
                from leaderboard.write import write_leaderboard

                md = write_leaderboard(out)
                print(f"[leaderboard] wrote {md} (complete experiments only)", file=sys.stderr)
            except Exception as exc:  # the interrupt's exit code matters more than the report
                print(f"regbench run: could not write the leaderboard: {one_line_error(exc)}", file=sys.stderr)
        if is_rank_zero():
            print(f"regbench run: {stop}; the experiment in flight is marked interrupted (run the same command to resume)",
                  file=sys.stderr)
        return stop.exit_code
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"regbench run: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except DataError:
        raise  # one line from benchmark.cli
    except Exception as exc:
        if debug:
            raise
        print(f"regbench run: error: {one_line_error(exc)} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        restore()
    bad = {k: v for k, v in statuses.items() if v != "complete"}
    if bad and is_rank_zero():
        print(f"regbench run: {len(bad)} experiment(s) did not complete: {bad}", file=sys.stderr)
    return 1 if bad else 0
