"""Spine CT → X-ray (DRR) data for 2D/3D registration (docs/design.md §5).

Sources: the built-in synthetic spine CTs (:mod:`datamodules.synthetic_spine`, default) or a
folder of CT NIfTI files (HU) with optional vertebra label maps (landmarks = label centres
of mass, computed through the *label map's own affine*, so a label map on another grid is
still read correctly) or VerSe-style centroid JSON files.

Folder layout: ``<root>/<id>.nii.gz`` (or ``.nii``) CTs; labels ``<id>_vertebrae.nii.gz``,
``<id>_seg.nii.gz`` or ``<id>_msk.nii.gz``; centroids ``<id>_ctd.json`` /
``<id>_centroids.json``: a list of ``{"label": k, "X": …, "Y": …, "Z": …}`` (an optional
leading ``{"direction": …}`` entry is skipped) with X, Y, Z in mm along the array axes
(voxel index × spacing, the VerSe convention), converted to world through the affine.

Which labels are vertebrae: ``vertebra_labels`` (ids, or a map between names and ids such
as ``{"L1": 20, "L2": 21}``) picks them from a multi-structure map (e.g. TotalSegmentator's);
without it every non-zero id of each map is a landmark, with a warning when a map holds more
than :data:`MAX_AUTO_VERTEBRAE` ids (a whole-body map would put the isocentre, the landmark
centroid, in the middle of the organs). A split that tests on a CT it also trains on (a
folder with one CT) is warned about too. ``regbench data check --dataset spine ROOT``
reports all of this before a run.

Batch (a dict; ``B`` cases, ``H × W`` detector, ``N`` landmarks, CT ``(X, Y, Z)``):

==================  ==================  =========  ===========================================
key                 shape               dtype      meaning
==================  ==================  =========  ===========================================
``xray``            ``(B, 1, H, W)``    float32    target X-ray (DRR at the true pose, scaled to [0, 1])
``volume``          ``(B, 1, X, Y, Z)`` float32    CT attenuation per mm (``hu_to_mu``)
``affine``          ``(B, 4, 4)``       float64    CT voxel → world
``base``            ``(B, 4, 4)``       float64    reference placement (pose 0), see :mod:`benchmark.core.drr`
``pose_true``       ``(B, 6)``          float32    true pose (rad, mm)
``pose_init``       ``(B, 6)``          float32    starting pose of the registration
``landmarks``       ``(B, N, 3)``       float32    CT world mm (NaN rows pad)
``case_id``         ``list[str]``                  ``{ct}_p{k:03d}``
``fixed_id``        ``list[str]``                  the X-ray (same as ``case_id``)
``moving_id``       ``list[str]``                  the CT id
``geometry``        ``CArmGeometry``               the C-arm (one per batch)
==================  ==================  =========  ===========================================

Test set: per test CT a fixed, seeded list of ``poses_per_ct`` true poses, rotations
``N(0, rot_std_deg)`` per axis, translations ``N(0, trans_std_mm)`` in-plane (C-arm x, y)
and ``N(0, depth_std_mm)`` in depth (z); the starting pose is the reference (``θ = 0``;
``init_std_scale > 0`` instead starts at ``θ_true`` plus a perturbation of that scale).
Training draws fresh poses from the same distribution (scaled by ``train_pose_scale``)
and renders on the fly, with optional domain randomisation (noise, blur, gamma, contrast,
inversion).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from benchmark.core.drr import CArmGeometry, hu_to_mu, normalise_xray, reference_transform, render_pose
from benchmark.core.io import DataError, load_volume
from datamodules.base import CheckLine, RegistrationDataModule, UnpaddedDistributedSampler
from datamodules.real_base import guarded
from datamodules.synthetic_spine import label_centroids, make_spine_ct

__all__ = ["SpineCT", "SpineDRRDataModule", "collate_pose", "domain_randomise", "sample_poses",
           "parse_vertebra_labels", "vertebra_ids_of", "MAX_AUTO_VERTEBRAE"]

#: A label map with more ids than this is probably not (only) vertebrae: the human spine has
#: 24–26 vertebrae (plus sacrum / coccyx labels in VerSe: ids up to 28).
MAX_AUTO_VERTEBRAE = 30


def parse_vertebra_labels(spec: Any) -> list[int] | None:
    """The vertebra label ids named by ``spec``: ``None`` (every id of the map), a list of ids,
    a comma-separated string of ids, or a mapping between names and ids in either direction
    (``{"L1": 20}`` or ``{20: "L1"}``). Returns sorted unique ids, or ``None``.

    Raises:
        ValueError: anything else, or no id at all.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = [t for t in spec.replace(" ", "").split(",") if t]
    if isinstance(spec, dict):
        vals = []
        for k, v in spec.items():
            for cand in (v, k):
                try:
                    vals.append(int(cand))
                    break
                except (TypeError, ValueError):
                    continue
            else:
                raise ValueError(f"vertebra_labels: neither {k!r} nor {v!r} is a label id")
        spec = vals
    try:
        ids = sorted({int(v) for v in spec})
    except (TypeError, ValueError):
        raise ValueError(f"vertebra_labels must be label ids or a name ↔ id map, got {spec!r}") from None
    if not ids or min(ids) < 1:
        raise ValueError(f"vertebra_labels must name positive label ids, got {spec!r}")
    return ids


