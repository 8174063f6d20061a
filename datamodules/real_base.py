"""What the real-data modules (MindBoggle-101, LUMIR, NIfTI folders) share.

* :class:`SubjectFiles` — one subject's files (image, optional labels, optional landmarks).
* :class:`SubjectLoader` — reads a subject, checks it (:mod:`benchmark.core.io`: every problem is
  a :class:`~benchmark.core.io.DataError` naming the file), puts labels that lie on another grid
  than their image onto the image's grid through the affines (nearest neighbour, with a
  warning) or refuses them (``on_label_grid_mismatch``), maps label ids (e.g. stray ids to
  background), runs :func:`datamodules.preprocess.preprocess_subject` and caches the result
  (:class:`datamodules.cache.ArrayCache`).
* :class:`PairListDataset` (a fixed list of pairs) and :class:`AllPairsDataset` (every
  ordered pair of a subject list, indexed lazily, for random training pairs).
* :class:`RealPairDataModule` — splits, loaders (workers, pinned memory, DDP shards of random
  training pairs, exact evaluation splits), ``check_inputs``.

Landmarks: a ``.csv`` (one ``x,y,z`` row per point, voxel indices of the subject's image, or
world mm with ``landmark_units="mm"``; points correspond by row; every point must fall inside
its image's grid, :func:`benchmark.core.io.check_landmarks_on_grid`, checked by ``check_inputs``
before a run starts) or a NIfTI label volume (LUMIR style: the landmark of id ``k`` is
the centroid of the voxels labelled ``k``; points correspond by id). Samples of a pair carry
the points both subjects have, in id order.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmark.core import metrics
from benchmark.core.io import DataError, Volume, load_landmarks, load_segmentation, load_volume, orientation_codes
from datamodules.base import PairDataModule, RandomPairSampler
from datamodules.batch import collate_pairs
from datamodules.cache import ArrayCache
from datamodules.preprocess import PreprocessConfig, preprocess_subject

__all__ = [
    "SubjectFiles",
    "guarded",
    "SubjectLoader",
    "PairListDataset",
    "AllPairsDataset",
    "RealPairDataModule",
    "nifti_stem",
    "is_nifti",
    "landmark_centroids",
]


def is_nifti(path: str | os.PathLike) -> bool:
    """``.nii`` or ``.nii.gz``."""
    n = str(path).lower()
    return n.endswith(".nii") or n.endswith(".nii.gz")


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    n = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if n.lower().endswith(ext):
            return n[: -len(ext)]
    return n


@dataclass(frozen=True)
class SubjectFiles:
    """One subject's files.

    Attributes:
        subject_id: id used in case ids (``"{fixed_id}_{moving_id}"``).
        image: image file.
        seg: label map (any grid; see ``on_label_grid_mismatch``) or ``None``.
        landmarks: ``.csv`` of voxel indices or a NIfTI landmark label volume, or ``None``.
        group: free grouping tag (cohort, split).
    """

    subject_id: str
    image: Path
    seg: Path | None = None
    landmarks: Path | None = None
    group: str = ""


def landmark_centroids(volume: Volume, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Centroids ``(K, 3)`` (voxel indices, float64) of the non-zero ids of a landmark label
    volume, and the ids ``(K,)`` (sorted; or the given ``ids``, NaN rows where absent)."""
    data = np.asarray(volume.data)
    found = np.unique(data)
    found = found[found != 0].astype(np.int64)
    use = found if ids is None else np.asarray(list(ids), dtype=np.int64)
    if use.size == 0:
        return np.zeros((0, 3)), use
    return metrics.label_centroids(data, use.tolist()), use


