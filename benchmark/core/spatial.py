"""Core spatial operations: grids, warping, composition, integration, affines.

Conventions (the single source of truth for the whole suite, see README "Conventions"):

* Image tensors are ``(B, C, *spatial)`` float32, with the spatial axes in the array order
  nibabel gives (no transposes on load). ``ndim`` is 2 or 3.
* A displacement ``u`` is ``(B, ndim, *spatial)`` in **voxels of the fixed grid**; channel
  ``d`` is the shift along array axis ``d``.
* Pull convention: ``warped(x) = moving(x + u(x))`` (VoxelMorph / MONAI / Learn2Reg).
* ``torch.nn.functional.grid_sample`` wants normalised ``[-1, 1]`` coordinates in the
  *reversed* axis order (x = last array axis) with ``align_corners=True``, i.e. voxel
  ``0`` maps to ``-1`` and voxel ``N-1`` to ``+1``. The reversal and scaling happen in
  one place per kind of input: displacements in ``_sampling_grid`` (behind
  :func:`disp_to_grid` and :func:`warp`), points in :func:`voxel_to_grid_coords`, and
  back in :func:`grid_to_disp`.
* Composition: ``(u ∘ v)(x) = v(x) + u(x + v(x))`` — apply ``v`` first, then ``u``
  (in pull terms: ``warp(warp(I, u), v) ≈ warp(I, compose(u, v))``).
* Affines are 4×4 (3×3 in 2D) voxel→world matrices (NIfTI, RAS, mm).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "identity_grid",
    "voxel_to_grid_coords",
    "disp_to_grid",
    "grid_to_disp",
    "warp",
    "compose",
    "integrate_velocity",
    "resize_field",
    "resize_image",
    "affine_to_disp",
    "voxel_to_world",
    "world_to_voxel",
    "spacing_from_affine",
    "disp_to_mm",
    "mm_to_disp",
    "gaussian_kernel1d",
    "gaussian_smooth",
]


def _spatial_ndim(x: torch.Tensor) -> int:
    nd = x.dim() - 2
    if nd not in (2, 3):
        raise ValueError(f"expected a (B, C, *spatial) tensor with 2 or 3 spatial axes, got shape {tuple(x.shape)}")
    return nd


def identity_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel coordinates of every grid point.

    Args:
        shape: spatial shape ``(*spatial)``.

    Returns:
        ``(ndim, *spatial)`` tensor; channel ``d`` holds the index along array axis ``d``.
    """
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _norm_factor(n: int) -> float:
    """align_corners=True: voxel ``i`` of an axis of ``n`` → ``2 i / (n - 1) - 1`` (this factor
    times ``i``, minus 1). A singleton axis maps to -1 (``i`` is 0)."""
    return 2.0 / max(int(n) - 1, 1)


def _norm_scale(shape: Sequence[int], device, dtype) -> torch.Tensor:
    return torch.tensor([_norm_factor(n) for n in shape], device=device, dtype=dtype)


def voxel_to_grid_coords(points: torch.Tensor, shape: Sequence[int], vector: bool = False) -> torch.Tensor:
    """Voxel positions (array axis order) → ``grid_sample`` coordinates (``align_corners=True``).

    The one place where voxel index ``i`` becomes ``2 i / (N − 1) − 1`` and the axis order is
    reversed to grid_sample's (x, y[, z]).

    Args:
        points: ``(..., ndim)`` voxel indices of a volume of ``shape``; with ``vector=True``
            differences of positions (no offset applied).
        shape: the volume's spatial shape.

    Returns:
        ``(..., ndim)`` normalised coordinates, last axis reversed.
    """
    scale = _norm_scale(shape, points.device, points.dtype)
    out = points * scale if vector else points * scale - 1.0
    return out.flip(-1)


