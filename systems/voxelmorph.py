"""VoxelMorph baseline (Balakrishnan et al., TMI 2019; Dalca et al., MICCAI 2018).

Written for this suite from the papers' description; the defaults follow the published
configuration: U-Net encoder 16-32-32-32, decoder 32-32-32-32-32-16-16, a stationary
velocity predicted at half resolution and integrated by scaling and squaring in 7 steps,
loss ``-local NCC (9³) + lambda_ · diffusion(velocity)``.

Speed (CPU training step; the function computed is the same, to float rounding):

* activations are kept ``channels_last`` (oneDNN's fast layout for 3D convolutions, about
  1.5–2× faster per convolution on CPU than the default layout);
* the first convolution (2 input channels, ``cat(moving, fixed)``) gets a zero channel
  appended to input and weight: oneDNN's weight gradient with 2 input channels is an order
  of magnitude slower than with 3 (zero products add exactly nothing);
* "upsample, concatenate, convolve" at the top decoder levels is computed without the
  upsampled or the concatenated tensor: a 3×3(×3) convolution ``W`` applied to
  ``cat(nearest_up2(x), skip)`` equals ``W_skip ⋆ skip + W_up ⋆ nearest_up2(x)``, and the
  second term is a stride-2 transposed convolution of the low-resolution ``x`` whose 4-tap
  kernel sums neighbouring taps of ``W_up`` (:func:`up_conv_weight`): 8 instead of 27
  multiply-adds per input channel, output channel and output voxel, and neither the
  upsampled nor the concatenated full-resolution tensor is stored for the backward pass;
* the LeakyReLUs inside the U-Net are in place, and so is their backward (it overwrites the
  freshly allocated incoming gradient): a full-size allocation less per layer — fresh memory
  costs page faults, about a quarter of a step's time on CPU. :class:`VoxelMorphNet` lets the
  last one do so too (its output feeds the flow head alone).

Memory: a step's peak comes early in the backward pass, with every saved activation alive
plus two full-resolution gradients, so the network keeps nothing it can rebuild for less
than it costs to hold: the zero-padded input (rebuilt from the two images, :class:`_InputConv`),
the pooling indices (:class:`_MaxPool2`), the pooled copy of each skip (:class:`_PoolConv`;
both pooled again from the skip, which is kept anyway) and, by default, the first level's
output itself (:class:`_RebuiltActivation`: its readers run after the peak; rebuilding it is
one more first convolution). At 96³ (2 threads) the allocations alive at the peak went from
133 to 100 full-resolution channels (3.5 MB each). At 160×192×144 (interleaved fresh
processes, idle machine) the process peak went 3.10 GB → 2.64–2.67 GB without the rebuilt
activation at unchanged time (10.2–10.6 s), and → 2.33–2.37 GB with it, at 10.6–10.7 s
(+3.5 %; ``rebuild_first_activation=False`` trades back). Forward and gradients are
bit-identical to autograd's path with the same kernels (``tests/test_voxelmorph.py``).
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from benchmark.core.losses import MSE, LocalNCC, diffusion
from benchmark.core.spatial import integrate_velocity, resize_field, warp
from systems.base import RegistrationSystem
from systems.speed import NATIVE_CONV_LIMIT, conv3d_float32_if_unsafe, conv3d_k3

__all__ = ["VxmUNet", "VoxelMorphNet", "VoxelMorph", "up_conv_weight"]

_LEAKY_SLOPE = 0.2
#: Convolutions with fewer input channels are padded with zero channels up to this count
#: (oneDNN's weight gradient for 2 input channels: ~190 ms at 96³, 1 thread; for 3: ~15 ms).
_MIN_FAST_IN_CHANNELS = 3
#: ``_UP_TAPS[k, j]``: along one axis, tap ``k`` of the stride-2, 4-tap transposed
#: convolution that equals "nearest 2× upsampling, then a 3-tap convolution" is the sum of the
#: 3-tap kernel's taps ``j`` with ``_UP_TAPS[k, j] = 1`` (derivation in :func:`up_conv_weight`).
_UP_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last_3d if ndim == 3 else torch.channels_last


class _ConvAct(nn.Sequential):
    """3×3(×3) conv + LeakyReLU(0.2): holds the parameters and names the layer (the U-Net's
    ``forward`` applies both functionally)."""

    def __init__(self, cin: int, cout: int, ndim: int = 3) -> None:
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        super().__init__(conv(cin, cout, 3, padding=1), nn.LeakyReLU(_LEAKY_SLOPE, inplace=True))


class _LeakyReLUInPlace(torch.autograd.Function):
    """LeakyReLU(0.2) in place, whose backward overwrites the incoming gradient in place.

    For activations inside the U-Net only: their gradients arrive freshly allocated by the
    backward of the next convolution / pooling (or as autograd's sum of two such), owned by
    nobody else, so reusing that memory saves a full-size allocation (and its page faults)
    per layer. Not twice differentiable (``once_differentiable`` refuses loudly).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        F.leaky_relu(x, _LEAKY_SLOPE, inplace=True)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return torch.ops.aten.leaky_relu_backward.grad_input(grad, y, _LEAKY_SLOPE, True, grad_input=grad)


class _MaxPool2(torch.autograd.Function):
    """2× max-pooling that stores no indices: its backward finds them again from the input.

    ``max_pool3d`` keeps int64 indices for the backward pass, twice the bytes of the float32
    output (at 96³ the full-resolution level's are 14 MB; more to the point, they are one more
    allocation per step).
    The input is kept anyway (the skip connection's convolution and the activation save the
    same tensor), so the backward pools it once more for the indices (the same kernel, hence
    the same choice among ties) and frees them at once.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _max_pool2(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        _, idx = _max_pool2(x, return_indices=True)
        # under autocast the gradient may arrive in float32 for a bfloat16 input (it does when
        # the next convolution ran in float32, systems.speed); pooling's backward wants one dtype
        return _unpool_grad(grad.to(x.dtype), x, idx)


def _direct_conv_ok(x_shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`_conv_nd` would hand a ``(B, C, *S)`` input of this shape straight to
    ``conv2d`` / ``conv3d`` (float32, eager, outside autocast, not PyTorch's small-problem CPU
    kernel), so that a hand-written backward may call ``aten.convolution_backward`` and get the
    kernel autograd would have used."""
    if dtype != torch.float32 or torch.compiler.is_compiling() or torch.is_autocast_enabled(device.type):
        return False
    if len(x_shape) == 5 and device.type == "cpu":
        return x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3] > NATIVE_CONV_LIMIT
    return True


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, has_bias: bool, input_grad: bool
                   ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``conv(x, w, b, padding=1)`` (stride 1): input (if asked), weight, bias."""
    nd = w.dim() - 2
    return torch.ops.aten.convolution_backward(
        grad, x, w, [w.shape[0]] if has_bias else None, [1] * nd, [1] * nd, [1] * nd, False, [0] * nd, 1,
        [input_grad, True, has_bias])


def _padded_input(sources: Sequence[torch.Tensor], channels: int, channels_last: bool) -> torch.Tensor:
    """``cat(*sources, zeros)`` along channels to ``channels`` channels, in one allocation."""
    first = sources[0]
    shape = (first.shape[0], channels, *first.shape[2:])
    fmt = _memory_format(first.dim() - 2) if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=first.dtype, device=first.device, memory_format=fmt)
    c = 0
    for src in sources:
        x[:, c:c + src.shape[1]] = src
        c += src.shape[1]
    if c < channels:
        x[:, c:] = 0
    return x


def _first_conv(sources: Sequence[torch.Tensor], w: torch.Tensor, b: torch.Tensor | None, channels: int,
                channels_last: bool) -> torch.Tensor:
    """``conv(padded input, zero-padded w, b, padding=1)`` (no autograd of its own)."""
    x = _padded_input(sources, channels, channels_last)
    wp = F.pad(w, [0, 0] * (w.dim() - 2) + [0, channels - w.shape[1]])
    return (F.conv3d if w.dim() == 5 else F.conv2d)(x, wp, b, padding=1)


class _Token:
    """Stands in a saved-tensor slot for a view of the rebuilt activation."""

    __slots__ = ("size", "stride", "offset")

    def __init__(self, t: torch.Tensor) -> None:
        self.size, self.stride, self.offset = tuple(t.shape), t.stride(), t.storage_offset()


class _RebuiltActivation:
    """Saved-tensor hooks that keep a recipe for one activation instead of the activation.

    The first level's output (16 channels at full resolution) is saved by three consumers:
    its activation, the pooling into the second level and the top decoder level's
    convolution. Their backward passes run late, after the step's peak (the first
    full-resolution layers of the backward pass), yet autograd would hold the tensor through
    it. Inside :meth:`saving`, any save of that tensor (or of a view of it) stores a
    :class:`_Token` instead; the first unpack rebuilds it by ``rebuild()`` (the same kernels
    on the same inputs: the same values), later unpacks reuse it, and the last one drops it.
    Rebuilding is the first convolution again (the two images, padded to 3 channels: ~1 % of a
    step at 96³, 3.5 % at 160×192×144 with the fresh memory's page faults).

    Inside :meth:`saving` these hooks are the only ones: outer saved-tensor hooks (``save_on_cpu``,
    checkpointing) would not see what is saved there, so :class:`VxmUNet` does not rebuild
    when such hooks are active. A backward pass that never reaches some reader (a partial
    ``autograd.grad``) leaves the rebuilt tensor alive until the graph is freed. The weights
    and the images are version-checked; an edit through ``.data`` escapes every such check.
    """

    def __init__(self, rebuild: Any, versions: Any, device_type: str) -> None:
        self.rebuild, self.versions, self.device_type = rebuild, versions, device_type
        self.target: Any = None  # weak reference to the activation while it lives
        self.version0 = versions()
        self.cached: torch.Tensor | None = None
        self.saves = 0  # tokens handed to autograd
        self.reads = 0  # tokens read back, over every backward pass of the graph

    def watch(self, t: torch.Tensor) -> None:
        import weakref

        self.target = weakref.ref(t)

    def _pack(self, t: torch.Tensor) -> Any:
        live = self.target() if self.target is not None else None
        if live is not None and t.untyped_storage().data_ptr() == live.untyped_storage().data_ptr() \
                and t.dtype == live.dtype:
            self.saves += 1
            return _Token(t)
        return t

    def _unpack(self, obj: Any) -> torch.Tensor:
        if not isinstance(obj, _Token):
            return obj
        if self.cached is None:
            if self.versions() != self.version0:
                raise RuntimeError("the U-Net's input images or first-layer weights were modified in place "
                                   "between the forward and the backward pass; its first activation cannot be rebuilt")
            # the forward pass's precision, whatever the backward runs under (float32: the
            # rebuilding path is taken outside autocast only)
            with torch.no_grad(), torch.autocast(self.device_type, enabled=False):
                self.cached = self.rebuild()
        out = self.cached.as_strided(obj.size, obj.stride, obj.offset)
        self.reads += 1
        if self.reads % self.saves == 0:  # every slot read once (per backward pass): keep nothing
            self.cached = None
        return out

    def saving(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


def _outer_saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks (``save_on_cpu``, checkpointing) are active around the call."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


class _InputConv(torch.autograd.Function):
    """The U-Net's first convolution, storing its inputs' recipe rather than the input.

    The input is ``cat(moving, fixed)`` padded with zero channels (oneDNN's fast path), a
    full-resolution tensor that autograd would keep until the very end of the backward pass,
    through its peak. Its sources are the caller's images, alive anyway, so this keeps
    references to them and rebuilds the padded input in the backward, where only the weight
    and bias gradients are wanted (the images need none). Same kernels as autograd's path
    (:func:`_direct_conv_ok` decides where that holds).
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, b: torch.Tensor | None, channels: int, channels_last: bool,
                *sources: torch.Tensor) -> torch.Tensor:
        ctx.channels, ctx.channels_last, ctx.has_bias = channels, channels_last, b is not None
        ctx.save_for_backward(w, *sources)
        return _first_conv(sources, w, b, channels, channels_last)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        w, *sources = ctx.saved_tensors
        x = _padded_input(sources, ctx.channels, ctx.channels_last)
        wp = F.pad(w, [0, 0] * (w.dim() - 2) + [0, ctx.channels - w.shape[1]])
        _, gw, gb = _conv_backward(grad, x, wp, ctx.has_bias, input_grad=False)
        return (gw[:, :w.shape[1]], gb, None, None) + (None,) * len(sources)


class _PoolConv(torch.autograd.Function):
    """``conv(max_pool2(x), w, b, padding=1)`` storing ``x``, not the pooled tensor.

    An encoder level's input is the pooled skip of the level above; ``x`` (that skip) is
    kept anyway, so the backward pools it again (the same kernel: the same values and the
    same choice among ties), takes the convolution's gradients and routes the input gradient
    back through the pooling's indices, which live only for that moment.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, w)
        pooled = _max_pool2(x)
        return (F.conv3d if x.dim() == 5 else F.conv2d)(pooled, w, b, padding=1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        pooled, idx = _max_pool2(x, return_indices=True)
        gp, gw, gb = _conv_backward(grad, pooled, w, ctx.has_bias, input_grad=True)
        del pooled
        return _unpool_grad(gp, x, idx), gw, gb


def _max_pool2(x: torch.Tensor, return_indices: bool = False) -> Any:
    """2× max-pooling of a 2D or 3D ``(B, C, *S)`` tensor (with its indices if asked)."""
    return (F.max_pool3d if x.dim() == 5 else F.max_pool2d)(x, 2, return_indices=return_indices)


def _unpool_grad(grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gradient of 2× max-pooling with respect to its input ``x``, given the indices."""
    nd = x.dim() - 2
    back = torch.ops.aten.max_pool3d_with_indices_backward if nd == 3 else torch.ops.aten.max_pool2d_with_indices_backward
    return back(grad, x, [2] * nd, [2] * nd, [0] * nd, [1] * nd, False, idx)


def _pool(x: torch.Tensor) -> torch.Tensor:
    """2× max-pooling; without stored indices where autograd records it."""
    if x.requires_grad and torch.is_grad_enabled():
        return _MaxPool2.apply(x)
    return _max_pool2(x)


def _act(x: torch.Tensor, internal: bool) -> torch.Tensor:
    """LeakyReLU(0.2) in place; with the in-place backward for activations inside the U-Net."""
    if internal and x.requires_grad and torch.is_grad_enabled():
        return _LeakyReLUInPlace.apply(x)
    return F.leaky_relu(x, _LEAKY_SLOPE, inplace=True)


def _conv_nd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, channels_last: bool) -> torch.Tensor:
    """``conv(x, w, b)``, stride 1, padding 1, 2D or 3D; the input made channels-last if asked.

    PyTorch hands small problems, ``N·C·D·H <= 20480``, to a native kernel that returns the
    default layout; the next convolution gets channels-last input again (calling oneDNN
    directly for those was measured: no gain). A problem that is small only by that product,
    with its shortest spatial axis not last (a 16-channel 32×40×40 input, the 5 mm built-in
    brain: ``16·32·40 = 20480``), is convolved with that axis moved last (the same
    convolution: kernel and input axes swapped together), which takes it to oneDNN: the
    native kernel's backward had made a VoxelMorph step on 32×40×40 1.8× slower than on the
    larger 40×48×48 grid. A problem still small after that (few channels, or small on every
    axis) goes through :func:`systems.speed.conv3d_k3`, which convolves two halves as a batch
    of 2 (oneDNN takes any batch above 1).
    """
    nd = w.dim() - 2
    if nd == 3 and (safe := conv3d_float32_if_unsafe(x, w, b, padding=1)) is not None:
        return safe  # a CPU bf16 bug at depth <= 2 (systems.speed)
    # (eager only: under torch.compile the test alone split VoxelMorph's graph, and the
    # compiled gradient then disagreed with eager's, cosine 0.984)
    if (nd == 3 and not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] <= NATIVE_CONV_LIMIT):
        short = 2 + min(range(3), key=lambda a: (x.shape[2 + a], -a))
        if short != 4 and x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] * x.shape[4] // x.shape[short] > NATIVE_CONV_LIMIT:
            xt = x.transpose(short, 4)
            if channels_last:
                xt = xt.contiguous(memory_format=_memory_format(nd))
            return F.conv3d(xt, w.transpose(short, 4), b, padding=1).transpose(short, 4)
        if channels_last:
            x = x.contiguous(memory_format=_memory_format(nd))
        return conv3d_k3(x, w, b)  # small whatever the axis order: split into a batch of 2
    if channels_last:
        x = x.contiguous(memory_format=_memory_format(nd))
    return (F.conv3d if nd == 3 else F.conv2d)(x, w, b, padding=1)