class SubjectLoader:
    """Read, check, preprocess and cache subjects.

    Args:
        preprocess: the preprocessing settings.
        cache: where to cache the results, or ``None`` (decode every time).
        on_label_grid_mismatch: ``"resample"`` (labels on another grid than their image are
            resampled through the affines, nearest neighbour, with a warning) or ``"error"``.
        label_map: label id → new id applied after reading (e.g. stray ids → 0).
        landmark_units: ``"voxel"`` (CSV rows are voxel indices of the image) or ``"mm"``
            (world RAS mm, taken through the image's inverse affine).
    """

    def __init__(
        self,
        preprocess: PreprocessConfig,
        cache: ArrayCache | None = None,
        on_label_grid_mismatch: str = "resample",
        label_map: Mapping[int, int] | None = None,
        landmark_units: str = "voxel",
    ) -> None:
        if landmark_units not in ("voxel", "mm"):
            raise ValueError(f"landmark_units must be 'voxel' or 'mm', got {landmark_units!r}")
        if on_label_grid_mismatch not in ("resample", "error"):
            raise ValueError(f"on_label_grid_mismatch must be 'resample' or 'error', got {on_label_grid_mismatch!r}")
        self.preprocess = preprocess
        self.cache = cache
        self.on_label_grid_mismatch = on_label_grid_mismatch
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self.landmark_units = landmark_units
        self._warned: set[str] = set()

    def settings(self, with_seg: bool, with_landmarks: bool) -> dict[str, Any]:
        """What the cached arrays depend on besides the files' contents."""
        return {
            "preprocess": self.preprocess.as_dict(),
            "labels": with_seg,
            "landmarks": with_landmarks,
            "on_label_grid_mismatch": self.on_label_grid_mismatch,
            "label_map": sorted(self.label_map.items()),
            "landmark_units": self.landmark_units,
        }

    def load(self, s: SubjectFiles, with_seg: bool = True, with_landmarks: bool = True) -> dict[str, np.ndarray]:
        """The preprocessed subject.

        Returns:
            ``image (X, Y, Z)`` float32, ``affine (4, 4)`` float64 and, when asked for and
            present, ``seg (X, Y, Z)`` int64, ``landmarks (K, 3)`` float64 output voxel indices
            with ``landmark_ids (K,)`` int64.
        """
        seg = s.seg if with_seg else None
        lms = s.landmarks if with_landmarks else None
        if with_seg and s.seg is None:
            raise DataError(s.image, f"subject {s.subject_id} has no label file", "supply its labels or run without labels")
        compute = functools.partial(self._compute, s, seg, lms)
        if self.cache is None:
            out = compute()
        else:
            files = [s.image, seg, lms]
            for f in files:
                if f is not None and not Path(f).is_file():
                    raise DataError(f, "file not found", "check the dataset folder")
            out = self.cache.get_or_compute(files, self.settings(seg is not None, lms is not None), compute)
        notes = out.pop("notes", None)
        if notes is not None:
            # Problems fixed on load (labels resampled onto the image grid) are stored with the
            # cached arrays and reported once per process, warm cache or cold.
            for msg in np.asarray(notes).tolist():
                if msg not in self._warned:
                    self._warned.add(msg)
                    warnings.warn(msg, UserWarning, stacklevel=2)
        return out

    def _compute(self, s: SubjectFiles, seg_path: Path | None, lm_path: Path | None) -> dict[str, np.ndarray]:
        img = guarded(s.image, load_volume)
        seg_arr = None
        notes: list[str] = []
        if seg_path is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                seg = guarded(seg_path, load_segmentation, reference=img, on_grid_mismatch=self.on_label_grid_mismatch)
            notes = [str(w.message) for w in caught]
            seg_arr = seg.data
            if self.label_map:
                seg_arr = _map_labels(seg_arr, self.label_map)
        points = ids = None
        if lm_path is not None:
            if is_nifti(lm_path):
                lm_vol = guarded(lm_path, load_volume, dtype=np.int64)
                if lm_vol.shape != img.shape or not np.allclose(lm_vol.affine, img.affine, atol=1e-3):
                    # Centroids are world points: carry them onto the image's voxel grid.
                    cents, ids = landmark_centroids(lm_vol)
                    world = cents @ lm_vol.affine[:3, :3].T + lm_vol.affine[:3, 3]
                    inv = np.linalg.inv(img.affine)
                    points = world @ inv[:3, :3].T + inv[:3, 3]
                else:
                    points, ids = landmark_centroids(lm_vol)
            else:
                points = load_landmarks(lm_path, img.affine, img.shape, self.landmark_units, s.image)
                ids = np.arange(points.shape[0], dtype=np.int64)
        out = preprocess_subject(img.data, img.affine, self.preprocess, seg=seg_arr, landmarks=points, path=str(s.image))
        arrays: dict[str, np.ndarray] = {"image": out.image, "affine": out.affine}
        if out.seg is not None:
            arrays["seg"] = out.seg.astype(np.int64, copy=False)
        if out.landmarks is not None:
            arrays["landmarks"] = out.landmarks
            arrays["landmark_ids"] = np.asarray(ids, dtype=np.int64)
        if notes:
            arrays["notes"] = np.asarray(notes, dtype=str)
        return arrays