def vertebra_ids_of(found: Sequence[int], wanted: list[int] | None, path: Any) -> tuple[list[int], str | None]:
    """The ids of a label map (``found``, non-zero) used as vertebra landmarks, and a warning
    text or ``None``: with ``wanted`` the named ids present in the map (a CT need not show every
    vertebra); without it every id, with a warning above :data:`MAX_AUTO_VERTEBRAE`.

    Raises:
        DataError: ``wanted`` names no id of the map.
    """
    found = sorted(int(v) for v in found)
    if wanted is not None:
        ids = [i for i in wanted if i in set(found)]
        if not ids:
            shown = ", ".join(map(str, found[:12])) + (" …" if len(found) > 12 else "")
            raise DataError(path, f"none of the vertebra_labels {wanted} occur in the label map (it holds {shown})",
                            "check the ids against the map's label table")
        return ids, None
    if len(found) > MAX_AUTO_VERTEBRAE:
        return found, (f"{path}: all {len(found)} label ids become vertebra landmarks (more than {MAX_AUTO_VERTEBRAE}: "
                       "a multi-structure map?) and their centroid becomes the isocentre; name the vertebrae with "
                       "vertebra_labels (ids or a name map)")
    return found, None

_LABEL_SUFFIXES = ("_vertebrae", "_seg", "_msk")
_CTD_SUFFIXES = ("_ctd", "_centroids")


@dataclass
class SpineCT:
    """A prepared CT: attenuation volume ``(1, X, Y, Z)``, affine, landmarks ``(N, 3)`` world
    mm, reference placement ``base (4, 4)`` (isocentre = landmark centroid)."""

    ct_id: str
    mu: torch.Tensor
    affine: torch.Tensor
    landmarks: torch.Tensor
    base: torch.Tensor