def up_conv_weight(w: torch.Tensor) -> torch.Tensor:
    """Transposed-convolution kernel equal to ``conv(nearest_up2(x), w, padding=1)``.

    Along one axis, with ``U(y) = x(floor(y / 2))`` and zero outside the grid, the
    full-resolution output ``o(2j + p) = Σ_k w_k U(2j + p + k - 1)`` reads
    ``x(j - 1) w_0 + x(j) (w_1 + w_2)`` for ``p = 0`` and ``x(j) (w_0 + w_1) + x(j + 1) w_2``
    for ``p = 1``. A transposed convolution (stride 2, padding 1, 4 taps ``t``) computes
    ``o(2j) = x(j) t_1 + x(j - 1) t_3`` and ``o(2j + 1) = x(j) t_2 + x(j + 1) t_0``, hence
    ``t = (w_2, w_1 + w_2, w_0 + w_1, w_0)`` (rows of :data:`_UP_TAPS`), per axis.

    Args:
        w: ``(O, C, 3, 3[, 3])`` kernel of the convolution on the upsampled tensor.

    Returns:
        ``(C, O, 4, 4[, 4])``, the weight layout of ``conv_transpose``.
    """
    t = _UP_TAPS.to(device=w.device, dtype=w.dtype)
    if w.dim() == 5:
        return torch.einsum("ax,by,cz,oixyz->ioabc", t, t, t, w)
    return torch.einsum("ax,by,oixy->ioab", t, t, w)