def guarded(path: Path, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(path, ...)`` with any read failure (e.g. a truncated ``.nii.gz`` that only fails when
    its data is decoded) turned into a :class:`DataError` naming the file."""
    try:
        return fn(path, *args, **kwargs)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(path, f"cannot be read as NIfTI ({type(exc).__name__}: {exc})",
                        "the file is corrupt or truncated; copy it again") from exc


def _map_labels(seg: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Relabel through ``mapping`` (ids not in it kept) in one pass over the volume, not one
    pass per mapped id."""
    uniq, inverse = np.unique(seg, return_inverse=True)
    table = np.asarray([mapping.get(int(u), int(u)) for u in uniq], dtype=seg.dtype)
    return table[inverse].reshape(seg.shape)


def _pair_landmarks(f: Mapping[str, np.ndarray], m: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Points both subjects have, in id order: ``(N, 3)`` float32 each."""
    fid, mid = f["landmark_ids"], m["landmark_ids"]
    fp, mp = np.asarray(f["landmarks"]), np.asarray(m["landmarks"])
    ok_f = ~np.isnan(fp).any(1)
    ok_m = ~np.isnan(mp).any(1)
    common = np.intersect1d(fid[ok_f], mid[ok_m])
    fi = {int(k): i for i, k in enumerate(fid)}
    mi = {int(k): i for i, k in enumerate(mid)}
    a = np.stack([fp[fi[int(k)]] for k in common]) if common.size else np.zeros((0, 3))
    b = np.stack([mp[mi[int(k)]] for k in common]) if common.size else np.zeros((0, 3))
    return a.astype(np.float32), b.astype(np.float32)


class _PairBase(Dataset):
    def __init__(self, subjects: Sequence[SubjectFiles], loader: SubjectLoader, with_seg: bool, with_landmarks: bool) -> None:
        self.subjects = list(subjects)
        self.loader = loader
        self.with_seg = bool(with_seg)
        self.with_landmarks = bool(with_landmarks) and all(s.landmarks is not None for s in self.subjects)

    def pair(self, idx: int) -> tuple[int, int]:
        raise NotImplementedError(f"{type(self).__name__} must define pair(idx)")

    def _load(self, i: int) -> dict[str, np.ndarray]:
        return self.loader.load(self.subjects[i], with_seg=self.with_seg, with_landmarks=self.with_landmarks)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        a, b = self.pair(int(idx))
        f, m = self._load(a), self._load(b)
        fs, ms = self.subjects[a], self.subjects[b]
        if f["image"].shape != m["image"].shape:
            raise DataError(
                ms.image,
                f"moving grid {tuple(m['image'].shape)} differs from the fixed {fs.image.name}'s {tuple(f['image'].shape)} "
                "after preprocessing",
                "set a common `shape` (and `spacing`) in the data module's preprocessing options",
            )
        fo, mo = orientation_codes(np.asarray(f["affine"])), orientation_codes(np.asarray(m["affine"]))
        if fo != mo:
            # arrays are paired voxel for voxel: across flipped or permuted axes that pairs
            # one side of the head with the other
            raise DataError(ms.image, f"is stored in orientation {mo}, the fixed {fs.image.name} in {fo}; the networks "
                                      "pair arrays voxel for voxel", "set `canonical: true` (reorient both to RAS on load)")
        sample: dict[str, Any] = {
            "fixed": torch.from_numpy(f["image"]).unsqueeze(0),
            "moving": torch.from_numpy(m["image"]).unsqueeze(0),
        }
        if self.with_seg:
            sample["fixed_seg"] = torch.from_numpy(f["seg"]).unsqueeze(0)
            sample["moving_seg"] = torch.from_numpy(m["seg"]).unsqueeze(0)
        sample["fixed_affine"] = torch.from_numpy(np.array(f["affine"], dtype=np.float64))
        sample["moving_affine"] = torch.from_numpy(np.array(m["affine"], dtype=np.float64))
        if self.with_landmarks:
            fp, mp = _pair_landmarks(f, m)
            sample["fixed_landmarks"] = torch.from_numpy(fp)
            sample["moving_landmarks"] = torch.from_numpy(mp)
        sample["case_id"] = f"{fs.subject_id}_{ms.subject_id}"
        sample["fixed_id"] = fs.subject_id
        sample["moving_id"] = ms.subject_id
        return sample


class PairListDataset(_PairBase):
    """A fixed, ordered list of ``(fixed, moving)`` subject index pairs; items are batch-contract samples.

    Args:
        subjects: the subjects.
        pairs: ``(fixed_index, moving_index)`` into ``subjects``.
        loader: reads subjects.
        with_seg: include ``fixed_seg`` / ``moving_seg`` (every subject must have labels).
        with_landmarks: include landmarks when every subject has them.
    """

    def __init__(self, subjects: Sequence[SubjectFiles], pairs: Sequence[tuple[int, int]], loader: SubjectLoader,
                 with_seg: bool, with_landmarks: bool = True) -> None:
        super().__init__(subjects, loader, with_seg, with_landmarks)
        self.pairs = [(int(a), int(b)) for a, b in pairs]
        n = len(self.subjects)
        for a, b in self.pairs:
            if not (0 <= a < n and 0 <= b < n):
                raise ValueError(f"pair ({a}, {b}) refers to a subject outside 0..{n - 1}")

    def __len__(self) -> int:
        return len(self.pairs)

    def pair(self, idx: int) -> tuple[int, int]:
        return self.pairs[idx]

    @property
    def case_ids(self) -> list[str]:
        """``"{fixed_id}_{moving_id}"`` per pair, in order."""
        return [f"{self.subjects[a].subject_id}_{self.subjects[b].subject_id}" for a, b in self.pairs]


class AllPairsDataset(_PairBase):
    """Every ordered pair of distinct subjects, indexed lazily: index ``i`` → fixed ``i // (n-1)``,
    moving the ``(i % (n-1))``-th other subject. No pair list is built (LUMIR has ~11 M pairs)."""

    def __init__(self, subjects: Sequence[SubjectFiles], loader: SubjectLoader, with_seg: bool = False,
                 with_landmarks: bool = False) -> None:
        super().__init__(subjects, loader, with_seg, with_landmarks)
        if len(self.subjects) < 2:
            raise ValueError(f"random training pairs need at least 2 subjects, got {len(self.subjects)}")

    def __len__(self) -> int:
        n = len(self.subjects)
        return n * (n - 1)

    def pair(self, idx: int) -> tuple[int, int]:
        n = len(self.subjects)
        if not 0 <= idx < n * (n - 1):
            raise IndexError(idx)
        a, r = divmod(idx, n - 1)
        return a, (r if r < a else r + 1)

    @property
    def case_ids(self) -> list[str]:
        return [f"{self.subjects[a].subject_id}_{self.subjects[b].subject_id}" for a, b in map(self.pair, range(len(self)))]


def all_ordered_pairs(n: int) -> list[tuple[int, int]]:
    """Every ordered pair of distinct indices ``0..n-1``, lexicographic."""
    return [(a, b) for a in range(n) for b in range(n) if a != b]


def seeded_subset(pairs: list[tuple[int, int]], count: int | None, seed: int, salt: int) -> list[tuple[int, int]]:
    """``count`` distinct pairs drawn with the seed (kept in list order), or all when ``None``."""
    if count is None or int(count) >= len(pairs):
        return list(pairs)
    if int(count) < 1:
        raise ValueError(f"pair count must be >= 1 or None, got {count}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1, int(salt)]))
    chosen = sorted(rng.choice(len(pairs), size=int(count), replace=False).tolist())
    return [pairs[i] for i in chosen]


class RealPairDataModule(PairDataModule):
    """Base of the real-data modules: preprocessing, cache, splits, loaders.

    Subclasses implement :meth:`discover` (fill ``self.subjects`` by split), :meth:`eval_pairs`
    and :attr:`label_ids`, and set ``uses_labels``.

    Args (shared by every real-data module):
        batch_size: pairs per batch.
        num_workers: DataLoader workers per loader.
        pin_memory: pinned host memory (only when CUDA is available).
        persistent_workers: keep workers between epochs.
        cache_dir: cache folder (default ``$REGBENCH_CACHE_DIR`` or ``~/.cache/regbench/preprocessed``).
        use_cache: ``False`` decodes the NIfTI files on every access.
        cache_hash: ``"content"`` (default) or ``"stat"``; see :mod:`datamodules.cache`.
        seed: pair draws.
        train_pairs_per_epoch: random training pairs per epoch (over all ranks).
        normalize, percentiles, intensity_range, canonical, spacing, shape, multiple_of:
            :class:`datamodules.preprocess.PreprocessConfig`.
        on_label_grid_mismatch: ``"resample"`` or ``"error"`` (labels not on their image's grid).
        label_map: label id → new id applied after reading.
        landmark_units: ``"voxel"`` or ``"mm"``: how landmark CSVs are read (see :class:`SubjectLoader`).
        export_fields: the runner writes every test field as ``fields/disp_{fixed}_{moving}.nii.gz``
            (Learn2Reg layout, with the affine of the grid it lies on: the preprocessed fixed
            grid) and a JSON record beside it (:meth:`field_record`), so that
            ``regbench evaluate --resample-field`` can score it against the original files.
    """

    collate_fn = staticmethod(functools.partial(collate_pairs, copy=False))
    #: Whether evaluation batches carry labels (set by subclasses).
    uses_labels: bool = True

    def __init__(
        self,
        batch_size: int = 1,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        cache_dir: str | None = None,
        use_cache: bool = True,
        cache_hash: str = "content",
        seed: int = 0,
        train_pairs_per_epoch: int = 100,
        normalize: str = "minmax",
        percentiles: tuple[float, float] = (0.5, 99.5),
        intensity_range: tuple[float, float] | None = None,
        canonical: bool = True,
        spacing: float | tuple[float, float, float] | None = None,
        shape: int | tuple[int, int, int] | None = None,
        multiple_of: int | None = None,
        on_label_grid_mismatch: str = "resample",
        label_map: Mapping[int, int] | None = None,
        landmark_units: str = "voxel",
        export_fields: bool = False,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1 or int(num_workers) < 0 or int(train_pairs_per_epoch) < 1:
            raise ValueError("batch_size >= 1, num_workers >= 0 and train_pairs_per_epoch >= 1 are required")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.seed = int(seed)
        self.train_pairs_per_epoch = int(train_pairs_per_epoch)
        self.preprocess_config = PreprocessConfig(
            normalize=normalize, percentiles=tuple(percentiles), intensity_range=intensity_range,
            canonical=canonical, spacing=spacing, shape=shape, multiple_of=multiple_of,
        )
        self.cache = ArrayCache(cache_dir, hash_mode=cache_hash) if use_cache else None
        self.loader = SubjectLoader(self.preprocess_config, self.cache, on_label_grid_mismatch, label_map, landmark_units)
        #: The runner exports every test field (and its JSON record) when True.
        self.export_fields = bool(export_fields)
        self.subjects: dict[str, list[SubjectFiles]] = {}
        self._datasets: dict[str, Dataset] = {}
        self._train_sampler: RandomPairSampler | None = None
        self._discovered = False

    # ------------------------------------------------------------------ to implement
    def discover(self) -> dict[str, list[SubjectFiles]]:
        """Subjects per split ``"train"``, ``"val"``, ``"test"`` (checks the folder, reads no volume)."""
        raise NotImplementedError(f"{type(self).__name__} must define discover()")

    def eval_pairs(self, split: str) -> list[tuple[int, int]]:
        """Ordered ``(fixed, moving)`` indices into ``self.subjects[split]`` for ``"val"`` / ``"test"``."""
        return all_ordered_pairs(len(self.subjects[split]))

    # ------------------------------------------------------------------ shared
    def _ensure_discovered(self) -> None:
        if not self._discovered:
            self.subjects = self.discover()
            self._discovered = True

    def check_inputs(self) -> None:
        """Find the dataset's files and the splits (raises :class:`DataError`); reads no volume."""
        self._ensure_discovered()
        if not self.subjects.get("test"):
            raise DataError(getattr(self, "root", None), "no test subjects found", "check the folder and the split options")
        self.check_landmark_files()

    def check_landmark_files(self) -> None:
        """Every landmark CSV of the evaluation subjects against its image's grid (headers only),
        with the rule and message of ``regbench evaluate`` (:func:`benchmark.core.io.check_landmarks_on_grid`),
        so a CSV of mm read as voxels stops ``regbench run`` before any work."""
        import nibabel as nib

        seen: set[Path] = set()
        for split in ("val", "test"):
            for s in self.subjects.get(split, []):
                if s.landmarks is None or is_nifti(s.landmarks) or s.landmarks in seen:
                    continue
                seen.add(s.landmarks)
                try:
                    img = nib.load(str(s.image))
                except Exception as exc:  # nibabel raises several types
                    raise DataError(s.image, f"cannot be read as NIfTI ({type(exc).__name__}: {exc})") from exc
                load_landmarks(s.landmarks, np.asarray(img.affine, np.float64), tuple(img.shape[:3]),
                               self.loader.landmark_units, s.image)

    def field_record(self, batch: Mapping[str, Any], b: int) -> dict[str, Any]:
        """What an exported field needs to be scored against the original files: the JSON
        written beside ``disp_{fixed}_{moving}.nii.gz``.

        Keys: ``fixed_image`` / ``moving_image`` (original files), ``field_affine`` and
        ``field_shape`` (the preprocessed fixed grid the field lies on; also in the NIfTI
        header), ``moving_affine`` (the preprocessed moving grid that ``x + u(x)`` indexes),
        ``{fixed,moving}_original_affine`` / ``_shape``, ``{fixed,moving}_voxel_map``
        (preprocessed voxel → original voxel, ``(4, 4)``), ``preprocess`` (the settings), and
        ``convention``.
        """
        import nibabel as nib

        self._ensure_discovered()
        by_id: dict[str, SubjectFiles] = {}
        for split in ("train", "val", "test"):
            for s in self.subjects.get(split, []):
                by_id[s.subject_id] = s
        fa = np.asarray(batch["fixed_affine"][b].detach().cpu().numpy(), np.float64)
        ma = np.asarray(batch["moving_affine"][b].detach().cpu().numpy(), np.float64)
        rec: dict[str, Any] = {
            "convention": "displacement u in voxels of the field grid (channel d = array axis d), pull: "
                          "fixed voxel p maps to moving voxel p + u(p) of the moving grid 'moving_affine'",
            "fixed_id": str(batch["fixed_id"][b]),
            "moving_id": str(batch["moving_id"][b]),
            "field_affine": fa.tolist(),
            "field_shape": [int(n) for n in batch["fixed"].shape[2:]],
            "moving_affine": ma.tolist(),
            "preprocess": self.preprocess_config.as_dict(),
        }
        for role, aff in (("fixed", fa), ("moving", ma)):
            s = by_id.get(rec[f"{role}_id"])
            if s is None:
                continue
            hdr = nib.load(str(s.image))
            orig = np.asarray(hdr.affine, np.float64)
            rec[f"{role}_image"] = str(Path(s.image).resolve())
            rec[f"{role}_original_affine"] = orig.tolist()
            rec[f"{role}_original_shape"] = [int(n) for n in hdr.shape[:3]]
            rec[f"{role}_voxel_map"] = (np.linalg.inv(orig) @ aff).tolist()
        return rec

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` (``fit`` → train + val, ``test``/``predict`` → test)."""
        self._ensure_discovered()
        want = {"fit": ("train", "val"), "train": ("train",), "validate": ("val",), "val": ("val",),
                "test": ("test",), "predict": ("test",), None: ("train", "val", "test")}[stage]
        for split in want:
            if split in self._datasets:
                continue
            if split == "train":
                subs = self.subjects.get("train", [])
                self._datasets["train"] = AllPairsDataset(subs, self.loader, with_seg=False, with_landmarks=False)
            else:
                self._datasets[split] = PairListDataset(self.subjects.get(split, []), self.eval_pairs(split), self.loader,
                                                        with_seg=self.uses_labels, with_landmarks=True)
        self._setup_done = True

    def pair_dataset(self, stage: str) -> Dataset:
        """Dataset of ``stage`` (``train``/``fit``, ``val``/``validate``, ``test``/``predict``)."""
        key = {"fit": "train", "train": "train", "val": "val", "validate": "val", "test": "test", "predict": "test"}
        if stage not in key:
            raise ValueError(f"unknown stage {stage!r}; use 'train', 'val' or 'test'")
        split = key[stage]
        if split not in self._datasets:
            self.setup(split)
        return self._datasets[split]

    def train_dataloader(self) -> DataLoader:
        """``train_pairs_per_epoch`` random ordered pairs of training subjects per epoch (each DDP rank its share)."""
        ds = self.pair_dataset("train")
        if self._train_sampler is None:
            self._train_sampler = RandomPairSampler(len(ds), self.train_pairs_per_epoch, self.seed)
        return DataLoader(ds, sampler=self._train_sampler, **self.loader_kwargs())

    def predict_dataloader(self) -> DataLoader:
        """Same pairs as the test loader (nothing skipped)."""
        return self._eval_loader("test", set())
