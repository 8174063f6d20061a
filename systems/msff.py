"""MSFF: multi-scale feature fusion pyramid for unsupervised deformable registration.

Written for this suite from the description of arXiv 2408.05717 (the seed method reported on
LUMIR: validation Dice 0.7727) and the notes in ``docs/methods.md``; no code of the authors was
available. The known structure:

* a **shared encoder** applied to the moving and the fixed image separately, with one set of
  weights (here both images go through it as one batch of ``2B``), giving features at 5
  scales ``1, 1/2, 1/4, 1/8, 1/16``;
* a **shared auxiliary decoder** (a U-Net decoder over one image's encoder features, again
  one set of weights for both images) giving multi-scale high-level features of each image;
* a **5-scale pyramid decoder**: at the coarsest scale a fusion block over the features of
  both images predicts the initial field; at each finer scale the field is upsampled
  (:func:`upsample_pooled_field`, in the max-pooled grids' layout), the moving image's encoder and auxiliary
  features are warped by it (:func:`benchmark.core.spatial.warp`), a **multi-scale feature
  fusion block** (global channel attention + local spatial attention) fuses the encoder
  features and the auxiliary features of both images with the current field, and a flow
  head predicts a residual field that is composed onto it
  (``field = compose(up(field), residual)``: the residual acts first, see
  :func:`benchmark.core.spatial.compose`), up to full resolution;
* unsupervised loss ``-local NCC + lambda_ · diffusion``.

Tensor conventions are the suite's: images ``(B, 1, X, Y, Z)``; displacements
``(B, 3, X, Y, Z)`` in voxels of the fixed grid, pull (``warped = warp(moving, disp)``).
Inputs whose sizes are not multiples of ``2**(levels-1)`` (16) are zero-padded at the end of
each axis to the next multiple and the field is cropped back (a displacement in voxels is
unchanged by padding at the end of the grid).

Cost (``regbench perf systems --only msff --repeats 3 --threads 2``, 160×224×192, CPU, the
idle 2-core machine): a training step (forward, backward, Adam) takes 40.3 s (64.8 s of
process CPU time) against VoxelMorph's 20.4 s (37.2), peak RSS 7.4 GB against 4.5 GB (2.5 and
1.5 GB of them the process before the step, which measures MSFF first); inference 10.2 s
against 5.5 s. Convolutions run on channels-last
activations (oneDNN), padded with zero channels where PyTorch would fall back to its slow
native kernel (:func:`_fast_in_channels`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.core.losses import LocalNCC, diffusion
from benchmark.core.spatial import compose, integrate_velocity, warp
from systems.base import RegistrationSystem
from systems.speed import NATIVE_CONV_LIMIT, conv3d_float32_if_unsafe, conv3d_k3
from systems.voxelmorph import up_conv_weight

__all__ = ["ConvAct", "UpCatConv", "SharedEncoder", "AuxiliaryDecoder", "FusionBlock", "MSFFNet", "MSFF"]

_LEAKY_SLOPE = 0.2


#: Convolutions with fewer input channels get zero channels up to this count (oneDNN's
#: weight gradient is an order of magnitude slower with 1 or 2 input channels than with 3).
_MIN_FAST_IN_CHANNELS = 3


def _leaky(x: torch.Tensor) -> torch.Tensor:
    """LeakyReLU(0.2) in place (autograd keeps only the output for the backward)."""
    return F.leaky_relu(x, _LEAKY_SLOPE, inplace=True)


def _fast_in_channels(shape: Sequence[int]) -> int:
    """Input channel count at which oneDNN computes a convolution of an input of ``shape``.

    PyTorch hands problems with ``N·C·D·H <= 20480`` (batch 1) to a native kernel whose
    backward is 5–10× slower than oneDNN's (e.g. 8 channels at 48³: 0.37 s against 0.05 s, one
    thread). Zero input channels (input and weight) lift such a problem over the limit when
    that costs at most a quarter more work; inputs with 1 or 2 channels are padded to 3.
    """
    n, c, d, h = (int(v) for v in shape[:4])
    want = max(c, _MIN_FAST_IN_CHANNELS)
    if n == 1 and n * want * d * h <= NATIVE_CONV_LIMIT:
        lifted = NATIVE_CONV_LIMIT // (n * d * h) + 1
        if lifted <= 1.25 * c:
            want = lifted
    return want


def _conv(x: torch.Tensor, conv: nn.Conv3d, channels_last: bool = True) -> torch.Tensor:
    """``conv(x)`` (stride 1, "same" padding), computed on channels-last activations.

    Channels-last is oneDNN's fast layout for 3D convolutions on CPU (the default layout
    falls back to a slow native kernel, several times slower, mostly in the backward); inputs
    with fewer than 3 channels get zero channels (input and weight), which add exactly nothing.
    The function computed is the plain convolution's.
    """
    w = conv.weight
    if (safe := conv3d_float32_if_unsafe(x, w, conv.bias, padding=conv.padding)) is not None:
        return safe  # a CPU bf16 bug at depth <= 2 (systems.speed)
    if channels_last:
        cin = w.shape[1]
        want = _fast_in_channels(x.shape)
        if cin < want:
            extra = want - cin
            x = torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], dim=1)
            w = F.pad(w, [0, 0, 0, 0, 0, 0, 0, extra])
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1) and conv.stride == (1, 1, 1):
        return conv3d_k3(x, w, conv.bias)  # the rest of the small problems, split for oneDNN
    return F.conv3d(x, w, conv.bias, padding=conv.padding)


class ConvAct(nn.Module):
    """3×3×3 convolution (padding 1) + LeakyReLU(0.2). ``(B, cin, *S) → (B, cout, *S)``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _leaky(_conv(x, self.conv))