class VxmUNet(nn.Module):
    """VoxelMorph's U-Net.

    Encoder: at each level a 3×3(×3) conv + LeakyReLU(0.2) whose output is kept as a skip,
    then 2× max-pooling (so the deepest features are at 1/2^L). Decoder: per level a conv,
    2× nearest upsampling and concatenation with the skip of that resolution; the remaining
    decoder widths are full-resolution convs. Input and output spatial sizes are equal;
    sizes need not be powers of two (the upsampled tensor is zero-padded to the skip's size).

    Args:
        in_channels: 2 for ``cat(moving, fixed)``.
        enc: encoder widths (default 16, 32, 32, 32).
        dec: decoder widths (default 32, 32, 32, 32, 32, 16, 16): the first ``len(enc)``
            are the up-path levels, the rest full-resolution convs.
        channels_last: run the convolutions on channels-last activations (faster on CPU).
        fused_levels: how many of the top decoder levels (counted from full resolution)
            compute "upsample, concatenate, convolve" as a convolution of the skip plus a
            transposed convolution of the low-resolution features (module docstring).
            2 (default): the full- and half-resolution levels, where it pays; below, the
            tensors are small. 0 = plain upsample + concatenate everywhere.
        output_to_one_conv: the caller promises to feed the output to one convolution and
            nothing else (:class:`VoxelMorphNet`'s flow head), whose backward hands over a
            freshly allocated gradient; the last LeakyReLU then overwrites it in place as the
            inner ones do, which lowers the step's peak by the output's size (the largest
            moment of the backward pass: every saved activation plus two full-resolution
            gradients). Leave False when the output meets any other graph.
        rebuild_first_activation: keep no copy of the first level's output for the backward
            pass and rebuild it there (:class:`_RebuiltActivation`): the step's peak drops by
            that tensor (16 full-resolution channels; 12 % at 160×192×144) for one more first
            convolution (+3.5 % step time there, measured). False keeps it.

    The parameters (names and shapes) do not depend on ``channels_last`` or ``fused_levels``.

    Shapes: ``(B, in_channels, *S) → (B, dec[-1], *S)``.
    """

    def __init__(
        self,
        in_channels: int = 2,
        enc: Sequence[int] = (16, 32, 32, 32),
        dec: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        ndim: int = 3,
        channels_last: bool = True,
        fused_levels: int = 2,
        output_to_one_conv: bool = False,
        rebuild_first_activation: bool = True,
    ) -> None:
        super().__init__()
        self.ndim = ndim
        self.output_to_one_conv = bool(output_to_one_conv)
        self.rebuild_first_activation = bool(rebuild_first_activation)
        self.channels_last = bool(channels_last)
        self.fused_levels = int(fused_levels)
        self.enc = nn.ModuleList()
        c = in_channels
        for w in enc:
            self.enc.append(_ConvAct(c, w, ndim))
            c = w
        self.up = nn.ModuleList()
        skip_ch = list(enc)[::-1]
        n_up = len(enc)
        if len(dec) < n_up:
            raise ValueError(f"decoder needs at least {n_up} widths, got {list(dec)}")
        for i in range(n_up):
            self.up.append(_ConvAct(c, dec[i], ndim))
            c = dec[i] + skip_ch[i]
        self.extra = nn.ModuleList()
        for w in dec[n_up:]:
            self.extra.append(_ConvAct(c, w, ndim))
            c = w
        self.out_channels = c

    # ---- building blocks ----------------------------------------------------------------
    def _conv(self, x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        """``conv(x)`` (3×3(×3), padding 1), padding few input channels with zeros."""
        w, b = conv.weight, conv.bias
        cin = w.shape[1]
        if self.channels_last and cin < _MIN_FAST_IN_CHANNELS:
            extra = _MIN_FAST_IN_CHANNELS - cin
            if x.shape[1] == cin:  # (forward() pads the network input already)
                x = torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], dim=1)
            w = F.pad(w, [0, 0] * self.ndim + [0, extra])
        return _conv_nd(x, w, b, self.channels_last)

    def _conv_up_cat(self, low: torch.Tensor, skip: torch.Tensor, conv: nn.Module, fused: bool) -> torch.Tensor:
        """``conv(cat(pad_to(nearest_up2(low), skip), skip))``, fused or materialised.

        Args:
            low: ``(B, C_up, *S_low)`` features to upsample (``S_low = S // 2``).
            skip: ``(B, C_skip, *S)``.
        """
        extra = [n - 2 * m for n, m in zip(skip.shape[2:], low.shape[2:])]  # 0, or 1 for an odd size
        if not fused or any(e not in (0, 1) for e in extra):
            up = F.interpolate(low, scale_factor=2, mode="nearest")
            up = _match(up, skip.shape[2:])
            return self._conv(torch.cat([up, skip], dim=1), conv)
        c_up = low.shape[1]
        w = conv.weight
        out = _conv_nd(skip, w[:, c_up:], conv.bias, self.channels_last)
        convt = F.conv_transpose3d if self.ndim == 3 else F.conv_transpose2d
        if self.channels_last:
            low = low.contiguous(memory_format=_memory_format(self.ndim))
        up = convt(low, up_conv_weight(w[:, :c_up]), None, stride=2, padding=1, output_padding=extra)
        return out.add_(up)

    def forward(self, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
        """``(B, C_i, *S)`` input(s), concatenated along channels (``in_channels`` in all)."""
        sources = (x, *more)
        cin = sum(t.shape[1] for t in sources)
        w0, b0 = self.enc[0][0].weight, self.enc[0][0].bias
        if cin != w0.shape[1]:
            raise ValueError(f"the U-Net takes {w0.shape[1]} input channels, got {cin}")
        channels = max(cin, _MIN_FAST_IN_CHANNELS) if self.channels_last else cin
        rebuilt: _RebuiltActivation | None = None  # the first activation, rebuilt in the backward pass
        if (any(t.requires_grad for t in sources) or not torch.is_grad_enabled()
                or not _direct_conv_ok((x.shape[0], channels, *x.shape[2:]), x.device, x.dtype)):
            # the plain path: zero channels for the first conv, channels-last, one copy
            x = sources[0] if len(sources) == 1 and channels == cin else _padded_input(sources, channels, self.channels_last)
            if self.channels_last:
                x = x.contiguous(memory_format=_memory_format(self.ndim))
            x = self._conv(x, self.enc[0][0])
        else:
            x = _InputConv.apply(w0, b0, channels, self.channels_last, *sources)
            cl = self.channels_last
            if self.rebuild_first_activation and not _outer_saved_tensor_hooks():
                kept = (*sources, w0) if b0 is None else (*sources, w0, b0)
                rebuilt = _RebuiltActivation(
                    lambda: F.leaky_relu(_first_conv(sources, w0, b0, channels, cl), _LEAKY_SLOPE, inplace=True),
                    lambda: [t._version for t in kept], x.device.type)
                rebuilt.watch(x)  # the activation below is in place: the same tensor
        with rebuilt.saving() if rebuilt is not None else contextlib.nullcontext():
            x = _act(x, internal=True)
        skips = [x]
        for i, block in enumerate(self.enc[1:]):
            conv = block[0]
            with rebuilt.saving() if rebuilt is not None and i == 0 else contextlib.nullcontext():
                if (x.requires_grad and torch.is_grad_enabled() and conv.weight.shape[1] >= _MIN_FAST_IN_CHANNELS
                        and _direct_conv_ok((x.shape[0], x.shape[1], *[n // 2 for n in x.shape[2:]]), x.device, x.dtype)):
                    x = _PoolConv.apply(x, conv.weight, conv.bias)
                else:
                    x = self._conv(_pool(x), conv)
            x = _act(x, internal=True)
            skips.append(x)
        x = _pool(x)
        # skips = [e1 (full res), e2 (1/2), ..., eL]; x is eL pooled once more. Each decoder
        # level's output waits, with its skip, for the next conv, which consumes
        # cat(nearest_up2(x), skip) directly.
        n_up = len(self.up)
        pending: torch.Tensor | None = None
        for i, block in enumerate(self.up):
            if pending is None:
                x = self._conv(x, block[0])
            else:
                # this conv reads the concatenation at the resolution of level n_up - i
                x = self._conv_up_cat(pending, skips.pop(), block[0], fused=n_up - i <= self.fused_levels - 1)
            x = _act(x, internal=True)
            pending = x
        fused_top = self.fused_levels >= 1
        for j, block in enumerate(self.extra):
            if pending is not None:
                with rebuilt.saving() if rebuilt is not None else contextlib.nullcontext():
                    x = self._conv_up_cat(pending, skips.pop(), block[0], fused=fused_top)
                pending = None
            else:
                x = self._conv(x, block[0])
            # the network's output may meet any caller's graph: standard backward there
            x = _act(x, internal=j < len(self.extra) - 1 or self.output_to_one_conv)
        if pending is not None:  # no full-resolution convs: materialise the concatenation
            up = _match(F.interpolate(pending, scale_factor=2, mode="nearest"), skips[-1].shape[2:])
            x = torch.cat([up, skips.pop()], dim=1)
        return x


def _match(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Crop or zero-pad the spatial axes of ``x`` to ``size`` (odd sizes after pooling)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    pad = []
    for have, want in zip(reversed(x.shape[2:]), reversed(size)):
        pad += [0, max(want - have, 0)]
    x = F.pad(x, pad)
    sl = (slice(None), slice(None)) + tuple(slice(0, s) for s in size)
    return x[sl]


class VoxelMorphNet(nn.Module):
    """U-Net + flow head + optional integration.

    Args:
        int_steps: scaling-and-squaring steps (0 = non-diffeomorphic: the head's output is
            the displacement itself).
        int_downsize: the velocity lives at ``1/int_downsize`` resolution.
        channels_last, fused_levels, rebuild_first_activation: speed and memory options of
            :class:`VxmUNet` (same function).

    Forward: ``moving, fixed (B, 1, *S) → dict(disp (B, ndim, *S) voxels, velocity)``.
    """

    def __init__(
        self,
        enc: Sequence[int] = (16, 32, 32, 32),
        dec: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        int_steps: int = 7,
        int_downsize: int = 2,
        ndim: int = 3,
        channels_last: bool = True,
        fused_levels: int = 2,
        rebuild_first_activation: bool = True,
    ) -> None:
        super().__init__()
        self.unet = VxmUNet(2, enc, dec, ndim, channels_last=channels_last, fused_levels=fused_levels,
                            output_to_one_conv=True, rebuild_first_activation=rebuild_first_activation)
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.flow = conv(self.unet.out_channels, ndim, 3, padding=1)
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)
        self.int_steps = int(int_steps)
        self.int_downsize = int(int_downsize) if int_steps > 0 else 1

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        full = fixed.shape[2:]
        feats = self.unet(moving, fixed)  # (concatenated inside, never stored for the backward)
        # the field ops of benchmark.core.spatial get the default layout back, and float32 under
        # mixed precision (integration and resampling stay float32: systems.speed)
        flow = _conv_nd(feats, self.flow.weight, self.flow.bias, self.unet.channels_last).contiguous().float()
        if self.int_steps == 0:
            return {"disp": flow, "velocity": flow}
        if self.int_downsize > 1:
            small = [max(s // self.int_downsize, 2) for s in full]
            vel = resize_field(flow, small)
        else:
            vel = flow
        disp = integrate_velocity(vel, self.int_steps)
        disp = resize_field(disp, full)
        return {"disp": disp, "velocity": vel}


class VoxelMorph(RegistrationSystem):
    """VoxelMorph as a suite system.

    Args:
        lambda_: weight of the diffusion regulariser on the (half-resolution) velocity.
        ncc_window: local NCC window (voxels).
        int_steps: 7 (diffeomorphic, default) or 0 (non-diffeomorphic option).
        int_downsize: resolution divisor of the velocity (2).
        enc, dec: U-Net widths.
        channels_last, fused_levels, rebuild_first_activation: speed and memory options of
            :class:`VxmUNet`; they change neither the parameters nor (beyond float rounding)
            the function.
        similarity: ``"ncc"`` (local NCC, ``ncc_window``³, the default) or ``"mse"``
            (mean squared intensity difference, as in the MSE variant of the paper).
        compile: ``torch.compile`` the network (:mod:`systems.speed`; mixed precision is the
            trainer's ``precision``).
    """

    learns: ClassVar[bool] = True
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lambda_": {"type": "float", "low": 0.01, "high": 10.0, "log": True},
    }

    def __init__(
        self,
        lambda_: float = 1.0,
        lr: float = 1e-4,
        ncc_window: int = 9,
        int_steps: int = 7,
        int_downsize: int = 2,
        enc: Sequence[int] = (16, 32, 32, 32),
        dec: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        warmup_calls: int | None = None,
        compute_hd95: bool = True,
        compute_ndv: bool = True,
        channels_last: bool = True,
        fused_levels: int = 2,
        similarity: str = "ncc",
        compile: bool | str = False,
        rebuild_first_activation: bool = True,
    ) -> None:
        super().__init__(lambda_=lambda_, lr=lr, warmup_calls=warmup_calls, compute_hd95=compute_hd95, compute_ndv=compute_ndv,
                         compile=compile)
        self.save_hyperparameters()
        self.net = VoxelMorphNet(
            tuple(enc), tuple(dec), int_steps, int_downsize, channels_last=channels_last, fused_levels=fused_levels,
            rebuild_first_activation=rebuild_first_activation,
        )
        if similarity == "ncc":
            self.similarity: nn.Module = LocalNCC(ncc_window)
        elif similarity == "mse":
            self.similarity = MSE()
        else:
            raise ValueError(f"similarity must be 'ncc' or 'mse', got {similarity!r}")

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(moving, fixed)

    def register(self, batch: dict[str, Any]) -> torch.Tensor:
        return self(batch["moving"], batch["fixed"])["disp"]

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self(batch["moving"], batch["fixed"])
        warped = warp(batch["moving"], out["disp"])
        sim = self.similarity(batch["fixed"], warped)
        reg = diffusion(out["velocity"])
        loss = sim + self.lambda_ * reg
        return loss, {"sim": sim.detach(), "reg": reg.detach()}
