"""`regbench data check`: read a dataset the way the data modules will and report on it.

``regbench data check --dataset {mindboggle,lumir,nifti} ROOT [options]`` prints a summary
(subjects per split, shapes, spacings, orientations, label ids found, pairs) and every
problem found, each naming its file; the exit code is 1 when there are problems, 0 otherwise.

Problems: unreadable or corrupt files, non-3D arrays, NaN/Inf, singular affines, missing
label files, empty label maps, labels on another grid than their image (unless
``--resample-labels``), malformed dataset JSON, pairs whose images end on different grids,
landmark CSVs whose points fall outside their image's grid in the declared units
(``--landmark-units voxel|mm``; the rule and message of ``regbench evaluate``,
:func:`benchmark.core.io.check_landmarks_on_grid`).

``--dataset spine`` checks a folder of CTs for :class:`datamodules.spine.SpineDRRDataModule`
(:func:`check_spine`): readable CTs and label maps, the vertebra labels each map would give
(all of a map's ids unless ``--vertebra-labels`` names them; a note when more than
:data:`datamodules.spine.MAX_AUTO_VERTEBRAE` would be used), landmarks per CT, and a note
when training and testing would share a CT.
Notes (reported, not problems): stray MindBoggle labels mapped to background, labels
resampled through the affines, mixed orientations or spacings (the preprocessing handles them).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from benchmark.core.io import DataError, load_landmarks, load_segmentation, load_volume, orientation_codes

__all__ = ["DataReport", "check_dataset", "add_cli_commands", "format_report"]


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


def _guarded(path: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
    from datamodules.real_base import guarded

    return guarded(path, fn, *args, **kwargs)


def _check_subjects(subjects: list[Any], report: DataReport, resample_labels: bool, stray: tuple[int, ...] = (),
                    headers_only: bool = False, landmark_units: str = "voxel") -> dict[str, tuple[int, ...]]:
    """Read every subject; fill shape/spacing/orientation/label statistics; return id → shape of the readable ones."""
    shapes: Counter = Counter()
    spacings: Counter = Counter()
    orients: Counter = Counter()
    labels: set[int] = set()
    grid: dict[str, tuple[int, ...]] = {}
    seen: set[str] = set()
    for s in subjects:
        key = str(s.image)
        if key in seen:
            continue
        seen.add(key)
        try:
            if headers_only:
                img = nib.load(str(s.image))
                shape, affine = tuple(int(v) for v in img.shape[:3]), np.asarray(img.affine)
            else:
                vol = _guarded(s.image, load_volume)
                shape, affine = vol.shape, vol.affine
        except DataError as exc:
            report.problems.append(str(exc))
            continue
        except Exception as exc:  # nibabel header errors in headers_only mode
            report.problems.append(f"{s.image}: cannot be read as NIfTI ({type(exc).__name__}: {exc})")
            continue
        grid[s.subject_id] = shape
        shapes[str(shape)] += 1
        spacings["×".join(f"{v:.3g}" for v in np.linalg.norm(affine[:3, :3], axis=0))] += 1
        orients[orientation_codes(affine)] += 1
        if s.seg is not None and not headers_only:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    seg = _guarded(s.seg, load_segmentation, reference=vol,
                                   on_grid_mismatch="resample" if resample_labels else "error")
                for w in caught:
                    report.notes.append(str(w.message))
                ids = {int(v) for v in np.unique(seg.data) if v != 0}
                bad = sorted(ids & set(stray))
                if bad:
                    report.notes.append(f"{s.seg}: stray labels {bad} present (mapped to background on load)")
                labels |= ids
            except DataError as exc:
                report.problems.append(str(exc))
        if s.landmarks is not None and (not headers_only or str(s.landmarks).lower().endswith(".csv")):
            try:
                if str(s.landmarks).lower().endswith(".csv"):
                    n = load_landmarks(s.landmarks, affine, shape, landmark_units, s.image).shape[0]
                else:
                    lm = _guarded(s.landmarks, load_volume, dtype=np.int64)
                    n = int(np.count_nonzero(np.unique(lm.data)))
                    if n == 0:
                        report.problems.append(f"{s.landmarks}: landmark volume holds no landmark ids")
                report.summary.setdefault("landmarks_per_subject", {})[s.subject_id] = n
            except DataError as exc:
                report.problems.append(str(exc))
    report.summary["shapes"] = dict(shapes)
    report.summary["spacings_mm"] = dict(spacings)
    report.summary["orientations"] = dict(orients)
    if len(orients) > 1:
        report.notes.append(f"{report.root}: mixed orientations {dict(orients)} (reoriented to RAS on load)")
    if len(spacings) > 1:
        report.notes.append(f"{report.root}: mixed spacings {dict(spacings)} (set `spacing` to resample)")
    if not headers_only:
        report.summary["label_ids_found"] = sorted(labels)
        report.summary["n_label_ids"] = len(labels)
    return grid


def _check_pairs(report: DataReport, name: str, pairs: list[tuple[Any, Any]], grid: dict[str, tuple[int, ...]],
                 preprocessed_shape: Any) -> None:
    report.summary.setdefault("pairs", {})[name] = len(pairs)
    if preprocessed_shape is not None:
        return
    for f, m in pairs:
        gf, gm = grid.get(f.subject_id), grid.get(m.subject_id)
        if gf is not None and gm is not None and gf != gm:
            report.problems.append(f"{m.image}: shape {gm} differs from its fixed image {f.image.name} {gf} "
                                   "(set a common `shape`/`spacing` in the data module)")


def check_dataset(dataset: str, root: str | Path, resample_labels: bool = False, headers_only: bool = False,
                  **options: Any) -> DataReport:
    """Check a dataset folder.

    Args:
        dataset: ``"mindboggle"``, ``"lumir"`` or ``"nifti"``.
        root: its folder.
        resample_labels: labels on another grid are a note (resampled) rather than a problem.
        headers_only: read NIfTI headers only (fast; no label statistics, no corrupt-data check).
        **options: the data module's own options (``space``, ``label_set``, ``labels_dir``,
            ``landmarks_dir``, ``pairs_csv``, ``label_suffix``, ``images``, ``shape``,
            ``landmark_units``; spine: ``vertebra_labels``, ``test_ids``).
    """
    root = Path(root)
    report = DataReport(dataset, str(root))
    shape = options.get("shape")
    landmark_units = options.get("landmark_units") or "voxel"
    if dataset == "spine":
        return check_spine(root, report, vertebra_labels=options.get("vertebra_labels"), test_ids=options.get("test_ids"))
    try:
        if dataset == "mindboggle":
            from datamodules.mindboggle import STRAY_LABELS, MindBoggle101DataModule, find_mindboggle_subjects

            space = options.get("space") or "mni152"
            label_set = options.get("label_set") or "dkt31"
            subs, problems = find_mindboggle_subjects(root, space, label_set)
            report.problems.extend(problems)
            report.summary["subjects"] = len(subs)
            report.summary["cohorts"] = dict(Counter(s.group for s in subs))
            grid = _check_subjects(subs, report, resample_labels, STRAY_LABELS, headers_only, landmark_units)
            dm = MindBoggle101DataModule(str(root), space=space, label_set=label_set, use_cache=False, num_workers=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    dm.check_inputs()
                except DataError as exc:
                    report.problems.append(str(exc))
                    return report
            for split in ("train", "val", "test"):
                report.summary.setdefault("split_subjects", {})[split] = len(dm.subjects[split])
                if split != "train":
                    sl = dm.subjects[split]
                    _check_pairs(report, split, [(sl[a], sl[b]) for a, b in dm.eval_pairs(split)], grid,
                                 shape or (dm.preprocess_config.shape if space == "native" else None))
            n = len(dm.subjects["train"])
            report.summary["pairs"]["train (random, of)"] = n * (n - 1)
        elif dataset == "lumir":
            from datamodules.lumir import LUMIRDataModule, read_lumir_json
            from datamodules.real_base import SubjectFiles

            train, val, problems = read_lumir_json(root)
            report.problems.extend(problems)
            report.summary["training_images"] = len(train)
            report.summary["validation_pairs"] = len(val)
            dm = LUMIRDataModule(str(root), labels_dir=options.get("labels_dir"), landmarks_dir=options.get("landmarks_dir"),
                                 use_cache=False, num_workers=0)
            subs = []
            for p in dict.fromkeys([*train, *(q for pr in val for q in pr)]):
                if not p.is_file():
                    continue
                in_val = any(p in pr for pr in val)
                try:
                    subs.append(dm._subject(p) if in_val else SubjectFiles(p.name, p))
                except DataError as exc:
                    report.problems.append(str(exc))
                    subs.append(SubjectFiles(p.name, p))
            report.summary["subjects"] = len(subs)
            grid = _check_subjects(subs, report, resample_labels, (), headers_only, landmark_units)
            by_path = {s.image: s for s in subs}
            _check_pairs(report, "test", [(by_path[f], by_path[m]) for f, m in val if f in by_path and m in by_path],
                         grid, shape)
        elif dataset == "nifti":
            from datamodules.nifti_pairs import NiftiPairsDataModule, find_nifti_subjects

            kw = {k: options[k] for k in ("images", "label_suffix", "labels_dir", "landmark_suffix", "landmarks_dir")
                  if options.get(k) is not None}
            subs = find_nifti_subjects(root, **kw)
            report.summary["subjects"] = len(subs)
            with_seg = [s for s in subs if s.seg is not None]
            report.summary["with_labels"] = len(with_seg)
            if with_seg and len(with_seg) != len(subs):
                for s in subs:
                    if s.seg is None:
                        report.problems.append(f"{s.image}: no label file (the other images have one)")
            grid = _check_subjects(subs, report, resample_labels, (), headers_only, landmark_units)
            dm = NiftiPairsDataModule(str(root), pairs_csv=options.get("pairs_csv"), use_cache=False, num_workers=0,
                                      landmark_units=landmark_units, **kw)
            try:
                dm.check_inputs()
            except DataError as exc:
                if str(exc) not in report.problems and not (with_seg and len(with_seg) != len(subs)):
                    report.problems.append(str(exc))
                return report
            for split in ("val", "test"):
                sl = dm.subjects[split]
                _check_pairs(report, split, [(sl[a], sl[b]) for a, b in dm.eval_pairs(split)], grid, shape)
        else:
            raise ValueError(f"unknown dataset kind {dataset!r}; use mindboggle, lumir, nifti or spine")
    except DataError as exc:
        report.problems.append(str(exc))
    return report


def check_spine(root: str | Path, report: DataReport | None = None, vertebra_labels: Any = None,
                test_ids: list[str] | None = None) -> DataReport:
    """Check a spine CT folder the way :class:`datamodules.spine.SpineDRRDataModule` reads it.

    Problems: no CTs, unreadable or non-3D CTs and label maps, empty label maps, named
    ``vertebra_labels`` absent from a map, unreadable centroid JSON, CTs without landmarks,
    unknown ``test_ids``. Notes: maps whose every id would become a landmark although they
    hold more than :data:`datamodules.spine.MAX_AUTO_VERTEBRAE` labels (a multi-organ map?),
    and a split that trains and tests on the same CT.
    """
    from datamodules.spine import SpineDRRDataModule, parse_vertebra_labels, vertebra_ids_of

    root = Path(root)
    report = report or DataReport("spine", str(root))
    try:
        wanted = parse_vertebra_labels(vertebra_labels)
        dm = SpineDRRDataModule(str(root), vertebra_labels=vertebra_labels, test_ids=test_ids)
        items = dm._folder_items()
    except (DataError, ValueError) as exc:
        report.problems.append(str(exc))
        return report
    report.summary["cts"] = len(items)
    per_ct: dict[str, int] = {}
    for cid, ct, lab, ctd in items:
        try:
            img = nib.load(str(ct))
            if len(img.shape) != 3:
                raise DataError(ct, f"expected a 3D CT, got shape {img.shape}")
            n = 0
            if lab is not None:
                lvol = _guarded(lab, load_volume, dtype=np.int64)
                found = [int(v) for v in np.unique(lvol.data) if v != 0]
                if not found:
                    raise DataError(lab, "the label map is empty (no vertebra labels)")
                ids, note = vertebra_ids_of(found, wanted, lab)
                if note:
                    report.notes.append(note)
                n = len(ids)
            elif ctd is not None:
                n = len(dm._read_ctd(ctd, np.asarray(img.affine)))
            if n == 0:
                report.problems.append(f"{ct}: no landmarks (mTRE needs them; add {cid}_vertebrae.nii.gz labels or "
                                       f"{cid}_ctd.json centroids)")
            per_ct[cid] = n
        except DataError as exc:
            report.problems.append(str(exc))
    report.summary["landmarks_per_ct"] = per_ct
    try:
        train, test = dm.split_ids([i[0] for i in items])
        report.summary["train_cts"], report.summary["test_cts"] = train, test
        shared = sorted(set(train) & set(test))
        if shared:
            report.notes.append(f"{root}: training and testing share CT(s) {shared}: test poses are rendered from a CT the "
                                "method trained on (add CTs, or list test_ids)")
    except DataError as exc:
        report.problems.append(str(exc))
    return report


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
    c.add_argument("--dataset", required=True, choices=["mindboggle", "lumir", "nifti", "spine"])
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