class UpCatConv(nn.Module):
    """``LeakyReLU(conv(cat(nearest_up2(low), skip)))`` for a skip of exactly twice the size.

    With ``fused=True`` the upsampled and the concatenated tensors are never built: the
    convolution of the concatenation equals ``conv(skip, W_skip) + conv_transpose(low, T)``
    where ``T`` sums neighbouring taps of ``W_up`` (:func:`systems.voxelmorph.up_conv_weight`,
    tested there), which saves two full-resolution tensors per call. Same parameters, same
    function either way.

    Shapes: ``low (B, c_up, *S/2)``, ``skip (B, c_skip, *S)`` → ``(B, cout, *S)``.
    """

    def __init__(self, c_up: int, c_skip: int, cout: int) -> None:
        super().__init__()
        self.c_up = int(c_up)
        self.conv = nn.Conv3d(c_up + c_skip, cout, 3, padding=1)

    def forward(self, low: torch.Tensor, skip: torch.Tensor, fused: bool = True) -> torch.Tensor:
        if [2 * n for n in low.shape[2:]] != list(skip.shape[2:]):
            raise ValueError(f"skip {tuple(skip.shape)} must be twice the size of {tuple(low.shape)}")
        w = self.conv.weight
        if not fused:
            up = F.interpolate(low, scale_factor=2, mode="nearest")
            return _leaky(_conv(torch.cat([up, skip], dim=1), self.conv))
        fmt = torch.channels_last_3d
        out = conv3d_k3(skip.contiguous(memory_format=fmt), w[:, self.c_up :], self.conv.bias)
        up = F.conv_transpose3d(low.contiguous(memory_format=fmt), up_conv_weight(w[:, : self.c_up]), None, stride=2, padding=1)
        return _leaky(out + up)


class SharedEncoder(nn.Module):
    """One encoder for both images (one set of weights).

    Level 0: ``ConvAct(1, widths[0])`` at full resolution; level ``k >= 1``: 2× max-pooling,
    then two ``ConvAct`` of width ``widths[k]``.

    Shapes: ``(N, 1, *S)`` with ``S`` divisible by ``2**(L-1)`` → list of ``L`` tensors,
    level ``k``: ``(N, widths[k], *S / 2**k)``.
    """

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.widths = [int(w) for w in widths]
        self.levels = nn.ModuleList()
        cin = 1
        for k, w in enumerate(self.widths):
            blocks: list[nn.Module] = [ConvAct(cin, w)] if k == 0 else [ConvAct(cin, w), ConvAct(w, w)]
            self.levels.append(nn.Sequential(*blocks))
            cin = w

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for k, level in enumerate(self.levels):
            if k > 0:
                x = F.max_pool3d(x, 2)
            x = level(x)
            feats.append(x)
        return feats


