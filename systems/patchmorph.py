"""PatchMorph: a coarse-to-fine cascade of constant-size patches in world coordinates.

Written for this suite from the description of arXiv 2312.06958 and the notes in
``docs/methods.md`` (no code of the authors used). What the method is here:

**Patches in world space.** A patch is a cube of ``patch_size³`` sample points defined in
world (scanner, mm) coordinates by a centre ``c`` (mm), an extent ``e`` (mm per patch axis)
and an orientation ``R`` (3×3, columns = world directions of the patch axes). Patch index
``i ∈ [0, n-1]³`` sits at ``p(i) = c + R (e ⊙ (i / (n-1) - 1/2))`` (:class:`PatchFrame`).
Every image is sampled at those points through *its own* voxel→world affine
(:func:`sample_at_world`: trilinear for images, nearest for labels, through the suite's one
:func:`benchmark.core.spatial.warp`, i.e. ``grid_sample(align_corners=True)``; all patches of a
batch are stacked along the first spatial axis so that a batch of patches costs one
``grid_sample``). So fixed and moving may differ in shape, spacing and orientation: nothing
is resampled to a common grid. The network only ever sees ``n³`` voxels, whatever the image
size, which is why training memory does not grow with the image.

**Cascade.** Scale ``s = 0 .. S-1`` has extent ``extents_mm[s]`` (shrinking; same voxel
count ``n³``, so coarse patches see a large field of view at a coarse voxel size). Scale
``s`` predicts a world map ``φ_s(p) = p + d_s(p)`` for its patch, made of an affine part and
a dense residual (:class:`PatchTransform`): in the patch's normalised coordinates
``t = (R^T (p - c)) / e ∈ [-1/2, 1/2]³`` the affine part is ``A t + b`` (scaled by ``e``) and
the residual ``r`` is a dense field in patch voxels along the patch axes, so
``d_s(p) = R (e ⊙ (A t + b) + (e / (n-1)) ⊙ r(i(p)))`` mm. The whole map is
``Φ = φ_0 ∘ φ_1 ∘ … ∘ φ_{S-1}`` (the finest acts first, pull convention):
scale ``s`` sees the fixed patch and the moving image sampled at ``Φ_{<s}(p)`` (the
composed world transform of the coarser scales) and refines it, ``Φ_{≤s} = Φ_{<s} ∘ φ_s``.
Outside its patch a scale's residual is extended by its border value (the affine part is
global by construction).

**Per-patch network.** Pluggable (:class:`PatchNet`): any module mapping
``cat(moving_patch, fixed_patch)`` ``(N, 2, n, n, n)`` to features ``(N, C, n, n, n)``;
default the suite's VoxelMorph U-Net (:class:`systems.voxelmorph.VxmUNet`), or any class path
/ factory (``backbone``, ``backbone_args``). A 3×3×3 convolution head gives the residual
(initialised near 0) and a linear head on globally averaged features the 12 affine numbers
(initialised at 0, i.e. identity). Both are softly bounded (``m · tanh(x / m)``: slope 1 at
0; residual ≤ ``patch_size / 4`` patch voxels, affine numbers ≤ 0.25): a coarse map that
runs off the image gets no similarity gradient back, and unbounded heads were seen to run
away that way. One network per scale.

**Training.** Random patch pairs: ``train_patches`` centres per image pair, drawn at random
fixed-image voxels above ``foreground_threshold · max(fixed)`` (32 random candidates per
patch, no pass over the image), the same centre for all scales (nested patches);
orientation = the fixed image's axes, optionally randomly rotated by up to ``rotate_deg``.
Loss, summed over scales: ``-local NCC(fixed patch, moving at Φ_{≤s}(p)) + lambda_ · reg_s``,
``reg_s = diffusion(r_s) + fold_weight · mean(relu(-det J))`` with ``J`` the Jacobian of the
patch coordinate map ``i ↦ Φ_{≤s}(p(i))`` written in patch voxels along the patch axes (the
patch-wise regulariser against folding: 0 for any non-folding map).

**Inference.** Per scale, random overlapping patches: a lattice over the fixed image's
bounding box (in the patch frame) with cell size ``≤ infer_stride · extent``, one patch centre
drawn uniformly in every cell (``infer_passes`` such jittered lattices). With
``infer_stride ≤ 1/2`` every fixed voxel lies in at least one patch (usually 8 or more).
Each patch's world displacement ``d_s`` is evaluated at the fixed voxels it covers and
accumulated with a smooth window weight ``w(t) = Π_d max(cos²(π t_d), 10⁻³)`` by
``index_add_`` (weighted scatter-add) into one dense field on the fixed grid, divided by the
summed weights. The dense world displacement ``D`` (mm, fixed grid, ``G(p) = p + D(A_f⁻¹ p)``)
is then composed: ``D ← d_s + D(x + A_f⁻¹ d_s)``. Patch centres at inference come from a
generator seeded with ``seed``: ``register`` is deterministic.

**What register returns.** ``(B, 3, *S_fixed)`` float32 displacement ``u`` in voxels of the
fixed grid, pull convention, with ``x + u(x)`` the *moving* voxel index (array axes of the
moving image) corresponding to fixed voxel ``x``:
``u(x) = A_m⁻¹ (A_f x + D(x)) − x``. This is how the suite treats cross-grid pairs:
``warp(moving, u)`` reads the moving array at ``x + u(x)`` (it accepts a different input
grid), and TRE is ``|A_m,lin ((p + u(p)) − q)|`` with the moving affine. For a pair on one
grid it is the usual displacement. An untrained network gives the world identity (scanner
alignment): ``u(x) = A_m⁻¹ A_f x − x``.

Choices for the open points of ``docs/methods.md``: patch 32³ (16³ for CPU runs), three scales,
extents in mm given per dataset in the configs (coarsest ≈ the head, finest ≈ patch_size ×
voxel size), NCC window 9 (7 for 16³), ``lambda_ = 1``, ``fold_weight = 10``, inference
stride 1/2 of the extent.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn as nn

from benchmark.core.classpath import ClassPathError, import_object
from benchmark.core.losses import LocalNCC, diffusion
from benchmark.core.se3 import so3_exp
from benchmark.core.spatial import identity_grid, warp
from systems.base import RegistrationSystem

__all__ = [
    "PatchFrame",
    "PatchTransform",
    "PatchNet",
    "PatchMorph",
    "sample_at_world",
    "sample_patches",
    "assemble_field",
    "base_orientation",
    "random_rotations",
    "world_disp_to_voxel_disp",
    "apply_chain",
    "negative_jacobian_penalty",
]

_WINDOW_FLOOR = 1e-3


# ----------------------------------------------------------------------------- geometry
def _apply_affine(mat: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """``mat[:3,:3] @ p + mat[:3,3]`` on points with the coordinate on axis 1.

    Args:
        mat: ``(N, 4, 4)`` or ``(4, 4)`` (any float dtype; computed in float64).
        pts: ``(N, 3, *P)`` points (N broadcasts against ``mat``).

    Returns:
        ``(N, 3, *P)`` in the dtype of ``pts``.
    """
    m = mat.to(device=pts.device, dtype=torch.float64)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    p = pts.to(torch.float64)
    out = torch.einsum("nij,nj...->ni...", m[:, :3, :3], p) + m[:, :3, 3].reshape(m.shape[0], 3, *([1] * (p.dim() - 2)))
    return out.to(pts.dtype)


def base_orientation(affine: torch.Tensor) -> torch.Tensor:
    """World directions of an image's array axes, made orthonormal (polar factor).

    Args:
        affine: ``(4, 4)`` or ``(B, 4, 4)`` voxel→world.

    Returns:
        ``(3, 3)`` / ``(B, 3, 3)`` float64 matrix whose column ``d`` is the unit world
        direction of array axis ``d`` (with any shear removed by the polar decomposition).
    """
    lin = affine[..., :3, :3].to(torch.float64)
    u, _, vh = torch.linalg.svd(lin)
    return u @ vh


def random_rotations(n: int, max_deg: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, 3, 3)`` float64 rotations about uniformly random axes by angles uniform in ±``max_deg``."""
    axis = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ang = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(max_deg)
    return so3_exp(axis * ang[:, None])  # Rodrigues, the suite's one (benchmark.core.se3)


