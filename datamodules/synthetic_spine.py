"""Synthetic spine CT (docs/design.md §5): vertebra-like bones in soft tissue and air.

A torso (elliptic cylinder of soft tissue with a fat layer, a few organ-like blobs and gas
pockets) around a lumbar-like spine: a stack of vertebrae, each a vertebral body (cortical
shell, cancellous core) with a neural arch, a spinous process and two transverse
processes, separated by discs, along a gently curved (lordotic, slightly scoliotic) axis.
Everything is drawn on the voxel grid with vectorised numpy, deterministic from a seed.

World frame: NIfTI RAS, mm; array axis 0 = +x (towards the patient's left), axis 1 = +y
(anterior), axis 2 = +z (superior), with a diagonal affine centred on the volume — the orientation that :data:`benchmark.core.drr.AP_ORIENTATION` views antero-posteriorly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmark.core import metrics

__all__ = ["SyntheticSpineCT", "make_spine_ct", "label_centroids"]


@dataclass
class SyntheticSpineCT:
    """One synthetic CT.

    Attributes:
        hu: ``(X, Y, Z)`` float32 Hounsfield units.
        labels: ``(X, Y, Z)`` int16 vertebra labels ``1…n`` (0 elsewhere).
        affine: ``(4, 4)`` voxel → world (RAS, mm).
        centroids: ``(n, 3)`` world mm, label centres of mass (ordered by label).
    """

    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    centroids: np.ndarray


def label_centroids(labels: np.ndarray, affine: np.ndarray, ids: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """Centres of mass of label ids in world mm (:func:`benchmark.core.metrics.label_centroids`
    through ``affine``).

    Returns:
        ``(ids, (len(ids), 3) array)``; ids absent from the map are left out.
    """
    if labels.size and labels.min() < 0:
        raise ValueError("label maps must be non-negative")
    want = sorted(int(i) for i in np.unique(labels) if i != 0) if ids is None else [int(i) for i in ids]
    if not want:
        return [], np.zeros((0, 3))
    vox = metrics.label_centroids(labels, want)
    keep = ~np.isnan(vox).any(1)
    present = [i for i, k in zip(want, keep) if k]
    if not present:
        return [], np.zeros((0, 3))
    world = vox[keep] @ affine[:3, :3].T + affine[:3, 3]
    return present, world


def make_spine_ct(size: int | tuple[int, int, int] = 64, spacing: float = 2.5, n_vertebrae: int | None = None, seed: int = 0,
                  variation: float = 0.0) -> SyntheticSpineCT:
    """Draw one synthetic spine CT.

    Args:
        size: grid size (voxels, one int for a cube).
        spacing: isotropic voxel size (mm).
        n_vertebrae: vertebrae along the superior–inferior axis (default: as many as fit,
            about 33 mm apart).
        seed: everything is deterministic from it.
        variation: spread of the anatomy between seeds beyond the base model (0 = the base
            model only). At ``v``: torso size × ``U(1 − 0.25v, 1 + 0.15v)``, vertebra size and
            pitch × ``U(1 − 0.2v, 1 + 0.2v)``, a lateral/antero-posterior spine offset of
            ``U(−6v, 6v)`` mm, a stronger curvature, bone HU × ``U(1 − 0.3v, 1 + 0.3v)`` and soft
            tissue ``+U(−30v, 30v)`` HU. Drawn from a second generator, so ``variation = 0``
            reproduces the base model exactly.
    """
    g = np.random.default_rng(seed)
    v = float(variation)
    if v < 0:
        raise ValueError(f"variation must be >= 0, got {variation!r}")
    gv = np.random.default_rng([int(seed), 7331])
    torso_f = 1.0 + v * gv.uniform(-0.25, 0.15)
    vert_f = 1.0 + v * gv.uniform(-0.2, 0.2)
    bone_f = 1.0 + v * gv.uniform(-0.3, 0.3)
    soft_dhu = v * gv.uniform(-30.0, 30.0)
    offset = v * gv.uniform(-6.0, 6.0, 2)
    curve_f = 1.0 + v * gv.uniform(0.0, 1.5)
    shape = (size, size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    ext = np.array(shape, float) * spacing
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.array(shape) - 1) / 2
    x = (np.arange(shape[0]) - (shape[0] - 1) / 2)[:, None, None] * spacing
    y = (np.arange(shape[1]) - (shape[1] - 1) / 2)[None, :, None] * spacing
    z = (np.arange(shape[2]) - (shape[2] - 1) / 2)[None, None, :] * spacing
    hu = np.full(shape, -1000.0, np.float32)
    labels = np.zeros(shape, np.int16)

    # torso: elliptic cylinder, spine sits posteriorly
    ax = 0.44 * ext[0] * g.uniform(0.9, 1.05) * torso_f
    ay = 0.40 * ext[1] * g.uniform(0.92, 1.0) * torso_f
    body = (x / ax) ** 2 + (y / ay) ** 2
    inside = np.broadcast_to(body <= 1.0, shape)
    hu[inside] = 40.0 + soft_dhu
    fat = np.broadcast_to((body <= 1.0) & (body > 0.78), shape)
    hu[fat] = -95.0 + 0.5 * soft_dhu
    inner = body <= 0.78
    # organ-like blobs and gas pockets, anterior to the spine
    for _ in range(int(g.integers(5, 9))):
        c = np.array([g.uniform(-0.5, 0.5) * ax, g.uniform(0.0, 0.6) * ay, g.uniform(-0.45, 0.45) * ext[2]])
        r = g.uniform(0.08, 0.2, 3) * ext.min()
        blob = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0
        hu[blob & inner] = g.uniform(-20, 90)
    for _ in range(int(g.integers(2, 5))):
        c = np.array([g.uniform(-0.5, 0.5) * ax, g.uniform(0.1, 0.6) * ay, g.uniform(-0.45, 0.45) * ext[2]])
        r = g.uniform(0.03, 0.07, 3) * ext.min()
        gas = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0
        hu[gas & inner] = -800.0

    # spine: vertebra centres along z on a curved axis
    pitch = g.uniform(30.0, 36.0) * vert_f
    n = n_vertebrae or max(2, int(ext[2] // pitch))
    zc = (np.arange(n) - (n - 1) / 2) * pitch
    y_spine = -0.2 * ay + offset[1] + 6.0 * curve_f * np.sin(np.pi * zc / max(ext[2], 1.0) + g.uniform(-0.5, 0.5))  # lordosis
    x_spine = offset[0] + curve_f * g.uniform(-4, 4) * np.sin(np.pi * zc / max(ext[2], 1.0) * g.uniform(0.5, 1.5))  # mild scoliosis
    for k in range(n):
        cx, cy, cz = x_spine[k], y_spine[k], zc[k]
        rx, ry = g.uniform(14, 18) * vert_f, g.uniform(11, 14) * vert_f  # vertebral body radii (mm)
        hb = pitch * g.uniform(0.62, 0.7) / 2  # half height of the body
        dx, dy, dz = x - cx, y - cy, z - cz
        ell = (dx / rx) ** 2 + (dy / ry) ** 2
        vb = (ell <= 1.0) & (np.abs(dz) <= hb)
        shell = vb & ((ell > 0.72) | (np.abs(dz) > hb - 2.0))
        vb_b = np.broadcast_to(vb, shape)
        hu[vb_b] = g.uniform(200, 300) * bone_f
        hu[np.broadcast_to(shell, shape)] = g.uniform(700, 900) * bone_f
        labels[vb_b] = k + 1
        # disc below this vertebra
        if k > 0:
            zd = (zc[k] + zc[k - 1]) / 2
            disc = (((x - (cx + x_spine[k - 1]) / 2) / rx) ** 2 + ((y - (cy + y_spine[k - 1]) / 2) / ry) ** 2 <= 0.9) & (
                np.abs(z - zd) <= pitch / 2 - hb
            )
            hu[np.broadcast_to(disc, shape) & (labels == 0)] = 90.0
        # neural arch: annulus behind the body, around the canal
        cyc = cy - ry - 8.0
        rc = np.sqrt(dx**2 + (y - cyc) ** 2)
        harch = hb * 0.8
        arch = (rc >= 7.0) & (rc <= 11.5) & (y <= cyc + 4.0) & (np.abs(dz) <= harch)
        spin = (np.abs(dx) <= 3.0) & (y <= cyc - 9.0) & (y >= cyc - 9.0 - g.uniform(14, 19)) & (np.abs(dz + 0.15 * (y - cyc)) <= harch * 0.7)
        trans = (np.abs(dx) >= 9.0) & (np.abs(dx) <= g.uniform(30, 38)) & (np.abs(y - cyc) <= 3.5) & (np.abs(dz) <= harch * 0.45)
        post = np.broadcast_to(arch | spin | trans, shape) & (labels == 0)
        hu[post] = g.uniform(550, 750) * bone_f
        labels[post] = k + 1

    hu += g.normal(0.0, 12.0, shape).astype(np.float32)
    hu = np.where(inside, hu, -1000.0 + g.normal(0.0, 5.0, shape)).astype(np.float32)
    ids, cents = label_centroids(labels, affine, list(range(1, n + 1)))
    return SyntheticSpineCT(hu=hu, labels=labels, affine=affine, centroids=cents)