class AuxiliaryDecoder(nn.Module):
    """U-Net decoder over one image's encoder features (shared by both images).

    ``a[L-1] = ConvAct(e[L-1])``; ``a[k] = UpCatConv(a[k+1], e[k])`` for ``k = L-2 .. 0``:
    features of every scale that have seen the deepest context ("high-level").

    Shapes: encoder list (level ``k``: ``(N, enc[k], *S_k)``) → list, level ``k``:
    ``(N, widths[k], *S_k)``.

    Args:
        fused_levels: levels ``k < fused_levels`` use the fused up-convolution
            (:class:`UpCatConv`); 2 = full and half resolution, where the saving matters.
    """

    def __init__(self, enc_widths: Sequence[int], widths: Sequence[int], fused_levels: int = 2) -> None:
        super().__init__()
        L = len(enc_widths)
        if len(widths) != L:
            raise ValueError(f"auxiliary widths {list(widths)} need one entry per encoder level ({L})")
        self.fused_levels = int(fused_levels)
        self.top = ConvAct(enc_widths[-1], widths[-1])
        self.ups = nn.ModuleList([UpCatConv(widths[k + 1], enc_widths[k], widths[k]) for k in range(L - 1)])

    def forward(self, enc: list[torch.Tensor]) -> list[torch.Tensor]:
        L = len(enc)
        out: list[torch.Tensor] = [torch.empty(0)] * L
        a = self.top(enc[-1])
        out[-1] = a
        for k in range(L - 2, -1, -1):
            a = self.ups[k](a, enc[k], fused=k < self.fused_levels)
            out[k] = a
        return out