@dataclass
class PatchFrame:
    """``N`` patches of ``size³`` sample points defined in world space.

    Attributes:
        centre: ``(N, 3)`` float64 world position of the patch centre, mm.
        extent: ``(N, 3)`` float64 edge lengths along the patch axes, mm (first to last
            sample point).
        rot: ``(N, 3, 3)`` float64 orientation; column ``d`` = unit world direction of patch
            axis ``d`` (orthonormal).
        size: sample points per axis ``n`` (≥ 2).
    """

    centre: torch.Tensor
    extent: torch.Tensor
    rot: torch.Tensor
    size: int

    @property
    def count(self) -> int:
        return int(self.centre.shape[0])

    @property
    def step(self) -> torch.Tensor:
        """``(N, 3)`` mm between neighbouring sample points along each patch axis."""
        return self.extent / (self.size - 1)

    def index_to_world(self) -> torch.Tensor:
        """``(N, 4, 4)`` float64 affine: patch index ``i`` (array order) → world mm."""
        lin = self.rot * self.step[:, None, :]
        half = self.rot @ (self.extent[:, :, None] / 2)
        out = torch.zeros(self.count, 4, 4, dtype=torch.float64, device=self.centre.device)
        out[:, :3, :3] = lin
        out[:, :3, 3] = self.centre - half[:, :, 0]
        out[:, 3, 3] = 1.0
        return out

    def world_points(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(N, 3, n, n, n)`` world coordinates (mm) of every sample point."""
        n = self.size
        ident = identity_grid((n, n, n), self.centre.device, torch.float64).unsqueeze(0)
        return _apply_affine(self.index_to_world(), ident).to(dtype)

    def world_to_normalised(self, pts: torch.Tensor) -> torch.Tensor:
        """World points ``(N, 3, *P)`` → normalised patch coordinates ``t`` (``[-1/2, 1/2]`` inside)."""
        c = self.centre.to(pts).reshape(self.count, 3, *([1] * (pts.dim() - 2)))
        rel = torch.einsum("nji,nj...->ni...", self.rot.to(pts), pts - c)
        return rel / self.extent.to(pts).reshape(self.count, 3, *([1] * (pts.dim() - 2)))

    def world_to_index(self, pts: torch.Tensor) -> torch.Tensor:
        """World points ``(N, 3, *P)`` → patch index coordinates (``[0, n-1]`` inside)."""
        return (self.world_to_normalised(pts) + 0.5) * (self.size - 1)

    def world_to_patch_voxels(self, pts: torch.Tensor) -> torch.Tensor:
        """World points ``(N, 3, *P)`` → coordinates along the patch axes in units of patch voxels
        (``R^T (p - c) / step``; a rigid change of frame and a per-axis scale)."""
        c = self.centre.to(pts).reshape(self.count, 3, *([1] * (pts.dim() - 2)))
        rel = torch.einsum("nji,nj...->ni...", self.rot.to(pts), pts - c)
        return rel / self.step.to(pts).reshape(self.count, 3, *([1] * (pts.dim() - 2)))

    def repeat(self, k: int) -> "PatchFrame":
        """Each patch repeated ``k`` times in a row (``(N·k, …)``)."""
        return PatchFrame(
            self.centre.repeat_interleave(k, 0), self.extent.repeat_interleave(k, 0), self.rot.repeat_interleave(k, 0), self.size
        )

    def select(self, sl: slice) -> "PatchFrame":
        """The patches ``sl``."""
        return PatchFrame(self.centre[sl], self.extent[sl], self.rot[sl], self.size)


def sample_at_world(volume: torch.Tensor, affine: torch.Tensor, points: torch.Tensor, mode: str = "bilinear",
                    padding_mode: str = "zeros") -> torch.Tensor:
    """Sample a volume at world points through its own voxel→world affine (one ``grid_sample``).

    Args:
        volume: ``(B, C, *S)`` image (float) or label map (integer: nearest, dtype kept).
        affine: ``(B, 4, 4)`` or ``(4, 4)`` voxel→world of ``volume``.
        points: ``(B, 3, *P)`` world coordinates, mm (float32).
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``; integer volumes always nearest.
        padding_mode: as :func:`benchmark.core.spatial.warp` (zeros: outside reads 0).

    Returns:
        ``(B, C, *P)``.
    """
    aff = affine if affine.dim() == 3 else affine.unsqueeze(0)
    inv = torch.linalg.inv(aff.to(torch.float64))
    vox = _apply_affine(inv, points)
    disp = vox - identity_grid(points.shape[2:], points.device, points.dtype).unsqueeze(0)
    return warp(volume, disp, mode=mode, padding_mode=padding_mode)


def sample_patches(volume: torch.Tensor, affine: torch.Tensor, points: torch.Tensor, mode: str = "bilinear",
                   padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``K`` patches per image with one ``grid_sample`` for the whole batch.

    Args:
        volume: ``(B, C, *S)``.
        affine: ``(B, 4, 4)`` voxel→world.
        points: ``(B·K, 3, n1, n2, n3)`` world points (mm); patches ``b·K … b·K+K-1`` belong
            to image ``b``.

    Returns:
        ``(B·K, C, n1, n2, n3)``.
    """
    b = volume.shape[0]
    nk = points.shape[0]
    if nk % b:
        raise ValueError(f"{nk} patches for a batch of {b} images")
    k = nk // b
    n1, n2, n3 = points.shape[2:]
    # patches of image b side by side along the first spatial axis: (B, 3, K·n1, n2, n3)
    stacked = points.reshape(b, k, 3, n1, n2, n3).transpose(1, 2).reshape(b, 3, k * n1, n2, n3)
    out = sample_at_world(volume, affine, stacked, mode, padding_mode)
    c = out.shape[1]
    return out.reshape(b, c, k, n1, n2, n3).transpose(1, 2).reshape(nk, c, n1, n2, n3)


@dataclass
class PatchTransform:
    """One scale's map ``φ(p) = p + d(p)`` of ``N`` patches: affine part + dense residual.

    Attributes:
        frame: the patches.
        matrix: ``(N, 3, 3)`` ``A``, in normalised patch coordinates.
        shift: ``(N, 3)`` ``b``, in normalised patch coordinates.
        residual: ``(N, 3, n, n, n)`` dense part in patch voxels along the patch axes.
    """

    frame: PatchFrame
    matrix: torch.Tensor
    shift: torch.Tensor
    residual: torch.Tensor

    def displacement(self, pts: torch.Tensor) -> torch.Tensor:
        """World displacement ``d(p)`` (mm) at world points.

        Args:
            pts: ``(N, 3, *P)`` world mm, patch ``k``'s points in row ``k``.

        Returns:
            ``(N, 3, *P)`` mm: ``R (e ⊙ (A t + b) + step ⊙ r(i(p)))``; ``r`` trilinear,
            extended by its border value outside the patch.
        """
        f = self.frame
        nd = pts.dim() - 2
        view = (f.count, 3, *([1] * nd))
        t = f.world_to_normalised(pts)
        idx = (t + 0.5) * (f.size - 1)
        r = warp(self.residual, idx - identity_grid(pts.shape[2:], pts.device, pts.dtype).unsqueeze(0),
                 mode="bilinear", padding_mode="border")
        aff = torch.einsum("nij,nj...->ni...", self.matrix.to(pts), t) + self.shift.to(pts).reshape(view)
        local = f.extent.to(pts).reshape(view) * aff + f.step.to(pts).reshape(view) * r
        return torch.einsum("nij,nj...->ni...", f.rot.to(pts), local)

    def __call__(self, pts: torch.Tensor) -> torch.Tensor:
        return pts + self.displacement(pts)

    def select(self, sl: slice) -> "PatchTransform":
        """The patches ``sl``."""
        return PatchTransform(self.frame.select(sl), self.matrix[sl], self.shift[sl], self.residual[sl])


def apply_chain(transforms: Sequence[PatchTransform], pts: torch.Tensor) -> torch.Tensor:
    """``Φ(p) = φ_0(φ_1(… φ_{m-1}(p)))``: the finest (last) acts first. ``(N, 3, *P)`` mm."""
    q = pts
    for tr in reversed(transforms):
        q = tr(q)
    return q


def _window(t: torch.Tensor) -> torch.Tensor:
    """Smooth patch weight from normalised coordinates ``(N, 3, *P)``: ``Π max(cos²(π t), floor)``
    inside the patch, 0 outside. ``(N, *P)``."""
    inside = (t.abs() <= 0.5 + 1e-6).all(dim=1)
    w = torch.cos(math.pi * t.clamp(-0.5, 0.5)).square().clamp_min(_WINDOW_FLOOR).prod(dim=1)
    return w * inside.to(w.dtype)


def assemble_field(transform: PatchTransform, fixed_affine: torch.Tensor, shape: Sequence[int],
                   num: torch.Tensor | None = None, den: torch.Tensor | None = None,
                   max_points: int = 2**21) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted scatter-add of the patches' world displacements onto the fixed grid.

    For every patch, the fixed voxels of its bounding box (clipped to the grid; one box size
    for all patches, masked by the window) are visited, the patch's displacement :meth:`PatchTransform.displacement` is
    evaluated there and added with the window weight to ``num``; the weight to ``den``.

    Args:
        transform: ``N`` patches' maps.
        fixed_affine: ``(4, 4)`` voxel→world of the fixed grid.
        shape: fixed spatial shape ``(X, Y, Z)``.
        num, den: running sums ``(3, X·Y·Z)`` and ``(X·Y·Z,)`` to add to (new zeros if ``None``).
        max_points: voxels visited per group of patches (memory bound of the temporaries).

    Returns:
        ``(num, den)``; the averaged field is ``num / den`` where ``den > 0`` (mm).
    """
    f = transform.frame
    shape = tuple(int(s) for s in shape)
    nvox = shape[0] * shape[1] * shape[2]
    dev = transform.residual.device
    dtype = transform.residual.dtype
    if num is None:
        num = torch.zeros(3, nvox, device=dev, dtype=dtype)
    if den is None:
        den = torch.zeros(nvox, device=dev, dtype=dtype)
    af = fixed_affine.to(device=dev, dtype=torch.float64)
    size = torch.tensor(shape, device=dev, dtype=torch.float64).reshape(1, 3)
    # patch corners in fixed voxel coordinates -> per-patch integer box, clipped to the grid
    m = torch.linalg.inv(af).unsqueeze(0) @ f.index_to_world()
    corners = identity_grid((2, 2, 2), dev, torch.float64).reshape(3, 8) * (f.size - 1)
    cv = m[:, :3, :3] @ corners + m[:, :3, 3:]
    lo = torch.floor(cv.amin(dim=2) - 1e-6).clamp_min(0).minimum(size - 1)
    hi = torch.ceil(cv.amax(dim=2) + 1e-6).clamp_min(0).minimum(size - 1)
    dims = [int(v) for v in (hi - lo + 1).amax(dim=0).tolist()]
    box = dims[0] * dims[1] * dims[2]
    offsets = identity_grid(dims, dev, torch.float64).unsqueeze(0)
    size = size.reshape(1, 3, 1, 1, 1)
    # patches in groups of at most ~max_points visited voxels (bounds the memory)
    per = max(1, int(max_points) // box)
    for start in range(0, f.count, per):
        sl = slice(start, start + per)
        part = transform.select(sl)
        k = part.frame.count
        pos = lo[sl].reshape(k, 3, 1, 1, 1) + offsets
        valid = (pos <= size - 1).all(dim=1)
        world = _apply_affine(af, pos).to(dtype)
        w = _window(part.frame.world_to_normalised(world)) * valid.to(dtype)
        d = part.displacement(world)
        ip = pos.minimum(size - 1).long()
        flat = ((ip[:, 0] * shape[1] + ip[:, 1]) * shape[2] + ip[:, 2]).reshape(-1)
        num.index_add_(1, flat, (d * w.unsqueeze(1)).transpose(0, 1).reshape(3, -1))
        den.index_add_(0, flat, w.reshape(-1))
    return num, den


def world_disp_to_voxel_disp(world_disp: torch.Tensor, fixed_affine: torch.Tensor, moving_affine: torch.Tensor) -> torch.Tensor:
    """Dense world displacement on the fixed grid → the suite's voxel displacement.

    Args:
        world_disp: ``(1, 3, *S_f)`` ``D`` (mm): fixed voxel ``x`` corresponds to the world
            point ``A_f x + D(x)``.
        fixed_affine, moving_affine: ``(4, 4)`` voxel→world.

    Returns:
        ``(1, 3, *S_f)`` ``u(x) = A_m⁻¹ (A_f x + D(x)) − x`` in voxels, ``x + u(x)`` a
        moving voxel index (pull convention).
    """
    shape = world_disp.shape[2:]
    inv_m = torch.linalg.inv(moving_affine.to(torch.float64))
    m = inv_m @ fixed_affine.to(torch.float64)
    x = identity_grid(shape, world_disp.device, torch.float32).unsqueeze(0)
    lin = m[:3, :3] - torch.eye(3, dtype=torch.float64, device=m.device)
    mapped = torch.einsum("ij,bj...->bi...", lin.to(x), x) + m[:3, 3].to(x).reshape(1, 3, 1, 1, 1)
    return mapped + torch.einsum("ij,bj...->bi...", inv_m[:3, :3].to(x), world_disp.to(x))


# ----------------------------------------------------------------------------- network
def _resolve_factory(backbone: str | Callable[..., nn.Module] | nn.Module | None,
                     backbone_args: dict[str, Any] | None) -> Callable[[], nn.Module]:
    args = dict(backbone_args or {})
    if backbone is None or backbone == "systems.voxelmorph.VxmUNet":
        from systems.voxelmorph import VxmUNet

        args.setdefault("in_channels", 2)
        return lambda: VxmUNet(**args)
    if isinstance(backbone, nn.Module):
        return lambda: copy.deepcopy(backbone)
    if isinstance(backbone, str):
        try:
            target = import_object(backbone)
        except ClassPathError as exc:
            if exc.kind == "module":  # the import's own error, as before the one importer
                raise exc.__cause__ from None
            raise ValueError(f"backbone: {exc.reason}") from None
        return lambda: target(**args)
    if callable(backbone):
        return lambda: backbone(**args)
    raise TypeError(f"backbone must be None, a class path, a factory or an nn.Module, got {type(backbone).__name__}")


class PatchNet(nn.Module):
    """Backbone + heads for one scale: ``(moving, fixed) patches → (A, b, r)``.

    Args:
        backbone: module ``(N, 2, n, n, n) → (N, C, n, n, n)`` (input ``cat(moving, fixed)``).
        patch_size: ``n`` (used once to find ``C`` when the backbone has no ``out_channels``).
        affine_scale: multiplies the affine head's output (a small step for the 12 numbers).

        affine_max: bound of every affine number (``affine_max · tanh``; normalised units,
            0.25 = a quarter of the extent).
        residual_max: bound of the residual in patch voxels (``residual_max · tanh(r / residual_max)``;
            default ``patch_size / 4``).
        affine: build the affine head (``False``: no affine head, no parameters for it, the
            affine part is the identity; the ablation of the per-patch affine part).

    Forward: moving, fixed ``(N, 1, n, n, n)`` → ``matrix (N, 3, 3)``, ``shift (N, 3)``
    (normalised patch units) and ``residual (N, 3, n, n, n)`` (patch voxels).
    """

    def __init__(self, backbone: nn.Module, patch_size: int, affine_scale: float = 0.1, affine_max: float = 0.25,
                 residual_max: float | None = None, affine: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        c = getattr(backbone, "out_channels", None)
        if c is None:
            with torch.no_grad():
                c = backbone(torch.zeros(1, 2, patch_size, patch_size, patch_size)).shape[1]
        self.flow = nn.Conv3d(int(c), 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)
        self.affine_head = nn.Linear(int(c), 12) if affine else None
        if self.affine_head is not None:
            nn.init.zeros_(self.affine_head.weight)
            nn.init.zeros_(self.affine_head.bias)
        self.affine_scale = float(affine_scale)
        self.affine_max = float(affine_max)
        self.residual_max = float(patch_size) / 4 if residual_max is None else float(residual_max)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.backbone(torch.cat([moving, fixed], dim=1))
        # soft bounds (slope 1 at 0): a cascade whose coarse map runs off the image gets no
        # similarity gradient back, so unbounded outputs can run away at larger learning rates
        raw = self.flow(feats).contiguous().float()  # heads' outputs float32 (systems.speed)
        residual = self.residual_max * torch.tanh(raw / self.residual_max)
        pooled = feats.mean(dim=tuple(range(2, feats.dim())))
        if self.affine_head is None:  # ablation: no affine part (identity), no parameters
            params = pooled.new_zeros(pooled.shape[0], 12)
        elif self.affine_max > 0:
            params = self.affine_max * torch.tanh(self.affine_head(pooled).float() * (self.affine_scale / self.affine_max))
        else:  # dense part only
            params = self.affine_head(pooled).float() * 0.0
        return params[:, :9].reshape(-1, 3, 3), params[:, 9:], residual


def negative_jacobian_penalty(coords: torch.Tensor) -> torch.Tensor:
    """Mean of ``relu(-det J)`` of a coordinate map by forward differences.

    Args:
        coords: ``(N, 3, n, n, n)`` mapped positions in units where the identity map has
            ``J = I`` (here: patch voxels along the patch axes).

    Returns:
        Scalar ≥ 0; 0 exactly when no cell folds.
    """
    c = coords[:, :, :-1, :-1, :-1]
    j0 = coords[:, :, 1:, :-1, :-1] - c
    j1 = coords[:, :, :-1, 1:, :-1] - c
    j2 = coords[:, :, :-1, :-1, 1:] - c
    det = (j0[:, 0] * (j1[:, 1] * j2[:, 2] - j1[:, 2] * j2[:, 1])
           - j1[:, 0] * (j0[:, 1] * j2[:, 2] - j0[:, 2] * j2[:, 1])
           + j2[:, 0] * (j0[:, 1] * j1[:, 2] - j0[:, 2] * j1[:, 1]))
    return torch.relu(-det).mean()


# ----------------------------------------------------------------------------- system
class PatchMorph(RegistrationSystem):
    """PatchMorph as a suite system (module docstring: geometry, cascade, loss, inference).

    Args:
        lambda_: weight of the patch-wise regulariser against the similarity.
        lr: Adam learning rate.
        patch_size: sample points per patch axis ``n`` at every scale (32; 16 for CPU runs).
        extents_mm: patch edge length per scale, coarse to fine, mm; each a number (cube) or
            three numbers (per patch axis). Non-increasing.
        extent_factor: multiplies every extent (a single knob for sweeps).
        backbone: per-patch network: ``None`` / ``"systems.voxelmorph.VxmUNet"`` (default),
            any ``"module.Class"`` path or factory called as ``backbone(**backbone_args)``, or
            an ``nn.Module`` (deep-copied per scale). Input ``(N, 2, n, n, n)``, output
            ``(N, C, n, n, n)``.
        backbone_args: keyword arguments of the backbone (default VxmUNet widths otherwise).
        train_patches: random patch pairs per image pair and training step.
        ncc_window: local NCC window (patch voxels).
        fold_weight: weight of the negative-Jacobian term inside the regulariser.
        affine_scale: step size of the affine head.
        affine_max: bound of the affine numbers (normalised patch units; 0 = no affine part).
        residual_max: bound of the dense residual, patch voxels (default ``patch_size / 4``).
        rotate_deg: random patch rotation in training (± degrees about a random axis; 0 = the
            fixed image's axes).
        foreground_threshold: training centres at fixed voxels above this fraction of the
            fixed image's maximum.
        infer_stride: lattice cell size at inference as a fraction of the extent (≤ 0.5
            guarantees every fixed voxel is covered).
        infer_passes: jittered lattices per scale at inference (more patches, more averaging).
        infer_chunk: patches per network call at inference (bounds inference memory).
        seed: seed of the inference patch positions.
        n_scales: ablation switch of the cascade: use only the ``n_scales`` finest entries of
            ``extents_mm`` (``None``: all, the method). ``n_scales=1`` is a single-scale patch
            registration at the finest patch size (the resolution of the full method's last
            scale, without its coarse context); fewer scales = fewer networks.
        affine: ablation switch of the per-patch affine part: ``True`` (the method) gives
            every scale's network its affine head; ``False`` removes the heads (the maps are
            identity + dense residual only). ``affine_max = 0`` also turns the affine part
            off but keeps the (unused) head's parameters.

    Ablation variants (``variants`` of a grid config, see :mod:`benchmark.variants`) change
    one of the two switches and nothing else: training loss, patches and inference stay as
    in the full method.
    """

    learns: ClassVar[bool] = True
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lambda_": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
        "extent_factor": {"type": "float", "low": 0.75, "high": 1.5},
    }
    #: Regularisation argument and default range of ``regbench arc`` (log-spaced values).
    regularisation: ClassVar[tuple[str, float, float]] = ("lambda_", 0.1, 10.0)

    def __init__(
        self,
        lambda_: float = 1.0,
        lr: float = 1e-3,
        patch_size: int = 32,
        extents_mm: Sequence[float | Sequence[float]] = (192.0, 96.0, 32.0),
        extent_factor: float = 1.0,
        backbone: str | Callable[..., nn.Module] | nn.Module | None = None,
        backbone_args: dict[str, Any] | None = None,
        train_patches: int = 2,
        ncc_window: int = 9,
        fold_weight: float = 10.0,
        affine_scale: float = 0.1,
        affine_max: float = 0.25,
        residual_max: float | None = None,
        rotate_deg: float = 0.0,
        foreground_threshold: float = 0.1,
        infer_stride: float = 0.5,
        infer_passes: int = 1,
        infer_chunk: int = 32,
        seed: int = 0,
        n_scales: int | None = None,
        affine: bool = True,
        warmup_calls: int | None = None,
        compute_hd95: bool = True,
        compute_ndv: bool = True,
        compile: bool | str = False,
    ) -> None:
        super().__init__(lambda_=lambda_, lr=lr, warmup_calls=warmup_calls, compute_hd95=compute_hd95, compute_ndv=compute_ndv,
                         compile=compile)
        ignore = [] if backbone is None or isinstance(backbone, str) else ["backbone"]
        self.save_hyperparameters(ignore=ignore)
        if int(patch_size) < 4:
            raise ValueError(f"patch_size must be >= 4, got {patch_size}")
        if not 0 < float(infer_stride) <= 0.5:
            raise ValueError(f"infer_stride must be in (0, 0.5] so that patches cover every voxel, got {infer_stride}")
        if int(train_patches) < 1 or int(infer_passes) < 1 or int(infer_chunk) < 1:
            raise ValueError("train_patches, infer_passes and infer_chunk must be >= 1")
        ext = []
        for e in extents_mm:
            v = [float(e)] * 3 if isinstance(e, (int, float)) else [float(x) for x in e]
            if len(v) != 3 or min(v) <= 0:
                raise ValueError(f"extents_mm: each entry is a positive number or three; got {e!r}")
            ext.append([x * float(extent_factor) for x in v])
        if not ext:
            raise ValueError("extents_mm: at least one scale")
        if n_scales is not None:
            if not 1 <= int(n_scales) <= len(ext):
                raise ValueError(f"n_scales must be in [1, {len(ext)}] (the number of extents_mm), got {n_scales}")
            ext = ext[len(ext) - int(n_scales):]
        for a, b in zip(ext, ext[1:]):
            if any(y > x + 1e-9 for x, y in zip(a, b)):
                raise ValueError(f"extents_mm must shrink from coarse to fine, got {list(extents_mm)}")
        self.extents = ext
        self.patch_size = int(patch_size)
        self.train_patches = int(train_patches)
        self.fold_weight = float(fold_weight)
        self.rotate_deg = float(rotate_deg)
        self.foreground_threshold = float(foreground_threshold)
        self.infer_stride = float(infer_stride)
        self.infer_passes = int(infer_passes)
        self.infer_chunk = int(infer_chunk)
        self.seed = int(seed)
        if backbone is None and backbone_args is None:
            backbone_args = {"enc": [16, 32, 32, 32], "dec": [32, 32, 32, 32, 32, 16, 16]}
        factory = _resolve_factory(backbone, backbone_args)
        self.affine = bool(affine)
        self.nets = nn.ModuleList(PatchNet(factory(), self.patch_size, affine_scale, affine_max, residual_max, self.affine)
                                  for _ in ext)
        self.similarity = LocalNCC(ncc_window)
        #: Patches per scale in the last ``register`` call (for the performance harness).
        self.last_patch_counts: list[int] = []

    # ---- patches ------------------------------------------------------------------------
    def _extent(self, s: int, n: int, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.extents[s], dtype=torch.float64, device=device).expand(n, 3).clone()

    def train_frames(self, fixed: torch.Tensor, fixed_affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random training patch centres and orientations, ``train_patches`` per image.

        Centres: for every patch 32 random voxels of the fixed image; the first above
        ``foreground_threshold · max`` is taken (the first candidate when none is). No pass
        over the image is made, so the cost does not depend on its size.

        Returns:
            ``centre (B·K, 3)`` mm and ``rot (B·K, 3, 3)``, float64.
        """
        b, k, m = fixed.shape[0], self.train_patches, 32
        shape = torch.tensor(fixed.shape[2:], dtype=torch.float64)
        cand = (torch.rand(b, k, m, 3, dtype=torch.float64) * (shape - 1)).round()
        ci = cand.long().to(fixed.device)
        bi = torch.arange(b, device=fixed.device).view(b, 1, 1).expand(b, k, m)
        vals = fixed[bi, 0, ci[..., 0], ci[..., 1], ci[..., 2]]
        thr = self.foreground_threshold * fixed.detach().reshape(b, -1).amax(dim=1).view(b, 1, 1)
        ok = vals > thr
        first = torch.where(ok.any(dim=2), ok.float().argmax(dim=2), torch.zeros_like(ok[..., 0], dtype=torch.long))
        vox = torch.gather(cand.to(fixed.device), 2, first.view(b, k, 1, 1).expand(b, k, 1, 3))[:, :, 0]
        aff = fixed_affine.to(torch.float64)
        centre = torch.einsum("bij,bkj->bki", aff[:, :3, :3], vox) + aff[:, None, :3, 3]
        rot = base_orientation(aff).repeat_interleave(k, 0)
        if self.rotate_deg > 0:
            rot = rot @ random_rotations(b * k, self.rotate_deg).to(rot.device)
        return centre.reshape(b * k, 3), rot

    def inference_frames(self, shape: Sequence[int], fixed_affine: torch.Tensor, scale: int,
                         generator: torch.Generator) -> PatchFrame:
        """Random overlapping patches covering the fixed image for one scale.

        A lattice over the fixed image's bounding box in the frame of its axes, cells at most
        ``infer_stride · extent`` wide, one uniformly random centre per cell, ``infer_passes``
        times.
        """
        aff = fixed_affine.to(torch.float64).cpu()
        rot = base_orientation(aff)
        corners = identity_grid((2, 2, 2), None, torch.float64).reshape(3, 8) * (torch.tensor(shape, dtype=torch.float64) - 1).view(3, 1)
        world = aff[:3, :3] @ corners + aff[:3, 3:]
        local = rot.T @ world
        lo, hi = local.amin(dim=1), local.amax(dim=1)
        ext = torch.tensor(self.extents[scale], dtype=torch.float64)
        counts = torch.clamp(torch.ceil((hi - lo) / (self.infer_stride * ext) - 1e-9), min=1).long()
        cell = (hi - lo) / counts
        grid = identity_grid([int(c) for c in counts], None, torch.float64).reshape(3, -1).T
        centres = []
        for _ in range(self.infer_passes):
            jitter = torch.rand(grid.shape, generator=generator, dtype=torch.float64)
            centres.append(lo + (grid + jitter) * cell)
        loc = torch.cat(centres)
        n = loc.shape[0]
        dev = fixed_affine.device
        return PatchFrame((loc @ rot.T).to(dev), ext.expand(n, 3).clone().to(dev), rot.expand(n, 3, 3).clone().to(dev), self.patch_size)

    # ---- training ------------------------------------------------------------------------
    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fixed, moving = batch["fixed"], batch["moving"]
        af, am = batch["fixed_affine"], batch["moving_affine"]
        centre, rot = self.train_frames(fixed, af)
        n = centre.shape[0]
        transforms: list[PatchTransform] = []
        sims, regs, folds = [], [], []
        for s, net in enumerate(self.nets):
            frame = PatchFrame(centre, self._extent(s, n, centre.device), rot, self.patch_size)
            pts = frame.world_points(fixed.dtype)
            fpatch = sample_patches(fixed, af, pts)
            mpatch = sample_patches(moving, am, apply_chain(transforms, pts))
            matrix, shift, residual = net(mpatch, fpatch)
            tr = PatchTransform(frame, matrix, shift, residual)
            transforms.append(tr)
            mapped = apply_chain(transforms, pts)
            warped = sample_patches(moving, am, mapped)
            sims.append(self.similarity(fpatch, warped))
            folds.append(negative_jacobian_penalty(frame.world_to_patch_voxels(mapped)))
            regs.append(diffusion(residual))
        sim = torch.stack(sims).sum()
        reg = torch.stack(regs).sum()
        fold = torch.stack(folds).sum()
        loss = sim + self.lambda_ * (reg + self.fold_weight * fold)
        parts = {"sim": sim.detach(), "reg": reg.detach(), "fold": fold.detach()}
        parts.update({f"sim_s{s}": v.detach() for s, v in enumerate(sims)})
        return loss, parts

    # ---- inference -----------------------------------------------------------------------
    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        """``(B, 3, *S_fixed)`` voxel displacement, pull; ``x + u(x)`` is a moving voxel index
        (see the module docstring for cross-grid pairs)."""
        with torch.no_grad():
            out = [
                self._register_one(batch["fixed"][b : b + 1], batch["moving"][b : b + 1],
                                   batch["fixed_affine"][b], batch["moving_affine"][b])
                for b in range(batch["fixed"].shape[0])
            ]
        return torch.cat(out)

    def _register_one(self, fixed: torch.Tensor, moving: torch.Tensor, af: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        shape = tuple(fixed.shape[2:])
        gen = torch.Generator().manual_seed(self.seed)
        world_disp = torch.zeros(1, 3, *shape, device=fixed.device, dtype=fixed.dtype)
        inv_f = torch.linalg.inv(af.to(torch.float64))[:3, :3].to(fixed)
        self.last_patch_counts = []
        for s, net in enumerate(self.nets):
            frames = self.inference_frames(shape, af, s, gen)
            self.last_patch_counts.append(frames.count)
            num = den = None
            for start in range(0, frames.count, self.infer_chunk):
                frame = frames.select(slice(start, start + self.infer_chunk))
                pts = frame.world_points(fixed.dtype)
                fpatch = sample_patches(fixed, af[None], pts)
                # the current world map G(p) = p + D(A_f^-1 p), all patches in one sampling call
                prev = pts + sample_patches(world_disp, af[None], pts, padding_mode="border")
                mpatch = sample_patches(moving, am[None], prev)
                matrix, shift, residual = net(mpatch, fpatch)
                num, den = assemble_field(PatchTransform(frame, matrix, shift, residual), af, shape, num, den)
            assert num is not None and den is not None
            d = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num)).reshape(1, 3, *shape)
            # G <- G ∘ φ_s:  D_new(x) = d(x) + D(x + A_f^-1 d(x))
            d_vox = torch.einsum("ij,bj...->bi...", inv_f, d)
            world_disp = d + warp(world_disp, d_vox, mode="bilinear", padding_mode="border")
        return world_disp_to_voxel_disp(world_disp, af, am)
