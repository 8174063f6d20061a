"""Synthetic brain-like volumes with known dense correspondences and exact landmarks.

Everything is deterministic from ``seed`` (and the subject index); nothing is read from disk.

Template
    One label map per seed on the grid ``size`` (default 64³): an ellipsoidal "head" whose
    boundary is perturbed by a smooth random field, holding

    * label 1 — an outer shell (scalp / skull / CSF),
    * ``n_cortex`` "cortical" parcels — a band under the shell, split by a noisy angular
      Voronoi partition (curved borders),
    * one "white matter" core,
    * ``n_deep`` "deep nuclei" — noisy ellipsoidal blobs inside the core.

    ``n_labels = 1 + n_cortex + 1 + n_deep`` (internal ids ``1..K``, 0 = background). Optionally
    the ids are mapped to any sparse set (``label_values``) on output. Every structure has at
    least ``min_structure_voxels`` voxels (default 50 voxels scaled by ``prod(size) / 64³``);
    the template is redrawn from the same seed stream until that holds.

Subjects (pull convention, voxels)
    ``phi_i = exp(v_i)`` (scaling and squaring, :func:`benchmark.core.spatial.integrate_velocity`),
    ``v_i`` a smooth random velocity whose RMS vector length is ``deform_amplitude`` voxels and
    whose correlation length is ``deform_smoothness`` voxels. The subject's label map is
    ``seg_i(y) = template(y + phi_i(y))`` (nearest neighbour, :func:`benchmark.core.spatial.warp`);
    its image is per-label mean intensities (the template's, jittered per subject), a light
    partial-volume blur, a smooth multiplicative bias field and Gaussian noise, min–max scaled
    to ``[0, 1]``, float32.

Landmarks
    ``landmarks_per_label`` points per structure, chosen in template space at integer voxels
    deep inside the structure (the deepest voxel first). In subject ``i`` a template point
    ``q`` sits at the ``y`` with ``y + phi_i(y) = q``, found by the fixed-point iteration
    ``y <- q - phi_i(y)`` preconditioned by the local Jacobian (``y <- y - (I + ∇phi_i)^{-1}
    (y + phi_i(y) - q)``, trilinear interpolation of ``phi_i``, float64; see
    :func:`solve_preimage`) until the residual ``|y + phi_i(y) - q|`` is below ``1e-6`` voxel
    (an error is raised above ``1e-3``; the residual is kept on the subject). Hence for a
    pair (fixed ``a``, moving ``b``) the landmarks ``y_a[k]`` and ``y_b[k]`` correspond
    exactly (both map to the same template point); :meth:`SyntheticBrainGenerator.map_points`
    maps any fixed point exactly.

Ground-truth displacement
    :meth:`SyntheticBrainGenerator.true_displacement` gives ``u_true`` on the fixed grid with
    ``moving(x + u_true(x))`` corresponding to ``fixed(x)``: at every voxel ``x`` of the fixed
    grid, ``z = x + phi_a(x)`` (exact, ``x`` is a grid point) and ``w = T_b^{-1}(z)`` is
    solved pointwise by the same iteration (no approximate inverse such as ``exp(-v_b)`` is
    involved); ``u_true(x) = w - x``. Accuracy: the residual ``|w + phi_b(w) - z|`` is below
    ``1e-4`` voxel at every voxel (checked), for the trilinear ``phi``. Sampling ``u_true``
    *between* voxels adds its trilinear interpolation error: at the landmarks, max 0.02–0.03
    (mean ≈ 0.007) voxel at 64³ and max ≈ 0.035 (mean ≈ 0.013) voxel at 32³ with the default
    deformation. Cost ≈ 1 s at 64³ on one CPU thread.

Geometry
    All subjects share the grid and a diagonal RAS affine with the given ``spacing`` (mm),
    centred on the volume's middle. Shapes and deformations are defined in voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from benchmark.core.metrics import displacement_jacobian
from benchmark.core.spatial import gaussian_smooth, identity_grid, integrate_velocity, warp

__all__ = [
    "SyntheticTemplate",
    "SyntheticSubject",
    "SyntheticBrainGenerator",
    "smooth_random_field",
    "sample_field",
    "solve_preimage",
    "synthetic_affine",
    "as_size",
]

_TEMPLATE_STREAM = 0
_SUBJECT_STREAM = 1
_TEXTURE_STREAM = 2


def as_size(size: int | Sequence[int]) -> tuple[int, int, int]:
    """Normalise ``size`` (one int or three ints) to a 3-tuple of ints ≥ 8."""
    if isinstance(size, (int, np.integer)):
        out = (int(size),) * 3
    else:
        out = tuple(int(s) for s in size)
    if len(out) != 3 or min(out) < 8:
        raise ValueError(f"size must be one int or three ints, each >= 8; got {size!r}")
    return out  # type: ignore[return-value]


def synthetic_affine(size: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Diagonal RAS voxel→world affine ``(4, 4)`` float64, world origin at the grid centre (mm)."""
    sp = np.asarray([float(s) for s in spacing], dtype=np.float64)
    if sp.shape != (3,) or not np.all(sp > 0):
        raise ValueError(f"spacing must be three positive numbers (mm); got {spacing!r}")
    aff = np.eye(4)
    aff[:3, :3] = np.diag(sp)
    aff[:3, 3] = -0.5 * (np.asarray(size, dtype=np.float64) - 1.0) * sp
    return aff