def domain_randomise(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random inversion, blur, gamma, contrast and noise on ``(1, H, W)`` in ``[0, 1]``."""
    x = img
    u = torch.rand(6, generator=g)
    if u[0] < 0.5:  # gamma
        x = x.clamp_min(0) ** float(torch.empty(1).uniform_(0.7, 1.5, generator=g))
    if u[1] < 0.5:  # contrast
        c = float(torch.empty(1).uniform_(0.7, 1.3, generator=g))
        x = (x - x.mean()) * c + x.mean()
    if u[2] < 0.3:  # blur
        k = torch.tensor([0.25, 0.5, 0.25])
        x = F.conv2d(F.pad(x[None], (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :])[None, None])[0]
    if u[3] < 0.5:  # noise
        x = x + float(torch.empty(1).uniform_(0.0, 0.05, generator=g)) * torch.randn(x.shape, generator=g)
    if u[4] < 0.2:  # inversion
        x = 1.0 - x
    return normalise_xray(x[None])[0]


def sample_poses(n: int, g: np.random.Generator, rot_std_deg: float, trans_std_mm: float, depth_std_mm: float) -> np.ndarray:
    """``(n, 6)`` poses: rotations ``N(0, rot_std)`` per axis (returned in rad), translations
    ``N(0, trans_std)`` in x, y and ``N(0, depth_std)`` in z (mm)."""
    rot = np.deg2rad(g.normal(0.0, rot_std_deg, (n, 3)))
    tr = np.stack([g.normal(0.0, trans_std_mm, n), g.normal(0.0, trans_std_mm, n), g.normal(0.0, depth_std_mm, n)], 1)
    return np.concatenate([rot, tr], 1)


def collate_pose(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch (landmarks padded with NaN rows; one geometry)."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if k == "geometry":
            out[k] = vals[0]
        elif k == "landmarks":
            n = max(v.shape[0] for v in vals)
            pad = torch.full((len(vals), n, 3), float("nan"), dtype=torch.float32)
            for i, v in enumerate(vals):
                pad[i, : v.shape[0]] = v
            out[k] = pad
        elif isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        else:
            out[k] = list(vals)
    return out


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


class _PoseDataset(Dataset):
    """Fixed cases: ``(ct index, true pose, start pose)`` rendered on access."""

    def __init__(self, dm: "SpineDRRDataModule", cts: list[SpineCT], cases: list[tuple[int, np.ndarray, np.ndarray, str]]) -> None:
        self.dm, self.cts, self.cases = dm, cts, cases
        self.case_ids = [c[3] for c in cases]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ci, pose, init, cid = self.cases[i]
        g = torch.Generator().manual_seed(_seed_of(self.dm.seed, "noise", cid) % 2**63)
        return self.dm.make_sample(self.cts[ci], torch.from_numpy(pose).float(), torch.from_numpy(init).float(), cid, g, randomise=False)


class _TrainDataset(Dataset):
    """``length`` random draws per epoch (fresh poses every access, from torch's RNG)."""

    def __init__(self, dm: "SpineDRRDataModule", cts: list[SpineCT], length: int) -> None:
        self.dm, self.cts, self.length = dm, cts, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        seed = int(torch.randint(0, 2**62, (1,)))
        g = np.random.default_rng(seed)
        dm = self.dm
        s = dm.train_pose_scale
        pose = sample_poses(1, g, dm.rot_std_deg * s, dm.trans_std_mm * s, dm.depth_std_mm * s)[0]
        if dm.init_std_scale > 0:
            init = pose + sample_poses(1, g, dm.rot_std_deg * dm.init_std_scale, dm.trans_std_mm * dm.init_std_scale, dm.depth_std_mm * dm.init_std_scale)[0]
        else:
            init = np.zeros(6)
        ct = self.cts[int(g.integers(len(self.cts)))]
        tg = torch.Generator().manual_seed(seed)
        return dm.make_sample(ct, torch.from_numpy(pose).float(), torch.from_numpy(init).float(), f"{ct.ct_id}_train{i}", tg,
                              randomise=dm.domain_randomization)


class SpineDRRDataModule(RegistrationDataModule):
    """Spine CT / DRR pose data for 2D/3D registration.

    Args:
        root: folder of CTs (see module doc); ``None`` → synthetic CTs.
        test_ids: CT ids for testing (folder); default the last ``n_test_cts`` sorted ids
            (a folder with a single CT uses it for training and testing).
        n_train_cts, n_test_cts: synthetic CT counts (seeds differ between the splits).
        n_val_cts: validation CTs, disjoint from training and test CTs (synthetic: their own
            seeds; folder: the last ``n_val_cts`` non-test ids, when at least one training CT
            is left, else validation falls back to the training CTs).
        synthetic_variation: anatomy / size / intensity spread between synthetic CTs
            (``variation`` of :func:`datamodules.synthetic_spine.make_spine_ct`; 0 = base model).
        synthetic_size, synthetic_spacing: synthetic grid (voxels, mm).
        target_spacing: resample folder CTs to this isotropic spacing (mm), ``None`` keeps it.
        crop_mm: crop (or pad with air) a cube of this size around the isocentre, ``None`` keeps all.
        poses_per_ct: test poses per test CT (the paper: 500).
        val_cases: validation cases (seeded poses on the validation CTs).
        rot_std_deg, trans_std_mm, depth_std_mm: test pose distribution.
        init_std_scale: 0 → start at the reference pose; else start at the true pose plus a
            perturbation of this scale (times the stds).
        train_pose_scale: scale of the training pose distribution.
        train_samples: draws per training epoch.
        domain_randomization: randomise training X-rays.
        sdd, sid, height, width, pixel_mm: the C-arm (mm; ``sid`` None → sdd/2).
        n_samples: samples per ray when rendering X-rays.
        mu_water, bone_hu, bone_scale: HU → attenuation (see :func:`benchmark.core.drr.hu_to_mu`).
        batch_size, test_batch_size, num_workers, seed.
        vertebra_labels: the label ids that are vertebrae (ids, a comma-separated string or a
            name ↔ id map; see :func:`parse_vertebra_labels`); ``None`` uses every id of each map.
    """

    name = "spine"
    #: 2D/3D pose registration: scored by the registry's pose metrics (mTRE, success, ...).
    task = "pose"
    #: class path of the ``initial`` row's system (the runner builds it): the starting pose, unchanged.
    initial_system = "systems.pose_base.InitialPose"

    def __init__(
        self,
        root: str | None = None,
        test_ids: list[str] | None = None,
        n_train_cts: int = 32,
        n_test_cts: int = 2,
        n_val_cts: int = 2,
        synthetic_variation: float = 1.0,
        synthetic_size: int = 64,
        synthetic_spacing: float = 2.5,
        target_spacing: float | None = None,
        crop_mm: float | None = None,
        poses_per_ct: int = 500,
        val_cases: int = 4,
        rot_std_deg: float = 20.0,
        trans_std_mm: float = 30.0,
        depth_std_mm: float = 60.0,
        init_std_scale: float = 0.0,
        train_pose_scale: float = 1.0,
        train_samples: int = 256,
        domain_randomization: bool = True,
        sdd: float = 1020.0,
        sid: float | None = None,
        height: int = 256,
        width: int = 256,
        pixel_mm: float = 0.798,
        n_samples: int = 128,
        mu_water: float = 0.0193,
        bone_hu: float | None = None,
        bone_scale: float = 1.0,
        batch_size: int = 4,
        test_batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        vertebra_labels: Any = None,
    ) -> None:
        super().__init__()
        self.vertebra_labels = parse_vertebra_labels(vertebra_labels)
        self.root = None if root in (None, "") else Path(root)
        self.test_ids = list(test_ids) if test_ids else None
        self.n_train_cts, self.n_test_cts = int(n_train_cts), int(n_test_cts)
        self.n_val_cts, self.synthetic_variation = int(n_val_cts), float(synthetic_variation)
        self.synthetic_size, self.synthetic_spacing = int(synthetic_size), float(synthetic_spacing)
        self.target_spacing = target_spacing
        self.crop_mm = crop_mm
        self.poses_per_ct, self.val_cases = int(poses_per_ct), int(val_cases)
        self.rot_std_deg, self.trans_std_mm, self.depth_std_mm = float(rot_std_deg), float(trans_std_mm), float(depth_std_mm)
        self.init_std_scale, self.train_pose_scale = float(init_std_scale), float(train_pose_scale)
        self.train_samples, self.domain_randomization = int(train_samples), bool(domain_randomization)
        self.geometry = CArmGeometry(sdd=sdd, sid=sid, height=height, width=width, dely=pixel_mm, delx=pixel_mm)
        self.n_samples = int(n_samples)
        self.mu_water, self.bone_hu, self.bone_scale = float(mu_water), bone_hu, float(bone_scale)
        self.batch_size, self.test_batch_size, self.num_workers = int(batch_size), int(test_batch_size), int(num_workers)
        self.seed = int(seed)
        if min(self.poses_per_ct, self.n_test_cts if self.root is None else 1) < 1:
            raise ValueError("poses_per_ct and n_test_cts must be >= 1")
        self._cts: dict[str, list[SpineCT]] | None = None
        self._datasets: dict[str, Dataset] = {}

    # ---------------------------------------------------------------- inputs
    def _folder_items(self) -> list[tuple[str, Path, Path | None, Path | None]]:
        """``(id, ct, labels or None, centroid json or None)`` per CT, sorted by id."""
        assert self.root is not None
        if not self.root.is_dir():
            raise DataError(self.root, "spine CT folder not found", "set root to a folder of CT NIfTI files, or null for synthetic data")
        files = sorted(p for p in self.root.iterdir() if p.name.endswith((".nii.gz", ".nii")))
        stem = lambda p: p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.name[: -len(".nii")]  # noqa: E731
        stems = {stem(p): p for p in files}
        items = []
        for s, p in stems.items():
            if any(s.endswith(suf) for suf in _LABEL_SUFFIXES):
                continue
            lab = next((stems[s + suf] for suf in _LABEL_SUFFIXES if s + suf in stems), None)
            ctd = next((self.root / f"{s}{suf}.json" for suf in _CTD_SUFFIXES if (self.root / f"{s}{suf}.json").exists()), None)
            items.append((s, p, lab, ctd))
        if not items:
            raise DataError(self.root, "no CT NIfTI files (*.nii.gz) found", "put <id>.nii.gz CTs in the folder")
        return items

    def split_ids(self, ids: list[str]) -> tuple[list[str], list[str]]:
        """``(train, test)`` CT ids of a folder (validation CTs, if any, come out of ``train``):
        ``test_ids`` or the last ``n_test_cts`` sorted ids for testing, the others for training
        (the test CTs themselves when nothing is left)."""
        for t in self.test_ids or []:
            if t not in ids:
                raise DataError(self.root, f"test_ids: {t!r} is not a CT here", f"choose from {', '.join(ids)}")
        test = list(self.test_ids or ids[-min(self.n_test_cts, len(ids)):])
        train = [i for i in ids if i not in test] or list(test)
        return train, test

    def check_inputs(self) -> None:
        """Check that the CT folder exists, its files are readable 3D volumes with matching
        labels, without loading the arrays (synthetic data: nothing to check)."""
        if self.root is None:
            return
        import nibabel as nib

        items = self._folder_items()
        ids = [i[0] for i in items]
        for t in self.test_ids or []:
            if t not in ids:
                raise DataError(self.root, f"test_ids: {t!r} is not a CT here", f"choose from {', '.join(ids)}")
        for cid, ct, lab, ctd in items:
            try:
                img = nib.load(str(ct))
            except Exception as exc:  # nibabel raises several types
                raise DataError(ct, f"cannot read NIfTI ({exc})") from exc
            if len(img.shape) != 3:
                raise DataError(ct, f"expected a 3D CT, got shape {img.shape}")
            if lab is not None:
                try:
                    limg = nib.load(str(lab))
                except Exception as exc:
                    raise DataError(lab, f"cannot read NIfTI ({exc})") from exc
                if len(limg.shape) != 3:
                    raise DataError(lab, f"expected a 3D label map, got shape {limg.shape}")
            if ctd is not None:
                self._read_ctd(ctd, img.affine)

    def check(self, resample_labels: bool = False, headers_only: bool = False) -> list[CheckLine]:
        """``regbench data check`` of a spine CT folder, read the way :meth:`_load` reads it.

        Problems: no CTs, unreadable or non-3D CTs and label maps, empty label maps, named
        ``vertebra_labels`` absent from a map, unreadable centroid JSON, CTs without
        landmarks, unknown ``test_ids``. Notes: maps whose every id would become a landmark
        although they hold more than :data:`MAX_AUTO_VERTEBRAE` labels (a multi-organ map?),
        and a split that trains and tests on the same CT. Synthetic data (no ``root``): the
        default check. (``resample_labels`` / ``headers_only`` do not apply.)
        """
        if self.root is None:
            return super().check()
        import nibabel as nib

        lines = [CheckLine.summary("task", self.task)]
        try:
            items = self._folder_items()
        except (DataError, ValueError) as exc:
            return lines + [CheckLine.problem(str(exc))]
        lines.append(CheckLine.summary("cts", len(items)))
        per_ct: dict[str, int] = {}
        for cid, ct, lab, ctd in items:
            try:
                img = nib.load(str(ct))
                if len(img.shape) != 3:
                    raise DataError(ct, f"expected a 3D CT, got shape {img.shape}")
                n = 0
                if lab is not None:
                    lvol = guarded(lab, load_volume, dtype=np.int64)
                    found = [int(v) for v in np.unique(lvol.data) if v != 0]
                    if not found:
                        raise DataError(lab, "the label map is empty (no vertebra labels)")
                    ids, note = vertebra_ids_of(found, self.vertebra_labels, lab)
                    if note:
                        lines.append(CheckLine.note(note))
                    n = len(ids)
                elif ctd is not None:
                    n = len(self._read_ctd(ctd, np.asarray(img.affine)))
                if n == 0:
                    lines.append(CheckLine.problem(f"{ct}: no landmarks (mTRE needs them; add {cid}_vertebrae.nii.gz labels "
                                                   f"or {cid}_ctd.json centroids)"))
                per_ct[cid] = n
            except DataError as exc:
                lines.append(CheckLine.problem(str(exc)))
        lines.append(CheckLine.summary("landmarks_per_ct", per_ct))
        try:
            train, test = self.split_ids([i[0] for i in items])
            lines += [CheckLine.summary("train_cts", train), CheckLine.summary("test_cts", test)]
            shared = sorted(set(train) & set(test))
            if shared:
                lines.append(CheckLine.note(f"{self.root}: training and testing share CT(s) {shared}: test poses are "
                                            "rendered from a CT the method trained on (add CTs, or list test_ids)"))
        except DataError as exc:
            lines.append(CheckLine.problem(str(exc)))
        return lines

    @staticmethod
    def _read_ctd(path: Path, affine: np.ndarray) -> np.ndarray:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(path, f"not a readable centroid JSON ({exc})") from exc
        if not isinstance(data, list):
            raise DataError(path, "expected a list of {label, X, Y, Z} entries")
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
        rows = []
        for e in data:
            if isinstance(e, dict) and "direction" in e:
                continue
            if not (isinstance(e, dict) and all(k in e for k in ("label", "X", "Y", "Z"))):
                raise DataError(path, f"entry {e!r} lacks label/X/Y/Z")
            try:
                vox = np.array([e["X"], e["Y"], e["Z"]], float) / spacing
            except (TypeError, ValueError):
                raise DataError(path, f"entry {e!r}: X/Y/Z are not numbers") from None
            if not np.isfinite(vox).all():
                continue  # VerSe files hold NaN centroids for vertebrae they did not locate; kept, they made the isocentre NaN
            rows.append(vox @ affine[:3, :3].T + affine[:3, 3])
        if not rows:
            raise DataError(path, "no centroids (with finite X/Y/Z)")
        return np.array(rows)

    def _prepare(self, cid: str, hu: np.ndarray, affine: np.ndarray, landmarks: np.ndarray) -> SpineCT:
        if not np.isfinite(hu).all():
            raise DataError(None, f"CT {cid}: contains NaN/Inf", "fix or drop the scan")
        vol = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
        aff = torch.from_numpy(np.asarray(affine, np.float64))
        if self.target_spacing is not None:
            sp = torch.sqrt((aff[:3, :3] ** 2).sum(0))
            shape = torch.tensor(vol.shape[2:], dtype=torch.float64)
            new = [max(2, int(round(float((n - 1) * s / self.target_spacing))) + 1) for n, s in zip(shape, sp)]
            vol = F.interpolate(vol, size=new, mode="trilinear", align_corners=True)
            scale = torch.tensor([(float(n) - 1) / (m - 1) for n, m in zip(shape, new)] + [1.0], dtype=torch.float64)
            aff = aff @ torch.diag(scale)
        if len(landmarks):
            iso = torch.from_numpy(np.asarray(landmarks, np.float64)).mean(0)
        else:
            iso = aff[:3, :3] @ ((torch.tensor(vol.shape[2:], dtype=torch.float64) - 1) / 2) + aff[:3, 3]
        if self.crop_mm is not None:
            sp = torch.sqrt((aff[:3, :3] ** 2).sum(0))
            cv = torch.linalg.solve(aff[:3, :3], iso - aff[:3, 3])
            half = [int(math.ceil(self.crop_mm / float(s) / 2)) for s in sp]
            lo = [int(round(float(c))) - h for c, h in zip(cv, half)]
            pad = []
            for a in (2, 1, 0):
                n = vol.shape[2 + a]
                pad += [max(0, -lo[a]), max(0, lo[a] + 2 * half[a] - n)]
            vol = F.pad(vol, pad, value=-1000.0)
            starts = [lo[a] + max(0, -lo[a]) for a in range(3)]
            vol = vol[:, :, starts[0] : starts[0] + 2 * half[0], starts[1] : starts[1] + 2 * half[1], starts[2] : starts[2] + 2 * half[2]]
            aff = aff.clone()
            aff[:3, 3] = aff[:3, :3] @ torch.tensor(lo, dtype=torch.float64) + aff[:3, 3]
        mu = hu_to_mu(vol[0], self.mu_water, self.bone_hu, self.bone_scale).contiguous()
        return SpineCT(cid, mu, aff, torch.as_tensor(np.asarray(landmarks, np.float32)).reshape(-1, 3), reference_transform(iso))

    def _load_folder_ct(self, cid: str, ct: Path, lab: Path | None, ctd: Path | None) -> SpineCT:
        import nibabel as nib

        img = nib.load(str(ct))
        hu = np.asarray(img.dataobj, dtype=np.float32)
        if hu.ndim != 3:
            raise DataError(ct, f"expected a 3D CT, got shape {hu.shape}")
        if lab is not None:
            limg = nib.load(str(lab))
            labels = np.asarray(limg.dataobj)
            if labels.ndim != 3:
                raise DataError(lab, f"expected a 3D label map, got shape {labels.shape}")
            labels = np.rint(labels).astype(np.int64)
            found = [int(v) for v in np.unique(labels) if v != 0]
            if not found:
                raise DataError(lab, "the label map is empty (no vertebra labels)")
            ids, note = vertebra_ids_of(found, self.vertebra_labels, lab)
            if note:
                warnings.warn(note, UserWarning, stacklevel=2)
            _, pts = label_centroids(labels, limg.affine, ids)
        elif ctd is not None:
            pts = self._read_ctd(ctd, img.affine)
        else:
            pts = np.zeros((0, 3))
        return self._prepare(cid, hu, img.affine, pts)

    def _load(self) -> dict[str, list[SpineCT]]:
        if self._cts is not None:
            return self._cts
        if self.root is None:
            def synth(split: str, k: int) -> SpineCT:
                s = _seed_of(self.seed, "spine", split, k) % 2**32
                ct = make_spine_ct(self.synthetic_size, self.synthetic_spacing, seed=s, variation=self.synthetic_variation)
                return self._prepare(f"synth_{split}{k:02d}", ct.hu, ct.affine, ct.centroids)

            self._cts = {"train": [synth("train", k) for k in range(self.n_train_cts)],
                         "val": [synth("val", k) for k in range(self.n_val_cts)],
                         "test": [synth("test", k) for k in range(self.n_test_cts)]}
        else:
            items = self._folder_items()
            train, test = self.split_ids([i[0] for i in items])
            shared = sorted(set(train) & set(test))
            if shared:
                warnings.warn(f"{self.root}: training and testing share CT(s) {shared}: the test poses are rendered "
                              "from a CT the method trained on (add CTs, or list test_ids)", UserWarning, stacklevel=2)
            nv = self.n_val_cts if len(train) > self.n_val_cts and not set(train) & set(test) else 0
            val, train = train[len(train) - nv :], train[: len(train) - nv]
            loaded = {i[0]: self._load_folder_ct(*i) for i in items if i[0] in set(test) | set(train) | set(val)}
            self._cts = {"train": [loaded[i] for i in train], "val": [loaded[i] for i in val], "test": [loaded[i] for i in test]}
        for split, cts in self._cts.items():
            for ct in cts:
                if ct.landmarks.shape[0] == 0:
                    raise DataError(None, f"CT {ct.ct_id}: no landmarks; mTRE needs them", "add <id>_vertebrae.nii.gz labels or an <id>_ctd.json centroid file")
        return self._cts

    # ---------------------------------------------------------------- samples
    def render_xray(self, ct: SpineCT, pose: torch.Tensor, geometry: CArmGeometry | None = None) -> torch.Tensor:
        """``(1, H, W)`` X-ray of ``ct`` at ``pose (6,)``, min–max scaled to ``[0, 1]``."""
        with torch.no_grad():
            img = render_pose(ct.mu[None], ct.affine, pose[None].double(), ct.base[None], geometry or self.geometry, self.n_samples)
        return normalise_xray(img.float())[0]

    def make_sample(self, ct: SpineCT, pose: torch.Tensor, init: torch.Tensor, cid: str, g: torch.Generator, randomise: bool) -> dict[str, Any]:
        xray = self.render_xray(ct, pose)
        if randomise:
            xray = domain_randomise(xray, g)
        return {
            "xray": xray,
            "volume": ct.mu,
            "affine": ct.affine,
            "base": ct.base,
            "pose_true": pose.float(),
            "pose_init": init.float(),
            "landmarks": ct.landmarks,
            "case_id": cid,
            "fixed_id": cid,
            "moving_id": ct.ct_id,
            "geometry": self.geometry,
        }

    def _fixed_cases(self, cts: list[SpineCT], per_ct: int, tag: str) -> list[tuple[int, np.ndarray, np.ndarray, str]]:
        cases = []
        for ci, ct in enumerate(cts):
            g = np.random.default_rng(_seed_of(self.seed, tag, ct.ct_id) % 2**63)
            poses = sample_poses(per_ct, g, self.rot_std_deg, self.trans_std_mm, self.depth_std_mm)
            if self.init_std_scale > 0:
                s = self.init_std_scale
                inits = poses + sample_poses(per_ct, g, self.rot_std_deg * s, self.trans_std_mm * s, self.depth_std_mm * s)
            else:
                inits = np.zeros_like(poses)
            cases += [(ci, poses[k], inits[k], f"{ct.ct_id}_{tag[0]}{k:03d}") for k in range(per_ct)]
        return cases

    def setup(self, stage: str | None = None) -> None:
        cts = self._load()
        if not self._datasets:
            self._datasets["test"] = _PoseDataset(self, cts["test"], self._fixed_cases(cts["test"], self.poses_per_ct, "pose"))
            vcts = cts["val"] or cts["train"]  # held-out validation CTs when there are any
            nv = max(1, math.ceil(self.val_cases / len(vcts)))
            val = self._fixed_cases(vcts, nv, "val")[: self.val_cases]
            self._datasets["val"] = _PoseDataset(self, vcts, val)
            self._datasets["train"] = _TrainDataset(self, cts["train"], self.train_samples)
        self._setup_done = True

    def ct_ids(self, split: str) -> list[str]:
        """Ids of the CTs of ``split`` ("train", "val", "test"); the three are disjoint
        (validation falls back to the training CTs only when a folder has too few)."""
        return [ct.ct_id for ct in self._load()[split]]

    def case_ids(self, stage: str = "test") -> list[str]:
        """The fixed, ordered case ids of ``stage`` ("val" or "test")."""
        self.setup(stage)
        return list(self._datasets[stage].case_ids)

    def dataset(self, stage: str) -> Dataset:
        """The dataset of ``stage`` ("train", "val", "test")."""
        self.setup(stage)
        return self._datasets[stage]


    # ---------------------------------------------------------------- loaders
    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool = False, sampler=None) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate_pose, persistent_workers=self.num_workers > 0)

    def _eval_loader(self, stage: str, skip: set[str]) -> DataLoader:
        ds = self.dataset(stage)
        keep = [i for i, c in enumerate(ds.case_ids) if c not in skip]
        sub = Subset(ds, keep) if len(keep) != len(ds) else ds
        sampler = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sampler = UnpaddedDistributedSampler(sub)
        return self._loader(sub, self.test_batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train"), self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", set())

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", self.skip_cases)