class FusionBlock(nn.Module):
    """Multi-scale feature fusion block: global channel attention, fusion conv, local spatial attention.

    Inputs are a list of parts (here: fixed encoder features, warped moving encoder features,
    fixed auxiliary features, warped moving auxiliary features, and the current field), all
    ``(B, C_i, *S)``; ``C = Σ C_i``.

    1. Global channel attention (squeeze-and-excitation / CBAM style) over all parts:
       ``w = sigmoid(MLP(avgpool(x)) [+ MLP(maxpool(x))])``, ``(B, C, 1, 1, 1)`` in (0, 1); the
       MLP is ``1×1 conv C → max(C // reduction, 4) → C`` with LeakyReLU between.
    2. Fusion: ``h = LeakyReLU(conv3×3×3(cat(x_i · w_i)))``, ``(B, out_channels, *S)``.
    3. Local spatial attention on the fused features: ``s = sigmoid(conv_k([mean_c h, max_c h]))``
       with a ``spatial_kernel``³ kernel, ``(B, 1, *S)`` in (0, 1); output ``h · s``.

    With ``attention=False`` (the ablation "plain concatenation") steps 1 and 3 are left
    out and their parameters are not created: ``out = LeakyReLU(conv3×3×3(cat(x_i)))``.

    Forward returns ``(out (B, out_channels, *S), {"channel": w, "spatial": s})`` (an empty
    dict without attention).
    """

    def __init__(
        self,
        part_channels: Sequence[int],
        out_channels: int,
        reduction: int = 4,
        spatial_kernel: int = 7,
        channel_pool: str = "avgmax",
        attention: bool = True,
    ) -> None:
        super().__init__()
        if channel_pool not in ("avg", "avgmax"):
            raise ValueError(f"channel_pool must be 'avg' or 'avgmax', got {channel_pool!r}")
        if spatial_kernel < 1 or spatial_kernel % 2 == 0:
            raise ValueError(f"spatial_kernel must be odd and positive, got {spatial_kernel}")
        self.part_channels = [int(c) for c in part_channels]
        c = sum(self.part_channels)
        hidden = max(c // int(reduction), 4)
        self.channel_pool = channel_pool
        self.attention = bool(attention)
        if self.attention:
            self.mlp = nn.Sequential(nn.Conv3d(c, hidden, 1), nn.LeakyReLU(_LEAKY_SLOPE), nn.Conv3d(hidden, c, 1))
            self.spatial = nn.Conv3d(2, 1, spatial_kernel, padding=spatial_kernel // 2)
        self.fuse = nn.Conv3d(c, out_channels, 3, padding=1)
        self.out_channels = int(out_channels)

    def forward(self, parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if [p.shape[1] for p in parts] != self.part_channels:
            raise ValueError(f"fusion block expects parts with {self.part_channels} channels, got {[p.shape[1] for p in parts]}")
        if not self.attention:
            return _leaky(_conv(torch.cat(list(parts), dim=1), self.fuse)), {}
        dims = tuple(range(2, parts[0].dim()))
        avg = torch.cat([p.mean(dim=dims, keepdim=True) for p in parts], dim=1)
        logits = self.mlp(avg)
        if self.channel_pool == "avgmax":
            mx = torch.cat([p.amax(dim=dims, keepdim=True) for p in parts], dim=1)
            logits = logits + self.mlp(mx)
        w = torch.sigmoid(logits)
        weighted = torch.cat([p * wi for p, wi in zip(parts, w.split(self.part_channels, dim=1))], dim=1)
        h = _leaky(_conv(weighted, self.fuse))
        stats = torch.cat([h.mean(dim=1, keepdim=True), h.amax(dim=1, keepdim=True)], dim=1)
        s = torch.sigmoid(_conv(stats, self.spatial))
        return h * s, {"channel": w, "spatial": s}


def upsample_pooled_field(field: torch.Tensor) -> torch.Tensor:
    """A field on a 2×-max-pooled grid, carried to the grid it was pooled from.

    MSFF's scales come from ``max_pool3d(x, 2)`` of sizes divisible by 16: coarse voxel ``j``
    covers fine voxels ``2j, 2j + 1`` and sits at fine position ``2j + 0.5``. In that layout a
    displacement of ``d`` coarse voxels is exactly ``2d`` fine voxels, and trilinear
    interpolation with ``align_corners=False`` puts every coarse sample where it belongs.
    (:func:`benchmark.core.spatial.resize_field` assumes grids that share their corner voxels
    and scales by ``(n − 1)/(m − 1)``: 3.0 from 2 to 4 voxels, 2.11 from 10 to 20, where 2 is
    right; MSFF used it until this was found.)

    Args:
        field: ``(B, 3, X, Y, Z)`` voxels of the coarse grid.

    Returns:
        ``(B, 3, 2X, 2Y, 2Z)`` voxels of the fine grid.
    """
    return 2.0 * F.interpolate(field, scale_factor=2, mode="trilinear", align_corners=False)


class MSFFNet(nn.Module):
    """The MSFF network: shared encoder, shared auxiliary decoder, pyramid decoder of fusion blocks.

    Args:
        enc_widths: encoder widths per level (full resolution first); ``L = len(enc_widths)``
            scales (5 in the paper).
        aux_widths: auxiliary decoder widths per level.
        fuse_widths: fusion block output widths per level (the flow head has the same width).
        diffeomorphic: each scale's head output is a stationary velocity integrated by scaling
            and squaring (``int_steps``) into the residual; else it is the residual itself.
        int_steps: scaling-and-squaring steps when ``diffeomorphic``.
        reduction, spatial_kernel, channel_pool: :class:`FusionBlock` attention options.
        fused_levels: :class:`AuxiliaryDecoder` speed option (same function).
        aux_decoder: build the auxiliary decoder and feed its features to the fusion blocks
            (ablation switch; ``False``: the blocks see the encoder features and the field only).
        fusion: ``"attention"`` (the multi-scale feature fusion block) or ``"concat"``
            (ablation switch: plain concatenation + one 3×3×3 conv, no attention).

    Forward ``(moving, fixed)``, both ``(B, 1, *S)``, every axis of ``S`` divisible by
    ``2**(L-1)`` (:class:`MSFF` pads), returns a dict:

    * ``disp``: ``(B, 3, *S)`` full-resolution displacement (voxels, pull);
    * ``fields``: per scale, coarsest first, the field after that scale, ``(B, 3, *S_k)``
      in voxels of that scale's grid;
    * ``residuals``: per scale, the residual composed at that scale (the coarsest: the
      initial field itself);
    * ``velocities``: per scale, the heads' outputs (equal to ``residuals`` when not
      diffeomorphic);
    * ``attention``: per scale, the fusion block's ``{"channel", "spatial"}`` weights.
    """

    def __init__(
        self,
        enc_widths: Sequence[int] = (8, 16, 32, 32, 32),
        aux_widths: Sequence[int] = (8, 16, 32, 32, 32),
        fuse_widths: Sequence[int] = (8, 16, 32, 32, 32),
        diffeomorphic: bool = False,
        int_steps: int = 7,
        reduction: int = 4,
        spatial_kernel: int = 7,
        channel_pool: str = "avgmax",
        fused_levels: int = 2,
        aux_decoder: bool = True,
        fusion: str = "attention",
    ) -> None:
        super().__init__()
        if fusion not in ("attention", "concat"):
            raise ValueError(f"fusion must be 'attention' or 'concat', got {fusion!r}")
        L = len(enc_widths)
        if L < 2 or len(aux_widths) != L or len(fuse_widths) != L:
            raise ValueError(f"need >= 2 levels and one width per level: enc {enc_widths}, aux {aux_widths}, fuse {fuse_widths}")
        self.levels = L
        self.ndim = 3
        self.diffeomorphic = bool(diffeomorphic)
        self.int_steps = int(int_steps)
        self.encoder = SharedEncoder(enc_widths)
        self.use_aux = bool(aux_decoder)
        self.fusion_mode = fusion
        self.aux = AuxiliaryDecoder(enc_widths, aux_widths, fused_levels) if self.use_aux else None
        self.fusion = nn.ModuleList()
        self.heads = nn.ModuleList()
        for k in range(L):
            parts = [enc_widths[k], enc_widths[k]] + ([aux_widths[k], aux_widths[k]] if self.use_aux else [])
            if k < L - 1:  # finer scales also see the current field
                parts.append(self.ndim)
            self.fusion.append(FusionBlock(parts, fuse_widths[k], reduction, spatial_kernel, channel_pool,
                                           attention=fusion == "attention"))
            flow = nn.Conv3d(fuse_widths[k], self.ndim, 3, padding=1)
            nn.init.normal_(flow.weight, 0.0, 1e-5)
            nn.init.zeros_(flow.bias)
            self.heads.append(nn.Sequential(ConvAct(fuse_widths[k], fuse_widths[k]), flow))

    @property
    def multiple(self) -> int:
        """Every spatial size must be divisible by this (``2**(levels-1)``)."""
        return 2 ** (self.levels - 1)

    @staticmethod
    def refine(field: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pyramid step: ``(compose(up, residual), up)`` with ``up = upsample_pooled_field(field)``.

        The residual is estimated between the moving features warped by ``up`` and the fixed
        features, so it acts first: ``warp(warp(I, up), residual) ≈ warp(I, result)``, and
        ``result(x) = residual(x) + up(x + residual(x))``.

        Args:
            field: ``(B, 3, *S_coarse)`` voxels of the coarse grid.
            residual: ``(B, 3, *S_fine)`` voxels of the fine grid.
        """
        up = upsample_pooled_field(field)
        if up.shape[2:] != residual.shape[2:]:
            raise ValueError(f"the residual's grid {tuple(residual.shape[2:])} is not twice the field's {tuple(field.shape[2:])}")
        return compose(up, residual), up

    def _residual(self, k: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conv_act, flow = self.heads[k]
        # the field ops of benchmark.core.spatial get the default layout back
        vel = _conv(conv_act(h), flow).contiguous().float()  # fields stay float32 (systems.speed)
        if self.diffeomorphic:
            return integrate_velocity(vel, self.int_steps), vel
        return vel, vel

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, Any]:
        if moving.shape != fixed.shape or moving.dim() != 5 or moving.shape[1] != 1:
            raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must both be (B, 1, X, Y, Z)")
        m = self.multiple
        if any(s % m for s in fixed.shape[2:]):
            raise ValueError(f"spatial size {tuple(fixed.shape[2:])} must be divisible by {m} (MSFF pads its inputs)")
        b = fixed.shape[0]
        enc = self.encoder(torch.cat([moving, fixed], dim=0))  # shared weights: one pass for both
        enc_m = [e[:b] for e in enc]
        enc_f = [e[b:] for e in enc]
        if self.aux is not None:
            aux = self.aux(enc)
            aux_m = [a[:b] for a in aux]
            aux_f = [a[b:] for a in aux]
        L = self.levels
        fields: list[torch.Tensor] = []
        residuals: list[torch.Tensor] = []
        velocities: list[torch.Tensor] = []
        attention: list[dict[str, torch.Tensor]] = []
        field: torch.Tensor | None = None
        for k in range(L - 1, -1, -1):
            if field is None:
                parts = [enc_f[k], enc_m[k]] + ([aux_f[k], aux_m[k]] if self.aux is not None else [])
                h, att = self.fusion[k](parts)
                residual, vel = self._residual(k, h)
                field = residual
            else:
                up = upsample_pooled_field(field)
                parts = [enc_f[k], warp(enc_m[k], up)]
                if self.aux is not None:
                    parts += [aux_f[k], warp(aux_m[k], up)]
                parts.append(up)
                h, att = self.fusion[k](parts)
                residual, vel = self._residual(k, h)
                field = compose(up, residual)
            fields.append(field)
            residuals.append(residual)
            velocities.append(vel)
            attention.append(att)
        assert field is not None
        return {"disp": field, "fields": fields, "residuals": residuals, "velocities": velocities, "attention": attention}


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the spatial axes of ``(B, C, *S)`` at their ends up to multiples of ``multiple``."""
    pad: list[int] = []
    for n in reversed(x.shape[2:]):
        pad += [0, (-n) % multiple]
    return F.pad(x, pad) if any(pad) else x


class MSFF(RegistrationSystem):
    """MSFF pyramid as a suite system (unsupervised; local NCC + ``lambda_`` · diffusion).

    Args:
        lambda_: weight of the diffusion regulariser on the final full-resolution displacement.
        lr: Adam learning rate.
        width: base width ``w``; per level (full resolution first) the encoder, auxiliary
            decoder and fusion widths are ``w · width_mults``.
        width_mults: multipliers per level; their count is the number of scales (5).
        ncc_window: local NCC window (voxels).
        diffeomorphic: integrate each scale's head output as a stationary velocity
            (:func:`benchmark.core.spatial.integrate_velocity`, ``int_steps``) into its residual.
        int_steps: scaling-and-squaring steps.
        reduction: channel-attention MLP reduction.
        spatial_kernel: spatial-attention kernel size (odd).
        channel_pool: ``"avgmax"`` (average- and max-pooled descriptors through one MLP,
            CBAM) or ``"avg"`` (squeeze-and-excitation).
        pad: zero-pad inputs whose sizes are not multiples of ``2**(scales-1)`` (16) and
            crop the field back; ``False`` refuses such inputs with an error.
        fused_levels: speed option of the auxiliary decoder (same function).
        aux_decoder: ablation switch of the paper's shared auxiliary decoder. ``True`` (the
            method): its high-level features of both images enter every fusion block.
            ``False``: no auxiliary decoder is built (fewer parameters) and the fusion blocks
            see the fixed and warped moving encoder features and the field only.
        fusion: ablation switch of the paper's multi-scale feature fusion block.
            ``"attention"`` (the method): channel attention, fusion conv, spatial attention
            (:class:`FusionBlock`). ``"concat"``: plain concatenation of the same parts and
            one 3×3×3 conv + LeakyReLU of the same width (no attention parameters).
            Everything else (pyramid, composition, loss) is unchanged by either switch, so
            a variant differs from the full method in that one component only.

    Choices where the paper is silent:

    * widths: ``w · (1, 2, 4, 4, 4)`` with ``w = 8`` for encoder, auxiliary decoder and
      fusion blocks (small at full resolution, so that a training step at 160×224×192 fits
      in a few GB on CPU);
    * encoder: max-pooling between levels; one conv at full resolution, two per coarser level;
      LeakyReLU(0.2) everywhere (as VoxelMorph);
    * auxiliary decoder: a U-Net decoder (nearest 2× upsampling, concatenation with the
      encoder skip, conv) applied to each image's encoder features;
    * fusion block: channel attention first (CBAM: avg+max pooled descriptors, shared MLP,
      reduction 4, sigmoid) on the concatenation of fixed encoder, warped moving encoder,
      fixed auxiliary, warped moving auxiliary features and the upsampled field; a 3×3×3
      fusion conv; then spatial attention (CBAM: channel mean and max, 7³ conv, sigmoid) on
      the fused features; flow head = conv + LeakyReLU + conv to 3 channels (init N(0, 1e-5));
    * the coarsest scale's block sees the features only (no field yet); it predicts the
      initial field;
    * composition: ``field_k = compose(up(field_{k+1}), residual_k)`` (residual first, since
      it is estimated after warping by the upsampled field); fields upsampled trilinearly
      in the pooled grids' layout, magnitudes doubled (:func:`upsample_pooled_field`);
    * loss: ``-local NCC (9³)`` of the full-resolution warped moving image +
      ``lambda_ · diffusion`` of the final displacement (no per-scale deep supervision);
      ``lambda_ = 1`` by default;
    * sizes: zero-padding at the end of each axis to a multiple of 16.
    """

    learns: ClassVar[bool] = True
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lambda_": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
        "width": {"type": "categorical", "choices": [4, 8, 16]},
    }
    #: Regularisation argument and default range of ``regbench arc`` (log-spaced values).
    regularisation: ClassVar[tuple[str, float, float]] = ("lambda_", 0.1, 10.0)

    def __init__(
        self,
        lambda_: float = 1.0,
        lr: float = 1e-4,
        width: int = 8,
        width_mults: Sequence[int] = (1, 2, 4, 4, 4),
        ncc_window: int = 9,
        diffeomorphic: bool = False,
        int_steps: int = 7,
        reduction: int = 4,
        spatial_kernel: int = 7,
        channel_pool: str = "avgmax",
        pad: bool = True,
        fused_levels: int = 2,
        aux_decoder: bool = True,
        fusion: str = "attention",
        warmup_calls: int | None = None,
        compute_hd95: bool = True,
        compute_ndv: bool = True,
        compile: bool | str = False,
    ) -> None:
        super().__init__(lambda_=lambda_, lr=lr, warmup_calls=warmup_calls, compute_hd95=compute_hd95, compute_ndv=compute_ndv,
                         compile=compile)
        self.save_hyperparameters()
        if int(width) < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        widths = [int(width) * int(m) for m in width_mults]
        self.net = MSFFNet(
            widths,
            widths,
            widths,
            diffeomorphic=diffeomorphic,
            int_steps=int_steps,
            reduction=reduction,
            spatial_kernel=spatial_kernel,
            channel_pool=channel_pool,
            fused_levels=fused_levels,
            aux_decoder=aux_decoder,
            fusion=fusion,
        )
        self.pad = bool(pad)
        self.similarity = LocalNCC(ncc_window)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, Any]:
        """``moving, fixed (B, 1, X, Y, Z)`` → :class:`MSFFNet`'s dict, ``disp`` cropped to ``(B, 3, X, Y, Z)``.

        The other entries live on the padded grid.
        """
        if moving.shape != fixed.shape:
            raise ValueError(
                f"MSFF needs moving and fixed on one grid; got {tuple(moving.shape)} and {tuple(fixed.shape)}"
            )
        size = fixed.shape[2:]
        m = self.net.multiple
        if any(s % m for s in size):
            if not self.pad:
                raise ValueError(f"spatial size {tuple(size)} is not divisible by {m}; pad the inputs or use pad=True")
            moving, fixed = _pad_to_multiple(moving, m), _pad_to_multiple(fixed, m)
        out = self.net(moving, fixed)
        disp = out["disp"]
        if tuple(disp.shape[2:]) != tuple(size):
            out["disp"] = disp[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]
        return out

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        return self(batch["moving"], batch["fixed"])["disp"]

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self(batch["moving"], batch["fixed"])
        disp = out["disp"]
        warped = warp(batch["moving"], disp)
        sim = self.similarity(batch["fixed"], warped)
        reg = diffusion(disp)
        loss = sim + self.lambda_ * reg
        return loss, {"sim": sim.detach(), "reg": reg.detach()}