def _sampling_grid(disp: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
    """``grid_sample`` coordinates of ``x + u(x)`` on the grid of ``disp``, read in a volume of
    ``in_shape`` (``align_corners=True``; last axis reversed to (x, y[, z])).

    Component ``k`` (array axis ``a = ndim - 1 - k``) is ``(i_a + u_a) · s_a - 1`` with
    ``s_a = 2 / (N_a - 1)``: each displacement channel plus a broadcast 1-D ramp, scaled and
    shifted in place, then one stack. Forming ``identity + u`` first, then scaling, shifting and
    flipping, allocated five full fields where this allocates two (and the backward pass
    stays at two): fresh memory costs page faults on CPU, and the integration of a
    velocity warps seven times per call.

    Args:
        disp: ``(B, ndim, *spatial_out)`` displacement in voxels.
        in_shape: spatial shape of the volume that will be sampled.

    Returns:
        ``(B, *spatial_out, ndim)``.
    """
    nd = disp.shape[1]
    out_shape = disp.shape[2:]
    chans = disp.unbind(1)  # (one backward stack; per-channel indexing would allocate a zero field per channel)
    comps = []
    for a in reversed(range(nd)):
        s = _norm_factor(in_shape[a])
        view = [1] * (nd + 1)
        view[a + 1] = out_shape[a]
        ramp = torch.arange(out_shape[a], device=disp.device, dtype=disp.dtype).view(view)
        # (i + u) · s - 1, in this order: the textbook construction's values, bit for bit in
        # float32 and float64 (in half precision the scale is not rounded to it first)
        comps.append(torch.add(ramp, chans[a]).mul_(s).sub_(1.0))
    return torch.stack(comps, dim=-1)


def disp_to_grid(disp: torch.Tensor) -> torch.Tensor:
    """Voxel displacement → ``grid_sample`` sampling grid (pull, ``align_corners=True``).

    Args:
        disp: ``(B, ndim, *spatial)`` displacement in voxels.

    Returns:
        ``(B, *spatial, ndim)`` normalised coordinates of ``x + u(x)`` in ``[-1, 1]``, last
        axis in grid_sample's reversed (x, y[, z]) order.
    """
    nd = _spatial_ndim(disp)
    shape = disp.shape[2:]
    if disp.shape[1] != nd:
        raise ValueError(f"displacement has {disp.shape[1]} channels for {nd} spatial axes")
    return _sampling_grid(disp, shape)


def grid_to_disp(grid: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`disp_to_grid`.

    Args:
        grid: ``(B, *spatial, ndim)`` normalised xyz sampling coordinates.

    Returns:
        ``(B, ndim, *spatial)`` displacement in voxels.
    """
    nd = grid.shape[-1]
    shape = grid.shape[1:-1]
    pos_norm = grid.flip(-1).movedim(-1, 1)
    scale = _norm_scale(shape, grid.device, grid.dtype).view(1, nd, *([1] * nd))
    pos = (pos_norm + 1.0) / scale
    return pos - identity_grid(shape, grid.device, grid.dtype).unsqueeze(0)


def warp(
    image: torch.Tensor,
    disp: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Pull-warp ``image`` by ``disp``: ``out(x) = image(x + disp(x))``.

    Args:
        image: ``(B, C, *spatial_in)`` moving image or label map. Integer label maps are
            always warped with ``mode="nearest"`` (whatever ``mode`` says, so that label
            ids are never blended) and returned in their dtype.
        disp: ``(B, ndim, *spatial_out)`` displacement in voxels of the output (fixed) grid.
            Positions ``x + u(x)`` are read as voxel indices of ``image``; normally
            ``spatial_in == spatial_out``. ``B`` may be 1 for either and broadcast.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``. With ``"zeros"``,
            bilinear interpolates towards 0 within one voxel outside the grid (scipy
            ``grid-constant``), while nearest reads 0 anywhere outside ``[0, N-1]`` (scipy
            order 0 ``constant``, as the Learn2Reg evaluation warps labels).

    Returns:
        ``(B, C, *spatial_out)``.
    """
    nd = _spatial_ndim(image)
    if disp.dim() != nd + 2 or disp.shape[1] != nd:
        raise ValueError(f"image {tuple(image.shape)} and displacement {tuple(disp.shape)} do not match")
    in_shape = image.shape[2:]
    out_shape = disp.shape[2:]
    dtype = image.dtype
    if not image.is_floating_point():
        mode = "nearest"
    img = image if image.is_floating_point() else image.to(disp.dtype)
    if img.shape[0] != disp.shape[0]:
        b = max(img.shape[0], disp.shape[0])
        img = img.expand(b, *img.shape[1:])
        disp = disp.expand(b, *disp.shape[1:])
    grid = _sampling_grid(disp, in_shape)
    out = F.grid_sample(img.to(grid.dtype), grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    if mode == "nearest" and padding_mode == "zeros":
        # Learn2Reg / scipy order-0 'constant' semantics: a position outside [0, N-1] on any
        # axis reads background, also within the half-voxel rim that rounding would pull in.
        pos = identity_grid(out_shape, disp.device, disp.dtype).unsqueeze(0) + disp
        upper = torch.tensor([n - 1 for n in in_shape], device=pos.device, dtype=pos.dtype).view(1, nd, *([1] * nd))
        inside = ((pos >= 0) & (pos <= upper)).all(dim=1, keepdim=True)
        out = out * inside.to(out.dtype)
    if not image.is_floating_point():
        out = out.round().to(dtype)
    return out


def compose(u: torch.Tensor, v: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Composition ``(u ∘ v)(x) = v(x) + u(x + v(x))``: ``v`` is applied first.

    ``warp(warp(I, u), v)`` equals ``warp(I, compose(u, v))`` up to interpolation.

    Args:
        u, v: ``(B, ndim, *spatial)`` displacements in voxels.
        padding_mode: how ``u`` is extended outside the grid (``"border"`` by default, so a
            field that is constant near the edge stays constant rather than dropping to 0).

    Returns:
        ``(B, ndim, *spatial)``.
    """
    return v + warp(u, v, mode="bilinear", padding_mode=padding_mode)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring of a stationary velocity field: ``exp(v)``.

    Args:
        velocity: ``(B, ndim, *spatial)`` in voxels.
        steps: number of squarings; ``v`` is first divided by ``2**steps``.

    Returns:
        ``(B, ndim, *spatial)`` displacement of the time-1 flow.
    """
    if steps < 0:
        raise ValueError("steps must be >= 0")
    disp = velocity / (2.0**steps)
    for _ in range(steps):
        disp = compose(disp, disp)
    return disp


def resize_field(disp: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a displacement to another grid over the same field of view, rescaling magnitudes.

    The grids share their corner voxels (``align_corners=True`` geometry), so one voxel of
    the old grid is ``(new - 1) / (old - 1)`` voxels of the new one along each axis.

    Args:
        disp: ``(B, ndim, *spatial)`` in voxels of its own grid.
        size: new spatial shape.

    Returns:
        ``(B, ndim, *size)`` in voxels of the new grid.
    """
    nd = _spatial_ndim(disp)
    size = tuple(int(s) for s in size)
    if len(size) != nd:
        raise ValueError(f"size {size} has {len(size)} axes, displacement has {nd}")
    old = disp.shape[2:]
    if tuple(old) == size:
        return disp
    mode = "trilinear" if nd == 3 else "bilinear"
    out = F.interpolate(disp, size=size, mode=mode, align_corners=True)
    factors = [(n - 1) / max(o - 1, 1) for n, o in zip(size, old)]
    scale = torch.tensor(factors, device=disp.device, dtype=disp.dtype).view(1, nd, *([1] * nd))
    return out.mul_(scale)  # in place: interpolation's backward does not read its output


def resize_image(image: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resample an image to ``size`` over the same field of view (``align_corners=True``).

    Args:
        image: ``(B, C, *spatial)``.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"`` (labels).
    """
    nd = _spatial_ndim(image)
    size = tuple(int(s) for s in size)
    if mode == "nearest":
        # New voxel i sits at old voxel i·(old-1)/(new-1); sample there with the one warp.
        old = image.shape[2:]
        f = torch.tensor([(o - 1) / max(n - 1, 1) for o, n in zip(old, size)], device=image.device)
        ident = identity_grid(size, image.device)
        disp = (ident * f.view(nd, *([1] * nd)) - ident).unsqueeze(0)
        return warp(image, disp, mode="nearest", padding_mode="border")
    m = "trilinear" if nd == 3 else "bilinear"
    return F.interpolate(image, size=size, mode=m, align_corners=True)


def _as_tensor(a, device=None, dtype=torch.float64) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(device=device or a.device, dtype=dtype)
    return torch.as_tensor(np.asarray(a), device=device, dtype=dtype)


def affine_to_disp(matrix: torch.Tensor | np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """Dense displacement of a voxel-space affine map ``x ↦ A x + t``.

    Args:
        matrix: ``(ndim+1, ndim+1)`` (or ``(B, ndim+1, ndim+1)``) homogeneous matrix acting on
            voxel indices of the fixed grid and giving voxel indices of the moving grid.
        shape: spatial shape of the fixed grid.

    Returns:
        ``(B, ndim, *shape)`` float32 displacement ``A x + t - x``.
    """
    m = _as_tensor(matrix, dtype=torch.float32)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    nd = len(shape)
    if m.shape[-2:] != (nd + 1, nd + 1):
        raise ValueError(f"matrix shape {tuple(m.shape)} does not fit a {nd}D grid")
    x = identity_grid(shape, m.device, torch.float32).reshape(nd, -1)
    y = torch.einsum("bij,jn->bin", m[:, :nd, :nd], x) + m[:, :nd, nd:]
    return (y - x.unsqueeze(0)).reshape(m.shape[0], nd, *shape)


def voxel_to_world(points: torch.Tensor | np.ndarray, affine: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Map voxel indices to world (mm) through a voxel→world affine.

    Args:
        points: ``(N, ndim)`` voxel coordinates (array axis order).
        affine: ``(ndim+1, ndim+1)``.

    Returns:
        ``(N, ndim)`` float64 world coordinates.
    """
    p = _as_tensor(points)
    a = _as_tensor(affine, device=p.device)
    nd = p.shape[-1]
    return p @ a[:nd, :nd].T + a[:nd, nd]


def world_to_voxel(points: torch.Tensor | np.ndarray, affine: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Inverse of :func:`voxel_to_world`: ``(N, ndim)`` mm → ``(N, ndim)`` voxel indices (float64)."""
    a = _as_tensor(affine)
    return voxel_to_world(points, torch.linalg.inv(a))


def spacing_from_affine(affine: torch.Tensor | np.ndarray) -> tuple[float, ...]:
    """Voxel sizes in mm: the column norms of the affine's linear part."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    nd = a.shape[0] - 1
    return tuple(float(s) for s in np.linalg.norm(a[:nd, :nd], axis=0))


def disp_to_mm(disp: torch.Tensor, affine: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Voxel displacement → physical displacement vectors in world mm.

    ``A_lin @ u(x)``: the world-space vector from a fixed point to its correspondence,
    valid when fixed and moving share the affine (the usual Learn2Reg setting).

    Args:
        disp: ``(B, ndim, *spatial)`` voxels.
        affine: ``(ndim+1, ndim+1)`` voxel→world.

    Returns:
        ``(B, ndim, *spatial)`` in mm, channel ``d`` = world axis ``d`` (RAS).
    """
    nd = disp.shape[1]
    a = _as_tensor(affine, device=disp.device, dtype=disp.dtype)[:nd, :nd]
    return torch.einsum("ij,bj...->bi...", a, disp)


def mm_to_disp(disp_mm: torch.Tensor, affine: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Inverse of :func:`disp_to_mm`: world mm vectors → voxel displacement."""
    nd = disp_mm.shape[1]
    a = _as_tensor(affine, dtype=torch.float64)[:nd, :nd]
    inv = torch.linalg.inv(a).to(device=disp_mm.device, dtype=disp_mm.dtype)
    return torch.einsum("ij,bj...->bi...", inv, disp_mm)


def gaussian_kernel1d(sigma: float, truncate: float = 3.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1D Gaussian of standard deviation ``sigma`` voxels, radius ``ceil(truncate·sigma)``."""
    radius = max(int(np.ceil(truncate * sigma)), 1)
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)
    return k / k.sum()


def gaussian_smooth(x: torch.Tensor, sigma: float | Sequence[float], truncate: float = 3.0) -> torch.Tensor:
    """Separable Gaussian smoothing of every channel, replicate padding.

    Args:
        x: ``(B, C, *spatial)``.
        sigma: standard deviation in voxels, one per spatial axis or a scalar; 0 skips an axis.
    """
    nd = _spatial_ndim(x)
    sigmas = [float(sigma)] * nd if np.isscalar(sigma) else [float(s) for s in sigma]
    b, c = x.shape[:2]
    # All B*C maps as channels of one sample, filtered by a grouped (depthwise) convolution:
    # same result as a batch of single-channel convolutions, 2-3x faster on CPU.
    out = x.reshape(1, b * c, *x.shape[2:])
    conv = F.conv3d if nd == 3 else F.conv2d
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        k = gaussian_kernel1d(s, truncate, x.device, x.dtype)
        r = (k.numel() - 1) // 2
        shape = [1, 1] + [1] * nd
        shape[2 + axis] = k.numel()
        pad = [0, 0] * nd
        # F.pad takes pairs from the last axis backwards.
        pad[2 * (nd - 1 - axis)] = r
        pad[2 * (nd - 1 - axis) + 1] = r
        weight = k.view(shape).expand(b * c, *shape[1:])
        out = conv(F.pad(out, pad, mode="replicate"), weight, groups=b * c)
    return out.reshape(b, c, *x.shape[2:])