def smooth_random_field(
    rng: np.random.Generator, shape: Sequence[int], length: float, channels: int = 1
) -> torch.Tensor:
    """Smooth Gaussian random field, standardised per channel.

    White noise on a coarse grid (spacing ``length / 2`` voxels, at least 1) is Gaussian
    smoothed there and upsampled trilinearly, so the cost is independent of ``length``.

    Args:
        rng: numpy generator (consumed deterministically).
        shape: spatial shape ``(X, Y, Z)``.
        length: correlation length (Gaussian sigma) in voxels of ``shape``.
        channels: number of independent fields.

    Returns:
        ``(1, channels, *shape)`` float32, zero mean and unit standard deviation per channel.
    """
    factor = max(1, int(length // 2))
    coarse = [int(np.ceil((n - 1) / factor)) + 1 for n in shape]
    sigma = length / factor
    # Draw the noise with a margin of one kernel radius and crop it off after smoothing, so
    # the field is stationary up to the edges (no replicate-padding artefacts at the border).
    r = max(int(np.ceil(3.0 * sigma)), 1)
    noise = torch.from_numpy(rng.standard_normal((1, channels, *[n + 2 * r for n in coarse]))).float()
    f = gaussian_smooth(noise, sigma)[:, :, r:-r, r:-r, r:-r]
    if tuple(coarse) != tuple(shape):
        # The coarse grid spans (coarse-1)*factor >= n-1 voxels; stretch it over the grid.
        f = F.interpolate(f, size=tuple(shape), mode="trilinear", align_corners=True)
    f = f - f.mean(dim=(2, 3, 4), keepdim=True)
    return f / f.std(dim=(2, 3, 4), keepdim=True).clamp_min(1e-8)


def sample_field(field: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Trilinearly sample a vector field at arbitrary voxel positions (border extension).

    Uses :func:`benchmark.core.spatial.warp`, so the interpolation is the suite's one warp.

    Args:
        field: ``(1, C, X, Y, Z)``.
        positions: ``(1, 3, *A)`` voxel coordinates (array axis order) of the points, any 3D
            arrangement ``A`` (a dense grid or ``(N, 1, 1)`` for a point list).

    Returns:
        ``(1, C, *A)``, the field's trilinear interpolant at ``positions``.
    """
    ident = identity_grid(positions.shape[2:], positions.device, positions.dtype).unsqueeze(0)
    return warp(field.to(positions.dtype), positions - ident, mode="bilinear", padding_mode="border")


def solve_preimage(
    phi: torch.Tensor, targets: torch.Tensor, tol: float = 1e-6, max_iter: int = 100
) -> tuple[torch.Tensor, float]:
    """Solve ``y + phi(y) = q`` for every target ``q`` (``phi`` interpolated trilinearly).

    Starts from ``y = q - phi(q)`` and iterates ``y <- y - J(y)^{-1} (y + phi(y) - q)`` with
    ``J = I + ∇phi`` (central differences, interpolated): the fixed-point iteration
    ``y <- q - phi(y)`` preconditioned by the local Jacobian, so it also converges where
    ``|∇phi| >= 1`` (strong local expansion), where the plain iteration would not. The
    result is exact up to the returned residual for the trilinear ``phi``. Computed in float64.

    Args:
        phi: ``(1, 3, X, Y, Z)`` displacement in voxels (pull: ``T(y) = y + phi(y)``).
        targets: ``(1, 3, *A)`` voxel positions ``q``.
        tol: stop when the largest residual ``|y + phi(y) - q|`` (voxels) falls below it.
        max_iter: iteration cap.

    Returns:
        ``(y, residual)``: ``y`` is ``(1, 3, *A)`` float64; ``residual`` the final largest
        residual in voxels.
    """
    phi64 = phi.to(torch.float64)
    jac = displacement_jacobian(phi64, identity=False)  # ∂phi_d/∂x_e, channel 3 d + e
    q = targets.to(torch.float64)
    y = q - sample_field(phi64, q)
    residual = float("inf")
    eye = torch.eye(3, dtype=torch.float64)
    shape = phi.shape[2:]
    for _ in range(max_iter):
        err = y + sample_field(phi64, y) - q
        residual = float(err.norm(dim=1).max()) if err.numel() else 0.0
        if residual < tol:
            break
        grad = sample_field(jac, y)[0].reshape(3, 3, -1)  # (d, e, M)
        # Outside the grid along axis e, the border-extended phi is constant in x_e.
        inside = torch.stack([(y[0, e] >= 0) & (y[0, e] <= n - 1) for e, n in enumerate(shape)]).reshape(3, -1)
        j = (grad * inside.unsqueeze(0)).permute(2, 0, 1) + eye  # (M, 3, 3)
        step = torch.linalg.solve(j, err[0].reshape(3, -1).T.unsqueeze(-1))[..., 0]  # (M, 3)
        y = y - step.T.reshape(err.shape)
    return y, residual


@dataclass
class SyntheticTemplate:
    """The template of one seed.

    Attributes:
        seg: ``(X, Y, Z)`` int64 label map, internal ids ``0..K``.
        intensity: ``(K + 1,)`` float64 base mean intensity per internal id (index 0 = background).
        landmarks: ``(N, 3)`` float64 template points ``q`` (integer voxel indices).
        landmark_labels: ``(N,)`` int64 internal id of the structure each landmark lies in.
        landmark_depth: ``(N,)`` float64 distance (voxels) from each landmark to the
            nearest voxel of another label.
        kind: ``(K + 1,)`` names ``"background" | "shell" | "cortex" | "white_matter" | "deep"``.
    """

    seg: np.ndarray
    intensity: np.ndarray
    landmarks: np.ndarray
    landmark_labels: np.ndarray
    landmark_depth: np.ndarray
    kind: list[str]


@dataclass
class SyntheticSubject:
    """One synthetic subject.

    Attributes:
        index: subject index (the stream it was drawn from).
        subject_id: ``"s{index:04d}"``.
        image: ``(X, Y, Z)`` float32 in ``[0, 1]``.
        seg: ``(X, Y, Z)`` int64 label map with the *output* ids (``label_values`` applied).
        affine: ``(4, 4)`` float64 voxel→world (RAS, mm).
        landmarks: ``(N, 3)`` float64 voxel positions ``y`` with ``y + phi(y) = q``.
        landmark_residual: largest ``|y + phi(y) - q|`` in voxels.
        phi: ``(1, 3, X, Y, Z)`` float32 deformation (voxels), or ``None`` when not kept.
    """

    index: int
    subject_id: str
    image: np.ndarray
    seg: np.ndarray
    affine: np.ndarray
    landmarks: np.ndarray
    landmark_residual: float
    phi: torch.Tensor | None = field(default=None, repr=False)


class SyntheticBrainGenerator:
    """Deterministic generator of synthetic brain subjects (see the module docstring).

    Args:
        size: grid shape, one int or three ints (default 64³).
        n_labels: number of structures ``K >= 4`` (background excluded).
        seed: master seed; the template and every subject derive from it.
        spacing: voxel size in mm along the three array axes.
        deform_amplitude: RMS length of the velocity ``v_i`` in voxels; ``None`` gives
            ``2.25 · min(size) / 64`` (initial Dice between subjects ≈ 0.6–0.75).
        deform_smoothness: correlation length (Gaussian sigma) of ``v_i`` in voxels; ``None``
            gives ``min(size) / 8``.
        landmarks_per_label: landmark points per structure (``N = K · landmarks_per_label``).
        label_values: optional output id for each structure (``K`` distinct positive ints,
            e.g. sparse atlas ids); default ``1..K``.
        bias_strength: std of the log bias field.
        noise_std: std of the additive Gaussian noise before ``[0, 1]`` scaling.
        intensity_jitter: std of the per-subject jitter of each label's mean intensity.
        texture_strength: relative amplitude of a smooth intensity texture defined in
            template space and deformed with each subject, so the inside of a structure has
            features (as real anatomy does) and interior landmarks are recoverable from the
            images; 0 gives piecewise-constant structures.
        min_structure_voxels: minimum voxels per template structure; ``None`` gives
            ``max(8, ceil(50 · prod(size) / 64³))``.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 64,
        n_labels: int = 12,
        seed: int = 0,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        deform_amplitude: float | None = None,
        deform_smoothness: float | None = None,
        landmarks_per_label: int = 2,
        label_values: Sequence[int] | None = None,
        bias_strength: float = 0.2,
        noise_std: float = 0.02,
        intensity_jitter: float = 0.04,
        texture_strength: float = 0.15,
        min_structure_voxels: int | None = None,
    ) -> None:
        self.shape = as_size(size)
        if not 4 <= int(n_labels) <= 64:
            raise ValueError(f"n_labels must be in [4, 64]; got {n_labels}")
        self.n_labels = int(n_labels)
        self.seed = int(seed)
        self.affine = synthetic_affine(self.shape, spacing)
        self.spacing = tuple(float(s) for s in spacing)
        m = min(self.shape)
        self.deform_amplitude = 2.25 * m / 64.0 if deform_amplitude is None else float(deform_amplitude)
        self.deform_smoothness = m / 8.0 if deform_smoothness is None else float(deform_smoothness)
        if self.deform_amplitude < 0 or self.deform_smoothness <= 0:
            raise ValueError("deform_amplitude must be >= 0 and deform_smoothness > 0")
        if int(landmarks_per_label) < 1:
            raise ValueError("landmarks_per_label must be >= 1")
        self.landmarks_per_label = int(landmarks_per_label)
        if label_values is None:
            values = list(range(1, self.n_labels + 1))
        else:
            values = [int(v) for v in label_values]
            if len(values) != self.n_labels or len(set(values)) != len(values) or min(values) <= 0:
                raise ValueError(
                    f"label_values must be {self.n_labels} distinct positive ints (one per structure); got {label_values!r}"
                )
        self.label_ids: list[int] = values
        self._lut = np.zeros(self.n_labels + 1, dtype=np.int64)
        self._lut[1:] = values
        self.bias_strength = float(bias_strength)
        self.noise_std = float(noise_std)
        self.intensity_jitter = float(intensity_jitter)
        self.texture_strength = float(texture_strength)
        self._texture: torch.Tensor | None = None
        vox = int(np.prod(self.shape))
        self.min_structure_voxels = (
            max(8, int(np.ceil(50 * vox / 64**3))) if min_structure_voxels is None else int(min_structure_voxels)
        )
        self._template: SyntheticTemplate | None = None

    # ------------------------------------------------------------------ template
    @property
    def n_landmarks(self) -> int:
        """Number of landmarks ``N`` per subject."""
        return self.n_labels * self.landmarks_per_label

    @property
    def template(self) -> SyntheticTemplate:
        """The (cached) template of this seed."""
        if self._template is None:
            self._template = self._make_template()
        return self._template

    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, *stream]))

    def _make_template(self) -> SyntheticTemplate:
        rng = self._rng(_TEMPLATE_STREAM)
        counts: np.ndarray | None = None
        for _ in range(25):
            seg, kind = self._draw_template(rng)
            counts = np.bincount(seg.ravel(), minlength=self.n_labels + 1)
            if counts[1:].min() >= self.min_structure_voxels:
                break
        else:
            raise ValueError(
                f"could not draw {self.n_labels} structures of >= {self.min_structure_voxels} voxels on a "
                f"{self.shape} grid (smallest had {int(counts[1:].min())}); use fewer labels or a larger size"
            )
        intensity = np.zeros(self.n_labels + 1)
        for k, name in enumerate(kind):
            if name == "shell":
                intensity[k] = rng.uniform(0.25, 0.35)
            elif name == "cortex":
                intensity[k] = rng.uniform(0.45, 0.65)
            elif name == "white_matter":
                intensity[k] = rng.uniform(0.8, 0.9)
            elif name == "deep":
                intensity[k] = rng.choice([rng.uniform(0.1, 0.35), rng.uniform(0.65, 1.0)])
        q, lab, depth = self._template_landmarks(seg, rng)
        return SyntheticTemplate(seg=seg, intensity=intensity, landmarks=q, landmark_labels=lab, landmark_depth=depth, kind=kind)

    def _draw_template(self, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        shape = self.shape
        k_total = self.n_labels
        n_cortex = (k_total - 2 + 1) // 2
        n_deep = k_total - 2 - n_cortex
        m = min(shape)
        c = identity_grid(shape, dtype=torch.float64)
        # normalised coordinates in [-1, 1] per axis
        c = torch.stack([2.0 * c[d] / (shape[d] - 1) - 1.0 for d in range(3)]).numpy()
        semi = np.array([0.92, 0.84, 0.88]) * rng.uniform(0.95, 1.0, size=3)
        r = np.sqrt(((c / semi[:, None, None, None]) ** 2).sum(0))
        bumps = smooth_random_field(rng, shape, m / 6.0, 1)[0, 0].numpy().astype(np.float64)
        r = r * (1.0 + 0.05 * bumps)  # curved head boundary
        inner = smooth_random_field(rng, shape, m / 10.0, 1)[0, 0].numpy().astype(np.float64)
        r_brain = 0.87 + 0.02 * inner
        r_wm = 0.63 + 0.03 * inner
        seg = np.zeros(shape, dtype=np.int64)
        seg[r < 1.0] = 1
        brain = r < r_brain
        # cortical band: noisy angular Voronoi over well-separated random directions
        dirs = _spread_directions(rng, n_cortex)
        norm = np.sqrt((c**2).sum(0)).clip(1e-6)
        unit = c / norm
        noise = smooth_random_field(rng, shape, m / 8.0, n_cortex)[0].numpy().astype(np.float64)
        score = np.einsum("kd,dxyz->kxyz", dirs, unit) + 0.18 * noise
        parcel = np.argmax(score, axis=0)
        label = 2 + parcel
        seg[brain] = label[brain]
        wm_id = 2 + n_cortex
        core = r < r_wm
        seg[core] = wm_id
        # deep structures: noisy ellipsoids inside the core, kept apart
        centers: list[np.ndarray] = []
        radii: list[float] = []
        blob_noise = smooth_random_field(rng, shape, m / 10.0, max(n_deep, 1))[0].numpy().astype(np.float64)
        for j in range(n_deep):
            rad = rng.uniform(0.2, 0.3)
            reach = 0.63 - 0.8 * rad
            for _attempt in range(200):
                cen = rng.uniform(-reach, reach, size=3)
                if np.linalg.norm(cen) > reach:
                    continue
                if all(np.linalg.norm(cen - o) > 0.85 * (rad + ro) for o, ro in zip(centers, radii)):
                    break
            centers.append(cen)
            radii.append(rad)
            axes = rad * rng.uniform(0.8, 1.2, size=3)
            d = np.sqrt((((c - (cen * semi)[:, None, None, None]) / (axes * semi)[:, None, None, None]) ** 2).sum(0))
            blob = (d * (1.0 + 0.12 * blob_noise[j]) < 1.0) & core
            seg[blob] = wm_id + 1 + j
        kind = ["background", "shell"] + ["cortex"] * n_cortex + ["white_matter"] + ["deep"] * n_deep
        return seg, kind

    def _template_landmarks(
        self, seg: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # distance from each voxel to the nearest voxel of another label (boundary voxels -> 1)
        boundary = np.zeros(seg.shape, dtype=bool)
        for ax in range(3):
            diff = np.diff(seg, axis=ax) != 0
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[ax] = slice(0, -1)
            hi[ax] = slice(1, None)
            boundary[tuple(lo)] |= diff
            boundary[tuple(hi)] |= diff
        depth = ndimage.distance_transform_edt(~boundary) + 1.0
        depth[boundary] = 1.0
        pts: list[np.ndarray] = []
        labs: list[int] = []
        deps: list[float] = []
        for k in range(1, self.n_labels + 1):
            idx = np.argwhere(seg == k)
            dk = depth[seg == k]
            chosen = [int(np.argmax(dk))]
            thresh = min(2.5, 0.6 * float(dk.max()))
            candidates = np.flatnonzero(dk >= thresh)
            for _ in range(self.landmarks_per_label - 1):
                dist = np.linalg.norm(idx[candidates, None, :] - idx[None, chosen, :], axis=-1).min(axis=1)
                far = candidates[dist >= 3.0]
                if far.size:
                    chosen.append(int(rng.choice(far)))
                else:  # small structure: the deepest voxel not yet taken
                    taken = set(chosen)
                    order = np.argsort(-dk, kind="stable")
                    free = [int(i) for i in order[: len(chosen) + 1] if int(i) not in taken]
                    if not free:
                        raise ValueError(f"structure {k} has too few voxels for {self.landmarks_per_label} landmarks")
                    chosen.append(free[0])
            for ci in chosen:
                pts.append(idx[ci].astype(np.float64))
                labs.append(k)
                deps.append(float(dk[ci]))
        return np.stack(pts), np.asarray(labs, dtype=np.int64), np.asarray(deps)

    # ------------------------------------------------------------------ subjects
    def velocity(self, index: int) -> torch.Tensor:
        """Stationary velocity ``v_i`` of subject ``index``: ``(1, 3, X, Y, Z)`` float32, voxels."""
        rng = self._rng(_SUBJECT_STREAM, int(index))
        return self._velocity(rng)

    def _velocity(self, rng: np.random.Generator) -> torch.Tensor:
        v = smooth_random_field(rng, self.shape, self.deform_smoothness, 3)
        rms = v.pow(2).sum(1).mean().sqrt().clamp_min(1e-8)
        return v * (self.deform_amplitude / rms)

    def deformation(self, index: int) -> torch.Tensor:
        """``phi_i = exp(v_i)``: ``(1, 3, X, Y, Z)`` float32 displacement in voxels (pull)."""
        return integrate_velocity(self.velocity(index), steps=7)

    @property
    def texture(self) -> torch.Tensor:
        """Template-space intensity texture ``(1, 1, X, Y, Z)``: unit-variance smooth field
        (correlation length ``min(size) / 16`` voxels), the same for every subject."""
        if self._texture is None:
            rng = self._rng(_TEXTURE_STREAM)
            self._texture = smooth_random_field(rng, self.shape, max(min(self.shape) / 16.0, 1.0), 1)
        return self._texture

    def subject(self, index: int, keep_phi: bool = False) -> SyntheticSubject:
        """Generate subject ``index`` (deterministic in ``(seed, index)``).

        Args:
            index: non-negative subject index.
            keep_phi: keep the deformation ``phi`` on the result (3 floats per voxel).
        """
        if int(index) < 0:
            raise ValueError(f"subject index must be >= 0; got {index}")
        tpl = self.template
        rng = self._rng(_SUBJECT_STREAM, int(index))
        phi = integrate_velocity(self._velocity(rng), steps=7)
        tseg = torch.from_numpy(tpl.seg).view(1, 1, *self.shape)
        seg = warp(tseg, phi, mode="nearest", padding_mode="zeros")[0, 0]
        means = tpl.intensity + self.intensity_jitter * rng.standard_normal(tpl.intensity.shape)
        means[0] = 0.0
        img = torch.from_numpy(means.astype(np.float32))[seg].view(1, 1, *self.shape)
        if self.texture_strength > 0:
            img = img * (1.0 + self.texture_strength * warp(self.texture, phi, mode="bilinear", padding_mode="border"))
        img = gaussian_smooth(img, 0.6)
        bias = torch.exp(self.bias_strength * smooth_random_field(rng, self.shape, min(self.shape) / 3.0, 1))
        img = img * bias
        noise = torch.from_numpy(rng.standard_normal(self.shape).astype(np.float32))
        img = img + self.noise_std * noise
        lo, hi = img.min(), img.max()
        img = ((img - lo) / (hi - lo).clamp_min(1e-8)).clamp(0.0, 1.0)
        q = torch.from_numpy(tpl.landmarks.T.copy()).view(1, 3, -1, 1, 1)
        y, residual = solve_preimage(phi, q, tol=1e-6)
        if residual > 1e-3:
            raise RuntimeError(
                f"landmark inversion for subject {index} did not converge (residual {residual:.2e} voxel); "
                "the deformation is too large for its smoothness"
            )
        return SyntheticSubject(
            index=int(index),
            subject_id=f"s{int(index):04d}",
            image=img[0, 0].numpy().astype(np.float32),
            seg=self._lut[seg.numpy()],
            affine=self.affine.copy(),
            landmarks=y[0, :, :, 0, 0].T.numpy().copy(),
            landmark_residual=residual,
            phi=phi if keep_phi else None,
        )

    def map_points(
        self, fixed_index: int, moving_index: int, points: np.ndarray | torch.Tensor, tol: float = 1e-6
    ) -> np.ndarray:
        """Exact ground-truth point mapping fixed → moving: ``T_b^{-1}(T_a(p))``.

        Args:
            fixed_index, moving_index: subject indices ``a`` and ``b``.
            points: ``(N, 3)`` voxel positions in the fixed image.
            tol: inversion residual (voxels), checked.

        Returns:
            ``(N, 3)`` float64 voxel positions in the moving image.
        """
        p = torch.as_tensor(np.asarray(points, dtype=np.float64)).T.reshape(1, 3, -1, 1, 1)
        z = p + sample_field(self.deformation(fixed_index), p)
        w, residual = solve_preimage(self.deformation(moving_index), z, tol=tol)
        if residual > max(tol, 1e-3):
            raise RuntimeError(f"inverting phi_{moving_index} at the points did not converge (residual {residual:.2e})")
        return w[0, :, :, 0, 0].T.numpy().copy()

    def true_displacement(
        self, fixed_index: int, moving_index: int, tol: float = 1e-4, max_iter: int = 200
    ) -> torch.Tensor:
        """Ground-truth displacement of the pair (fixed ``a``, moving ``b``) on the fixed grid.

        ``u_true(x) = T_b^{-1}(x + phi_a(x)) - x`` with ``T_b(y) = y + phi_b(y)``, the inverse
        solved pointwise by fixed-point iteration; so ``moving(x + u_true(x))`` shows the
        anatomy of ``fixed(x)``, and ``y_a + u_true(y_a) = y_b`` for landmarks.

        Args:
            fixed_index, moving_index: subject indices.
            tol: required largest inversion residual in voxels (checked).
            max_iter: iteration cap.

        Returns:
            ``(1, 3, X, Y, Z)`` float32 displacement in voxels of the fixed grid.
        """
        phi_a = self.deformation(fixed_index).to(torch.float64)
        phi_b = self.deformation(moving_index)
        z = identity_grid(self.shape, dtype=torch.float64).unsqueeze(0) + phi_a
        w, residual = solve_preimage(phi_b, z, tol=tol, max_iter=max_iter)
        if residual > tol:
            raise RuntimeError(f"inverting phi_{moving_index} did not reach {tol:g} voxel (residual {residual:.2e})")
        return (w - identity_grid(self.shape, dtype=torch.float64).unsqueeze(0)).float()


def _spread_directions(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random unit vectors ``(n, 3)`` pushed apart (best of a few random draws)."""
    best, best_sep = None, -np.inf
    for _ in range(64):
        d = rng.standard_normal((n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        if n == 1:
            return d
        g = d @ d.T
        np.fill_diagonal(g, -1.0)
        sep = -g.max()
        if sep > best_sep:
            best, best_sep = d, sep
    assert best is not None
    return best
