"""MindBoggle-101 (Klein & Tourville 2012): manually labelled brains, DKT31 protocol.

Layout of the release, as unpacked by the user (the suite never downloads)::

    ROOT/                                  any depth ≤ 3 below ROOT works
      OASIS-TRT-20_volumes/                cohort folders (with or without "_volumes")
        OASIS-TRT-20-1/                    one folder per subject; id = folder name
          t1weighted_brain.nii.gz                   native space
          t1weighted_brain.MNI152.nii.gz            affinely registered to MNI152 (1 mm)
          labels.DKT31.manual.nii.gz                cortical labels, native
          labels.DKT31.manual.MNI152.nii.gz
          labels.DKT31.manual+aseg.nii.gz           cortical + FreeSurfer subcortical
          labels.DKT31.manual+aseg.MNI152.nii.gz
      NKI-RS-22_volumes/ …  NKI-TRT-20_volumes/ …  MMRR-21_volumes/ …  Extra-18_volumes/ …

The cohort of a subject is its id without the trailing ``-<number>``.

* ``space="mni152"`` (default) reads the ``.MNI152`` files (one common grid); ``"native"``
  reads the native files: reoriented to RAS, resampled to ``spacing`` (default 1 mm) and
  centre-cropped / padded to ``shape`` (default 192×224×192) so the arrays share one shape
  (the subjects are then *not* affinely aligned: that is the registration's job).
* ``label_set="dkt31"`` scores the 62 DKT31 cortical labels (left ``1000+n``, right
  ``2000+n``, ``n`` in {2, 3, 5…31, 34, 35}); ``"dkt31+aseg"`` reads the ``+aseg`` files and
  scores the 62 plus every other non-zero id found in the first test subject's labels.
* Stray ids 1001, 1032, 1033, 2001, 2032, 2033 (regions DKT31 merged away: banks of the STS,
  frontal and temporal poles, left over in some files) are mapped to background 0 on load.
* Splits by cohort: default train NKI-RS-22 + NKI-TRT-20, validation MMRR-21 (the first
  ``val_pairs`` ordered pairs), test OASIS-TRT-20 (all ordered pairs, or a seeded subset of
  ``test_pairs``). Subjects without a label file are left out with a warning (and reported by
  ``regbench data check``).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmark.core.io import DataError
from datamodules.base import CheckLine
from datamodules.check import DataCheck, check_pairs, check_subjects
from datamodules.real_base import RealPairDataModule, SubjectFiles, all_ordered_pairs, seeded_subset

__all__ = [
    "MindBoggle101DataModule",
    "find_mindboggle_subjects",
    "DKT31_CORTICAL",
    "STRAY_LABELS",
    "COHORTS",
    "mindboggle_files",
]

#: The 31 DKT31 cortical regions per hemisphere.
_DKT_N = [2, 3] + list(range(5, 32)) + [34, 35]
#: The 62 DKT31 cortical label ids (left 1000+n, right 2000+n).
DKT31_CORTICAL: list[int] = [1000 + n for n in _DKT_N] + [2000 + n for n in _DKT_N]
#: Ids some label files still carry; mapped to background.
STRAY_LABELS: tuple[int, ...] = (1001, 1032, 1033, 2001, 2032, 2033)
COHORTS = ("OASIS-TRT-20", "NKI-RS-22", "NKI-TRT-20", "MMRR-21", "Extra-18")
_SUBJECT_RE = re.compile(r"^(?P<cohort>.+)-(?P<num>\d+)$")


def mindboggle_files(space: str, label_set: str) -> tuple[str, str]:
    """``(image file name, label file name)`` of a subject folder for ``space`` and ``label_set``."""
    if space not in ("mni152", "native"):
        raise ValueError(f"space must be 'mni152' or 'native', got {space!r}")
    if label_set not in ("dkt31", "dkt31+aseg"):
        raise ValueError(f"label_set must be 'dkt31' or 'dkt31+aseg', got {label_set!r}")
    sfx = ".MNI152" if space == "mni152" else ""
    lab = "labels.DKT31.manual" + ("+aseg" if label_set == "dkt31+aseg" else "")
    return f"t1weighted_brain{sfx}.nii.gz", f"{lab}{sfx}.nii.gz"


def find_mindboggle_subjects(root: str | Path, space: str = "mni152", label_set: str = "dkt31",
                             max_depth: int = 3) -> tuple[list[SubjectFiles], list[str]]:
    """Every subject folder under ``root`` (≤ ``max_depth`` levels) holding the image of ``space``.

    Returns:
        ``(subjects sorted by cohort then number, problems)``: subjects whose label file is
        missing have ``seg=None``; problems name the file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "MindBoggle-101 folder not found", "check the path (the suite never downloads data)")
    img_name, lab_name = mindboggle_files(space, label_set)
    found: list[SubjectFiles] = []
    problems: list[str] = []
    frontier = [root]
    for _ in range(max_depth + 1):
        nxt = []
        for d in frontier:
            if (d / img_name).is_file():
                m = _SUBJECT_RE.match(d.name)
                cohort = m.group("cohort") if m else d.parent.name.removesuffix("_volumes")
                seg = d / lab_name
                if not seg.is_file():
                    problems.append(f"{seg}: label file missing")
                found.append(SubjectFiles(d.name, d / img_name, seg if seg.is_file() else None, None, cohort))
                continue
            try:
                nxt.extend(sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")))
            except OSError as exc:
                problems.append(f"{d}: cannot be listed ({exc})")
        frontier = nxt
    if not found:
        raise DataError(root, f"no MindBoggle subject folders (holding {img_name}) found",
                        "point to the folder holding the cohort folders, e.g. OASIS-TRT-20_volumes/")

    def order(s: SubjectFiles) -> tuple[str, int, str]:
        m = _SUBJECT_RE.match(s.subject_id)
        return (s.group, int(m.group("num")) if m else 0, s.subject_id)

    ids = [s.subject_id for s in found]
    for sid in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{root}: subject id {sid!r} found in more than one folder")
    return sorted(found, key=order), problems


class MindBoggle101DataModule(RealPairDataModule):
    """MindBoggle-101 pairs with DKT31 labels (see the module docstring).

    Args:
        root: folder of the release.
        space: ``"mni152"`` (default) or ``"native"``.
        label_set: ``"dkt31"`` (62 cortical labels) or ``"dkt31+aseg"``.
        train_cohorts, val_cohorts, test_cohorts: cohort names of each split.
        val_pairs: number of validation pairs (first ones); ``None`` = all.
        test_pairs: seeded subset of the test pairs; ``None`` = all ordered pairs.
        max_subjects: keep only the first ``n`` subjects of each split (small runs).
        **kwargs: :class:`datamodules.real_base.RealPairDataModule` options. In native space
            ``spacing`` defaults to 1 mm and ``shape`` to 192×224×192.
    """

    name = "mindboggle"

    def __init__(
        self,
        root: str,
        space: str = "mni152",
        label_set: str = "dkt31",
        train_cohorts: Sequence[str] = ("NKI-RS-22", "NKI-TRT-20"),
        val_cohorts: Sequence[str] = ("MMRR-21",),
        test_cohorts: Sequence[str] = ("OASIS-TRT-20",),
        val_pairs: int | None = 6,
        test_pairs: int | None = None,
        max_subjects: int | None = None,
        **kwargs: Any,
    ) -> None:
        mindboggle_files(space, label_set)
        if space == "native":
            kwargs.setdefault("spacing", 1.0)
            kwargs.setdefault("shape", (192, 224, 192))
        stray = {int(v): 0 for v in STRAY_LABELS}
        stray.update({int(k): int(v) for k, v in (kwargs.pop("label_map", None) or {}).items()})
        super().__init__(label_map=stray, **kwargs)
        self.root = Path(root)
        self.space, self.label_set = space, label_set
        self.cohorts = {"train": list(train_cohorts), "val": list(val_cohorts), "test": list(test_cohorts)}
        overlap = set(self.cohorts["train"]) & set(self.cohorts["test"])
        if overlap:
            raise ValueError(f"cohorts {sorted(overlap)} are in both the train and the test split")
        self.val_pairs, self.test_pairs = val_pairs, test_pairs
        if max_subjects is not None and (isinstance(max_subjects, bool) or int(max_subjects) != max_subjects
                                         or max_subjects < 1):
            # a slice [: -1] or [: 0] would silently drop subjects from every split
            raise ValueError(f"max_subjects must be an integer >= 1 or None, got {max_subjects!r}")
        self.max_subjects = max_subjects
        self._label_ids: list[int] | None = None
        self.save_hyperparameters()

    def check(self, resample_labels: bool = False, headers_only: bool = False) -> list[CheckLine]:
        """``regbench data check``: every subject folder of the release (problems for missing
        label files, unreadable or corrupt volumes, notes for stray labels), the cohort splits
        and their pairs (see :mod:`datamodules.check`)."""
        report = DataCheck(self.root)
        report.summary["task"] = self.task
        try:
            subs, problems = find_mindboggle_subjects(self.root, self.space, self.label_set)
            report.problems.extend(problems)
            report.summary["subjects"] = len(subs)
            report.summary["cohorts"] = dict(Counter(s.group for s in subs))
            grid = check_subjects(subs, report, resample_labels, STRAY_LABELS, headers_only, self.loader.landmark_units,
                                  self.loader.preprocess.canonical)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    self.check_inputs()
                except DataError as exc:
                    report.problems.append(str(exc))
                    return report.lines()
            for split in ("train", "val", "test"):
                report.summary.setdefault("split_subjects", {})[split] = len(self.subjects[split])
                if split != "train":
                    sl = self.subjects[split]
                    check_pairs(report, split, [(sl[a], sl[b]) for a, b in self.eval_pairs(split)], grid,
                                self.preprocess_config.shape)
            n = len(self.subjects["train"])
            report.summary["pairs"]["train (random, of)"] = n * (n - 1)
        except DataError as exc:
            report.problems.append(str(exc))
        return report.lines()

    def discover(self) -> dict[str, list[SubjectFiles]]:
        subs, problems = find_mindboggle_subjects(self.root, self.space, self.label_set)
        for p in problems:
            warnings.warn(f"MindBoggle-101: {p}; subject left out", stacklevel=2)
        out: dict[str, list[SubjectFiles]] = {}
        for split, cohorts in self.cohorts.items():
            chosen = [s for s in subs if s.group in cohorts and s.seg is not None]
            if self.max_subjects is not None:
                chosen = chosen[: int(self.max_subjects)]
            out[split] = chosen
        if len(out["test"]) < 2:
            raise DataError(self.root, f"test cohorts {self.cohorts['test']} have {len(out['test'])} labelled subjects; "
                            "need at least 2", "check the folder or the test_cohorts option")
        if len(out["train"]) < 2:
            raise DataError(self.root, f"train cohorts {self.cohorts['train']} have {len(out['train'])} subjects; need at least 2")
        return out

    def eval_pairs(self, split: str) -> list[tuple[int, int]]:
        self._ensure_discovered()
        pairs = all_ordered_pairs(len(self.subjects[split]))
        if split == "val":
            return pairs[: self.val_pairs] if self.val_pairs is not None else pairs
        return seeded_subset(pairs, self.test_pairs, self.seed, 2)

    @property
    def label_ids(self) -> list[int]:
        """62 DKT31 cortical ids; with ``+aseg`` also every other id of the first test subject."""
        if self.label_set == "dkt31":
            return list(DKT31_CORTICAL)
        if self._label_ids is None:
            self._ensure_discovered()
            seg = self.loader.load(self.subjects["test"][0], with_seg=True, with_landmarks=False)["seg"]
            found = {int(v) for v in np.unique(np.asarray(seg)) if v != 0}
            self._label_ids = sorted(set(DKT31_CORTICAL) | found)
        return list(self._label_ids)
