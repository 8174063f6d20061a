"""`regbench data check`: read a dataset the way its data module will and report on it.

``regbench data check --dataset NAME ROOT [options]`` prints a summary (subjects per split,
shapes, spacings, orientations, label ids found, pairs) and every problem found, each naming
its file; the exit code is 1 when there are problems, 0 otherwise.

It works for any data module: ``NAME`` is a short name of :data:`DATASETS` (``mindboggle``,
``lumir``, ``nifti``, ``spine``) or the class path of any data module implementing
:class:`datamodules.base.RegistrationData`. The module is built from ``ROOT`` and the
options it accepts, and its one ``check()`` method does the reading (a list of
:class:`datamodules.base.CheckLine`; the shared parts are in :mod:`datamodules.check`).

Problems: unreadable or corrupt files, non-3D arrays, NaN/Inf, singular affines, missing
label files, empty label maps, labels on another grid than their image (unless
``--resample-labels``), malformed dataset JSON, pairs whose images end on different grids,
landmark CSVs whose points fall outside their image's grid in the declared units
(``--landmark-units voxel|mm``; the rule and message of ``regbench evaluate``,
:func:`benchmark.core.io.check_landmarks_on_grid`).

``--dataset spine`` checks a folder of CTs for :class:`datamodules.spine.SpineDRRDataModule`:
readable CTs and label maps, the vertebra labels each map would give (all of a map's ids
unless ``--vertebra-labels`` names them; a note when more than
:data:`datamodules.spine.MAX_AUTO_VERTEBRAE` would be used), landmarks per CT, and a note
when training and testing would share a CT.
Notes (reported, not problems): stray MindBoggle labels mapped to background, labels
resampled through the affines, mixed orientations or spacings (the preprocessing handles them).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from benchmark.core.classpath import ClassPathError, import_object
from benchmark.core.io import DataError

__all__ = ["DATASETS", "DataReport", "check_dataset", "add_cli_commands", "format_report"]

#: Short names of the suite's data modules for ``--dataset`` (any class path works too).
DATASETS: dict[str, str] = {
    "mindboggle": "datamodules.mindboggle.MindBoggle101DataModule",
    "lumir": "datamodules.lumir.LUMIRDataModule",
    "nifti": "datamodules.nifti_pairs.NiftiPairsDataModule",
    "spine": "datamodules.spine.SpineDRRDataModule",
}
#: Options set for a check when the module accepts them: no cache writes, no workers.
_CHECK_DEFAULTS = {"use_cache": False, "num_workers": 0}


@dataclass
class DataReport:
    """Outcome of a check: ``summary`` (JSON-able), ``problems`` and ``notes`` (one line each, file first)."""

    dataset: str
    root: str
    summary: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, lines: Iterable[Any]) -> "DataReport":
        """Take a data module's :class:`datamodules.base.CheckLine` s."""
        for ln in lines:
            if ln.kind == "summary":
                self.summary[ln.text] = ln.value
            elif ln.kind == "note":
                self.notes.append(ln.text)
            else:
                self.problems.append(ln.text)
        return self


def _accepted(cls: type) -> set[str] | None:
    """Keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the bases (None: any)."""
    names: set[str] = set()
    for k in cls.__mro__:
        init = vars(k).get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None


def data_module_class(dataset: str) -> type:
    """The data module class of a short name (:data:`DATASETS`) or a class path."""
    path = DATASETS.get(dataset, dataset)
    if "." not in path:
        raise DataError(None, f"--dataset {dataset!r}: unknown dataset kind",
                        f"use {', '.join(DATASETS)} or a data module's class path")
    try:
        return import_object(path)
    except ClassPathError as exc:
        raise DataError(None, f"--dataset {dataset!r}: {exc}") from None


def check_dataset(dataset: str, root: str | Path, resample_labels: bool = False, headers_only: bool = False,
                  **options: Any) -> DataReport:
    """Check a dataset folder with its data module's ``check()``.

    Args:
        dataset: a short name (``"mindboggle"``, ``"lumir"``, ``"nifti"``, ``"spine"``) or
            the class path of a data module.
        root: its folder.
        resample_labels: labels on another grid are a note (resampled) rather than a problem.
        headers_only: read NIfTI headers only (fast; no label statistics, no corrupt-data check).
        **options: the data module's own options (``space``, ``label_set``, ``labels_dir``,
            ``landmarks_dir``, ``pairs_csv``, ``label_suffix``, ``images``, ``shape``,
            ``landmark_units``; spine: ``vertebra_labels``, ``test_ids``); those the module
            does not accept and those left ``None`` are not passed.
    """
    from datamodules.base import protocol_problems

    root = Path(root)
    report = DataReport(dataset, str(root))
    cls = data_module_class(dataset)
    accepted = _accepted(cls)
    kw = {k: v for k, v in {**_CHECK_DEFAULTS, **options}.items()
          if v is not None and (accepted is None or k in accepted)}
    try:
        dm = cls(str(root), **kw)
    except (DataError, ValueError) as exc:
        report.problems.append(str(exc))
        return report
    bad = protocol_problems(dm)
    if bad:
        raise TypeError(f"--dataset {dataset!r}: " + "; ".join(bad))
    return report.add(dm.check(resample_labels=resample_labels, headers_only=headers_only))


