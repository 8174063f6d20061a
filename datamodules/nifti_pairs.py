"""Any folder of NIfTI images (optional labels and landmarks) as a registration dataset.

Layout (everything relative to ``root`` unless absolute)::

    root/                       images: every ``*.nii`` / ``*.nii.gz`` in ``images`` (default root)
      image_A.nii.gz            subject id = file name without the extension ("image_A")
      image_A_seg.nii.gz        its labels, by ``label_suffix`` ("_seg"), in the same folder,
      image_A_landmarks.csv     its landmarks, by ``landmark_suffix`` (x,y,z voxel rows, or a
      ...                       NIfTI landmark label volume named ``<id><suffix>.nii.gz``)
    labels/ image_A.nii.gz      ... or labels with the images' names in ``labels_dir``
    landmarks/ image_A.csv      ... and landmarks ``<id>.csv`` in ``landmarks_dir``
    pairs.csv                   optional: ``fixed,moving[,split]`` rows of subject ids

Pairs: with ``pairs_csv``, its rows (a ``split`` column of ``train``/``val``/``test`` assigns
them; without it every row is a test pair and the validation pairs are the first
``val_pairs`` of them); without it, every ordered pair of distinct subjects (the "all pairs"
rule). Training draws random ordered pairs of the training subjects: the subjects of the
``train`` rows, or every subject when there are none (unsupervised training on the images to
be registered, the usual setting for a handful of scans).

Labels are used when every subject has a label file; some with and some without is an error
naming the ones missing. Labels that lie on another grid than their image (another shape or
affine, e.g. ``image_A_seg.nii.gz`` of the real OASIS pair) are resampled through the
affines, nearest neighbour, with a warning (``on_label_grid_mismatch="resample"``, default)
or refused (``"error"``); never paired voxel for voxel.

Landmark CSVs hold voxel indices of their image (``landmark_units="voxel"``, default) or
world RAS mm (``"mm"``); ``check_inputs`` (run by ``regbench run`` before any work) refuses a
CSV whose points fall outside its image's grid, with the message of ``regbench evaluate``.
With ``export_fields=True`` the runner writes every test field,
``fields/disp_{fixed}_{moving}.nii.gz`` (Learn2Reg layout, voxels of the *preprocessed* fixed
grid, whose affine is in the header) and ``disp_{fixed}_{moving}.json`` beside it (the
original files and grids, :meth:`RealPairDataModule.field_record`);
``regbench evaluate --resample-field`` scores it against the original files::

    regbench evaluate --disp fields/disp_a_b.nii.gz --fixed-image a.nii.gz --moving-image b.nii.gz \
        --fixed-seg a_seg.nii.gz --moving-seg b_seg.nii.gz --resample-field
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.core.io import DataError, open_text_table
from datamodules.base import CheckLine
from datamodules.check import DataCheck, check_pairs, check_subjects
from datamodules.real_base import RealPairDataModule, SubjectFiles, all_ordered_pairs, is_nifti, nifti_stem, seeded_subset

__all__ = ["NiftiPairsDataModule", "find_nifti_subjects", "read_pairs_csv"]


def _resolve(root: Path, sub: str | None) -> Path | None:
    if sub is None:
        return None
    p = Path(sub)
    return p if p.is_absolute() else root / p


def _find_with_stem(folder: Path, stem: str, exts: tuple[str, ...]) -> Path | None:
    for ext in exts:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def find_nifti_subjects(
    root: str | Path,
    images: str | None = None,
    label_suffix: str | None = "_seg",
    labels_dir: str | None = None,
    landmark_suffix: str | None = "_landmarks",
    landmarks_dir: str | None = None,
) -> list[SubjectFiles]:
    """Subjects of a NIfTI folder (see the module docstring), sorted by id; reads no volume.

    Raises:
        DataError: missing folders, no images, duplicate subject ids.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found", "check the path (the suite never downloads data)")
    img_dir = _resolve(root, images) or root
    if not img_dir.is_dir():
        raise DataError(img_dir, "images folder not found")
    lab_dir = _resolve(root, labels_dir)
    if lab_dir is not None and not lab_dir.is_dir():
        raise DataError(lab_dir, "labels folder not found")
    lm_dir = _resolve(root, landmarks_dir)
    if lm_dir is not None and not lm_dir.is_dir():
        raise DataError(lm_dir, "landmarks folder not found")
    subjects: dict[str, SubjectFiles] = {}
    for p in sorted(img_dir.iterdir()):
        if not p.is_file() or not is_nifti(p) or p.name.startswith("."):
            continue
        stem = nifti_stem(p)
        if label_suffix and stem.endswith(label_suffix):
            continue
        if landmark_suffix and stem.endswith(landmark_suffix):
            continue
        if stem in subjects:
            raise DataError(p, f"subject id {stem!r} appears twice ({subjects[stem].image.name} and {p.name})",
                            "keep one of .nii / .nii.gz")
        if lab_dir is not None:
            seg = _find_with_stem(lab_dir, stem, (".nii.gz", ".nii"))
        elif label_suffix:
            seg = _find_with_stem(img_dir, stem + label_suffix, (".nii.gz", ".nii"))
        else:
            seg = None
        if lm_dir is not None:
            lm = _find_with_stem(lm_dir, stem, (".csv", ".nii.gz", ".nii"))
        elif landmark_suffix:
            lm = _find_with_stem(img_dir, stem + landmark_suffix, (".csv", ".nii.gz", ".nii"))
        else:
            lm = None
        subjects[stem] = SubjectFiles(stem, p, seg, lm)
    if not subjects:
        raise DataError(img_dir, "holds no NIfTI images (*.nii, *.nii.gz)")
    return [subjects[k] for k in sorted(subjects)]


