"""LUMIR (Learn2Reg 2024): large-scale unsupervised brain MRI registration.

Layout::

    ROOT/LUMIR_dataset.json     {"training": [{"image": "./imagesTr/LUMIRMRI_0000_0000.nii.gz"}, ...],
                                 "validation": [{"fixed": "./imagesVal/…", "moving": "./imagesVal/…"}, ...]}
    ROOT/imagesTr/ …  ROOT/imagesVal/ …

Paths in the JSON are relative to ROOT. Images are 160×224×192, 1 mm, intensities 0…255,
scaled to ``[0, 1]`` (``normalize="range"``, ``intensity_range=(0, 255)``, clipped). They all
share one grid, so by default nothing else is done (``canonical=False``): exported fields
must lie on the images' own array grid for the official evaluation (a warning says so when
reorientation, resampling or cropping is switched on without labels).

* train: random ordered pairs of the ``training`` images (``train_pairs_per_epoch``);
* test: the ``validation`` pairs of the JSON, in order (their labels are private);
* val: the first ``val_pairs`` of them.

Labels and landmarks are used when the user supplies folders of them with the images' file
names (``labels_dir``, ``landmarks_dir``; a landmark file is a label volume whose ids are the
landmarks, scored by centroid distance, or a ``.csv`` of voxel indices). Dice then runs over
``label_ids`` (default: every non-zero id of the first test subject's labels — the 133 LUMIR
ids on the official labels). Without labels, batches have no ``fixed_seg``/``moving_seg``,
``label_ids`` is empty (Dice/HD95 are NaN; similarity and regularity metrics remain) and
``export_fields`` is True: the runner writes every test field in Learn2Reg format,
``disp_{fixed}_{moving}.nii.gz`` with the images' numbers as ids (``disp_3455_3456.nii.gz``),
for the official evaluation.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.core.io import DataError
from datamodules.base import CheckLine
from datamodules.check import DataCheck, check_pairs, check_subjects
from datamodules.real_base import RealPairDataModule, SubjectFiles, nifti_stem

__all__ = ["LUMIRDataModule", "read_lumir_json", "lumir_id"]

JSON_NAME = "LUMIR_dataset.json"


def lumir_id(path: str | Path) -> str:
    """Subject id of a LUMIR image, as the Learn2Reg evaluation names fields: the second
    ``_``-separated part of the file name (``LUMIRMRI_3455_0000.nii.gz`` → ``3455``, so the
    exported field of a pair is ``disp_3455_3456.nii.gz``); other names: the file name
    without extension and without a ``_0000`` channel suffix."""
    stem = nifti_stem(path)
    parts = stem.split("_")
    if len(parts) == 3 and parts[2] == "0000" and parts[1]:
        return parts[1]
    return stem[:-5] if stem.endswith("_0000") else stem


def read_lumir_json(root: str | Path) -> tuple[list[Path], list[tuple[Path, Path]], list[str]]:
    """``(training images, validation (fixed, moving) pairs, problems)`` of a LUMIR folder.

    Raises:
        DataError: missing or malformed JSON (no ``training`` list, entries without the keys).
            A missing ``validation`` key and files that do not exist are listed as problems.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "LUMIR folder not found", "check the path (the suite never downloads data)")
    jp = root / JSON_NAME
    if not jp.is_file():
        raise DataError(jp, "dataset JSON not found", f"point to the folder holding {JSON_NAME}")
    try:
        data = json.loads(jp.read_text())
    except ValueError as exc:
        raise DataError(jp, f"is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(jp, "must hold a JSON object with 'training' and 'validation'")
    problems: list[str] = []
    train_raw = data.get("training")
    if not isinstance(train_raw, list) or not train_raw:
        raise DataError(jp, "has no 'training' list", "expected {\"training\": [{\"image\": ...}, ...], \"validation\": [...]}")
    train = []
    for i, e in enumerate(train_raw):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str):
            raise DataError(jp, f"training[{i}] is not an object with an 'image' path")
        train.append((root / e["image"]).resolve())
    val_raw = data.get("validation")
    val: list[tuple[Path, Path]] = []
    if val_raw is None:
        problems.append(f"{jp}: has no 'validation' list (no test pairs)")
    elif not isinstance(val_raw, list):
        raise DataError(jp, "'validation' must be a list of {\"fixed\": ..., \"moving\": ...}")
    else:
        for i, e in enumerate(val_raw):
            if not isinstance(e, dict) or not isinstance(e.get("fixed"), str) or not isinstance(e.get("moving"), str):
                raise DataError(jp, f"validation[{i}] is not an object with 'fixed' and 'moving' paths")
            val.append(((root / e["fixed"]).resolve(), (root / e["moving"]).resolve()))
    for p in train + [q for pair in val for q in pair]:
        if not p.is_file():
            problems.append(f"{p}: listed in {JSON_NAME} but missing")
    return train, val, sorted(set(problems), key=problems.index)