def format_report(r: DataReport) -> str:
    """Human-readable text of a report."""
    lines = [f"regbench data check: {r.dataset} at {r.root}"]
    for k, v in r.summary.items():
        if k == "label_ids_found" and isinstance(v, list) and len(v) > 40:
            v = f"{v[:20]} … {v[-5:]}"
        lines.append(f"  {k}: {v}")
    if r.notes:
        lines.append(f"notes ({len(r.notes)}):")
        lines.extend(f"  - {n}" for n in r.notes)
    lines.append(f"problems ({len(r.problems)}):" if r.problems else "no problems found")
    lines.extend(f"  - {p}" for p in r.problems)
    return "\n".join(lines)


def _cmd_check(args: argparse.Namespace) -> int:
    opts = {k: getattr(args, k) for k in ("space", "label_set", "labels_dir", "landmarks_dir", "pairs_csv",
                                          "label_suffix", "images", "landmark_units", "vertebra_labels", "test_ids")}
    rep = check_dataset(args.dataset, args.root, resample_labels=args.resample_labels,
                        headers_only=args.headers_only, **opts)
    print(format_report(rep))
    if args.json:
        from benchmark.core.io import atomic_write_json

        atomic_write_json(args.json, {"dataset": rep.dataset, "root": rep.root, "summary": rep.summary,
                                      "problems": rep.problems, "notes": rep.notes})
    return 0 if rep.ok else 1


def add_cli_commands(sub: Any) -> None:
    """Register ``regbench data check`` on the CLI's sub-parsers."""
    d = sub.add_parser("data", help="dataset tools (check a dataset folder)")
    dsub = d.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="summary and every problem of a dataset folder (exit 1 on problems)")
    c.add_argument("root", help="dataset folder")
    c.add_argument("--dataset", required=True, metavar="NAME",
                   help=f"{', '.join(DATASETS)}, or the class path of any data module (its check() method reads the data)")
    c.add_argument("--space", choices=["mni152", "native"], default=None, help="mindboggle: which files (default mni152)")
    c.add_argument("--label-set", choices=["dkt31", "dkt31+aseg"], default=None, help="mindboggle label files")
    c.add_argument("--labels-dir", default=None, help="lumir / nifti: folder of label maps named like the images")
    c.add_argument("--landmarks-dir", default=None, help="lumir / nifti: folder of landmark files")
    c.add_argument("--pairs-csv", default=None, help="nifti: fixed,moving[,split] CSV")
    c.add_argument("--label-suffix", default=None, help="nifti: label file = <id><suffix>.nii.gz (default _seg)")
    c.add_argument("--images", default=None, help="nifti: sub-folder of the images")
    c.add_argument("--landmark-units", choices=["voxel", "mm"], default="voxel",
                   help="landmark CSV rows are voxel indices of their image (default) or world mm")
    c.add_argument("--vertebra-labels", type=lambda t: [int(v) for v in t.split(",") if v.strip()], default=None,
                   help="spine: comma-separated label ids that are vertebrae (default: every id of each map)")
    c.add_argument("--test-ids", type=lambda t: [v.strip() for v in t.split(",") if v.strip()], default=None,
                   help="spine: comma-separated CT ids used for testing")
    c.add_argument("--resample-labels", action="store_true",
                   help="labels on another grid than their image are resampled (a note), not a problem")
    c.add_argument("--headers-only", action="store_true", help="read headers only (fast, fewer checks)")
    c.add_argument("--json", default=None, help="also write the report as JSON here")
    c.set_defaults(func=_cmd_check)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m benchmark.datacheck check ...``)."""
    p = argparse.ArgumentParser(prog="regbench")
    sub = p.add_subparsers(dest="command", required=True)
    add_cli_commands(sub)
    args = p.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