def read_pairs_csv(path: str | Path, known_ids: set[str]) -> list[tuple[str, str, str]]:
    """Rows ``(fixed_id, moving_id, split)`` of a pairs CSV (header ``fixed,moving[,split]``).

    Raises:
        DataError: missing file or columns, unknown subject ids, a subject paired with itself,
            an unknown split name.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "pairs CSV not found")
    with open_text_table(p) as table:
        reader = csv.DictReader(table)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "fixed" not in cols or "moving" not in cols:
            raise DataError(p, f"needs a header with columns 'fixed' and 'moving' (optionally 'split'); got {cols}")
        rows = []
        for i, row in enumerate(reader, start=2):
            r = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
            f, m, split = r["fixed"], r["moving"], r.get("split") or "test"
            for sid in (f, m):
                if sid not in known_ids:
                    raise DataError(p, f"line {i}: subject {sid!r} has no image in the folder")
            if f == m:
                raise DataError(p, f"line {i}: pairs {f!r} with itself")
            if split not in ("train", "val", "test"):
                raise DataError(p, f"line {i}: split {split!r} is not one of train, val, test")
            rows.append((f, m, split))
    if not rows:
        raise DataError(p, "holds no pairs")
    return rows


class NiftiPairsDataModule(RealPairDataModule):
    """Pairs from any folder of NIfTI images (see the module docstring).

    Args:
        root: the folder.
        images: sub-folder of the images (default: ``root``).
        label_suffix: label file = ``<id><suffix>.nii[.gz]`` next to the image (``None``: none).
        labels_dir: folder of label files named like the images (overrides ``label_suffix``).
        landmark_suffix: landmark file ``<id><suffix>.csv`` (or ``.nii.gz``) next to the image.
        landmarks_dir: folder of ``<id>.csv`` (or ``.nii.gz``) landmark files.
        pairs_csv: ``fixed,moving[,split]`` CSV (relative to ``root`` or absolute); ``None`` = all pairs.
        val_pairs: number of validation pairs (the first ones of the test pairs when the CSV has
            no ``val`` rows); ``None`` = all of them.
        test_pairs: seeded subset size of the test pairs (``None`` = all).
        label_ids: ids scored by Dice (default: every non-zero id in the first test subject's labels).
        **kwargs: :class:`datamodules.real_base.RealPairDataModule` (preprocessing, cache, loaders).
    """

    name = "nifti_pairs"

    def __init__(
        self,
        root: str,
        images: str | None = None,
        label_suffix: str | None = "_seg",
        labels_dir: str | None = None,
        landmark_suffix: str | None = "_landmarks",
        landmarks_dir: str | None = None,
        pairs_csv: str | None = None,
        val_pairs: int | None = 2,
        test_pairs: int | None = None,
        label_ids: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.images, self.label_suffix, self.labels_dir = images, label_suffix, labels_dir
        self.landmark_suffix, self.landmarks_dir = landmark_suffix, landmarks_dir
        self.pairs_csv = pairs_csv
        self.val_pairs, self.test_pairs = val_pairs, test_pairs
        self._label_ids = None if label_ids is None else [int(v) for v in label_ids]
        self._pairs: dict[str, list[tuple[int, int]]] = {}
        self.save_hyperparameters()

    def check(self, resample_labels: bool = False, headers_only: bool = False) -> list[CheckLine]:
        """``regbench data check``: every image of the folder (a missing label file where the
        others have one is a problem), and the validation and test pairs (see
        :mod:`datamodules.check`)."""
        report = DataCheck(self.root)
        report.summary["task"] = self.task
        try:
            subs = find_nifti_subjects(self.root, self.images, self.label_suffix, self.labels_dir,
                                       self.landmark_suffix, self.landmarks_dir)
            report.summary["subjects"] = len(subs)
            with_seg = [s for s in subs if s.seg is not None]
            report.summary["with_labels"] = len(with_seg)
            if with_seg and len(with_seg) != len(subs):
                for s in subs:
                    if s.seg is None:
                        report.problems.append(f"{s.image}: no label file (the other images have one)")
            grid = check_subjects(subs, report, resample_labels, (), headers_only, self.loader.landmark_units,
                                  self.loader.preprocess.canonical)
            try:
                self.check_inputs()
            except DataError as exc:
                if str(exc) not in report.problems and not (with_seg and len(with_seg) != len(subs)):
                    report.problems.append(str(exc))
                return report.lines()
            for split in ("val", "test"):
                sl = self.subjects[split]
                check_pairs(report, split, [(sl[a], sl[b]) for a, b in self.eval_pairs(split)], grid,
                            self.preprocess_config.shape)
        except DataError as exc:
            report.problems.append(str(exc))
        return report.lines()

    def discover(self) -> dict[str, list[SubjectFiles]]:
        subs = find_nifti_subjects(self.root, self.images, self.label_suffix, self.labels_dir,
                                   self.landmark_suffix, self.landmarks_dir)
        with_seg = [s for s in subs if s.seg is not None]
        if with_seg and len(with_seg) != len(subs):
            missing = [s.image.name for s in subs if s.seg is None]
            raise DataError(self.root, f"label files missing for {len(missing)} of {len(subs)} images: {missing}",
                            "give every image its labels, or none")
        self.uses_labels = bool(with_seg)
        if len(subs) < 2:
            raise DataError(self.root, f"found {len(subs)} image; pairs need at least 2")
        index = {s.subject_id: i for i, s in enumerate(subs)}
        if self.pairs_csv is not None:
            rows = read_pairs_csv(_resolve(self.root, self.pairs_csv), set(index))
            by = {k: [(index[f], index[m]) for f, m, sp in rows if sp == k] for k in ("train", "val", "test")}
            if not by["test"]:
                raise DataError(_resolve(self.root, self.pairs_csv), "has no test pairs")
            train_idx = sorted({i for p in by["train"] for i in p}) or list(range(len(subs)))
            test = by["test"]
            val = by["val"] or test
        else:
            train_idx = list(range(len(subs)))
            test = all_ordered_pairs(len(subs))
            val = test
        test = seeded_subset(test, self.test_pairs, self.seed, 2)
        val = val[: self.val_pairs] if self.val_pairs is not None else val
        self._pairs = {"val": val, "test": test}
        # Splits share one subject list so that pair indices stay valid.
        return {"train": [subs[i] for i in train_idx], "val": subs, "test": subs}

    def eval_pairs(self, split: str) -> list[tuple[int, int]]:
        self._ensure_discovered()
        return list(self._pairs[split])

    @property
    def label_ids(self) -> list[int]:
        """Ids scored by Dice: ``label_ids`` if given, else the non-zero ids of the first test
        subject's (preprocessed) labels; ``[]`` without labels."""
        if self._label_ids is not None:
            return list(self._label_ids)
        self._ensure_discovered()
        if not self.uses_labels:
            return []
        first = self.subjects["test"][self._pairs["test"][0][0]]
        seg = self.loader.load(first, with_seg=True, with_landmarks=False)["seg"]
        ids = np.unique(np.asarray(seg))
        self._label_ids = [int(v) for v in ids if v != 0]
        return list(self._label_ids)