class LUMIRDataModule(RealPairDataModule):
    """LUMIR pairs (see the module docstring).

    Args:
        root: folder holding ``LUMIR_dataset.json``.
        labels_dir: folder of label maps named like the images (optional).
        landmarks_dir: folder of landmark label volumes (or ``.csv``) named like the images (optional).
        val_pairs: validation pairs = the first this many JSON validation pairs.
        label_ids: Dice label list (default: from the labels, see the module docstring).
        export_fields: write every test field (default: when there are no labels).
        **kwargs: :class:`datamodules.real_base.RealPairDataModule` options (default
            ``normalize="range"``, ``intensity_range=(0, 255)``).
    """

    name = "lumir"

    def __init__(
        self,
        root: str,
        labels_dir: str | None = None,
        landmarks_dir: str | None = None,
        val_pairs: int | None = 4,
        label_ids: list[int] | None = None,
        export_fields: bool | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("normalize", "range")
        kwargs.setdefault("intensity_range", (0.0, 255.0))
        # Exported fields must lie on the images' own array grid (Learn2Reg evaluation):
        # no reorientation by default; all LUMIR images share one grid already.
        kwargs.setdefault("canonical", False)
        super().__init__(**kwargs)
        pp = self.preprocess_config
        if labels_dir is None and (pp.canonical or pp.spacing is not None or pp.shape is not None or pp.multiple_of is not None):
            warnings.warn("LUMIR: fields are exported on the preprocessed grid (canonical / spacing / shape / multiple_of "
                          "set); the official Learn2Reg evaluation expects the original 160×224×192 image grid",
                          UserWarning, stacklevel=2)
        self.root = Path(root)
        self.labels_dir = None if labels_dir is None else self._under_root(labels_dir)
        self.landmarks_dir = None if landmarks_dir is None else self._under_root(landmarks_dir)
        self.uses_labels = self.labels_dir is not None
        #: The runner exports every test field (Learn2Reg format) when True: no labels to score here.
        self.export_fields = self.labels_dir is None if export_fields is None else bool(export_fields)
        self.val_pairs = val_pairs
        self._label_ids = None if label_ids is None else [int(v) for v in label_ids]
        self._pairs: dict[str, list[tuple[int, int]]] = {}
        self.save_hyperparameters()

    def _under_root(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else self.root / q

    def _subject(self, image: Path) -> SubjectFiles:
        seg = lm = None
        if self.labels_dir is not None:
            seg = self.labels_dir / image.name
            if not seg.is_file():
                raise DataError(seg, f"label file of {image.name} missing", "labels must have the images' file names")
        if self.landmarks_dir is not None:
            for cand in (self.landmarks_dir / image.name, self.landmarks_dir / f"{nifti_stem(image)}.csv"):
                if cand.is_file():
                    lm = cand
                    break
            else:
                raise DataError(self.landmarks_dir / image.name, f"landmark file of {image.name} missing")
        return SubjectFiles(lumir_id(image), image, seg, lm)

    def check(self, resample_labels: bool = False, headers_only: bool = False) -> list[CheckLine]:
        """``regbench data check``: ``LUMIR_dataset.json`` (malformed entries, missing files),
        every listed image (labels and landmarks for the validation images when their folders
        are given) and the validation pairs (see :mod:`datamodules.check`)."""
        report = DataCheck(self.root)
        report.summary["task"] = self.task
        try:
            train, val, problems = read_lumir_json(self.root)
            report.problems.extend(problems)
            report.summary["training_images"] = len(train)
            report.summary["validation_pairs"] = len(val)
            subs = []
            for p in dict.fromkeys([*train, *(q for pr in val for q in pr)]):
                if not p.is_file():
                    continue
                in_val = any(p in pr for pr in val)
                try:
                    subs.append(self._subject(p) if in_val else SubjectFiles(p.name, p))
                except DataError as exc:
                    report.problems.append(str(exc))
                    subs.append(SubjectFiles(p.name, p))
            report.summary["subjects"] = len(subs)
            grid = check_subjects(subs, report, resample_labels, (), headers_only, self.loader.landmark_units,
                                  self.loader.preprocess.canonical)
            by_path = {s.image: s for s in subs}
            check_pairs(report, "test", [(by_path[f], by_path[m]) for f, m in val if f in by_path and m in by_path],
                        grid, self.preprocess_config.shape)
        except DataError as exc:
            report.problems.append(str(exc))
        return report.lines()

    def discover(self) -> dict[str, list[SubjectFiles]]:
        for d in (self.labels_dir, self.landmarks_dir):
            if d is not None and not d.is_dir():
                raise DataError(d, "folder not found")
        train, val, problems = read_lumir_json(self.root)
        if problems:
            raise DataError(self.root, f"{len(problems)} problem(s): " + "; ".join(problems[:5])
                            + (" …" if len(problems) > 5 else ""), "run `regbench data check --dataset lumir ROOT`")
        if not val:
            raise DataError(self.root / JSON_NAME, "has no validation pairs to test on")
        eval_imgs: list[Path] = []
        for f, m in val:
            for p in (f, m):
                if p not in eval_imgs:
                    eval_imgs.append(p)
        index = {p: i for i, p in enumerate(eval_imgs)}
        eval_subs = [self._subject(p) for p in eval_imgs]
        pairs = [(index[f], index[m]) for f, m in val]
        self._pairs = {"test": pairs, "val": pairs[: self.val_pairs] if self.val_pairs is not None else pairs}
        train_subs = [SubjectFiles(lumir_id(p), p) for p in train]
        if len(train_subs) < 2:
            raise DataError(self.root / JSON_NAME, f"lists {len(train_subs)} training image; need at least 2")
        return {"train": train_subs, "val": eval_subs, "test": eval_subs}

    def eval_pairs(self, split: str) -> list[tuple[int, int]]:
        self._ensure_discovered()
        return list(self._pairs[split])

    @property
    def label_ids(self) -> list[int]:
        """Dice labels: given ``label_ids``, else the ids of the first test subject's labels; ``[]`` without labels."""
        if self._label_ids is not None:
            return list(self._label_ids)
        if not self.uses_labels:
            return []
        self._ensure_discovered()
        first = self.subjects["test"][self._pairs["test"][0][0]]
        seg = self.loader.load(first, with_seg=True, with_landmarks=False)["seg"]
        self._label_ids = [int(v) for v in np.unique(np.asarray(seg)) if v != 0]
        return list(self._label_ids)
