"""Mixed precision and ``torch.compile`` for the learned systems.

Mixed precision is Lightning's: set ``trainer: {precision: bf16-mixed}`` (CPU or CUDA) or
``16-mixed`` (CUDA; Lightning adds the gradient scaler) in a config or on the command line
(``--trainer.precision bf16-mixed``). Lightning runs ``training_step``, ``validation_step``
and ``test_step`` under :func:`torch.autocast`; autocast lowers only convolutions, linear
layers and matrix products to 16 bits. What every learned system keeps in float32
explicitly (the networks' field and pose heads cast their outputs with ``.float()``):

* displacement, velocity and residual fields, and everything computed from them: scaling
  and squaring, composition, resampling, warping (``grid_sample`` is float32 under CPU and
  CUDA autocast anyway) — a 16-bit field has 8 significant bits, 0.05 voxel of error at a
  12-voxel displacement, compounded by every squaring step;
* the similarity and regularisation losses (their inputs are then float32; local NCC's
  variance is a difference of two near-equal sums, which 16 bits would cancel to noise);
* DiffOp-net's FFT operators (float64 already) and cdreg's spectral blocks (their FFT in
  float32; ``torch.complex`` has no bfloat16);
* metrics (the suite computes them on ``disp.float()`` after the registration call).

``compile: true`` (an init argument of every learned system) compiles its network(s) with
:func:`torch.compile` (``nn.Module.compile``: in place, so parameter names and checkpoints
are unchanged) when Lightning configures the model (``configure_model``: before fit, test
or validate). A string names the ``torch.compile`` backend instead of the default
``"inductor"`` (``"aot_eager"``, for instance, traces without generating code). Only the
network module is compiled (for VoxelMorph and MSFF that module includes their integration and
composition, still float32 inside); the losses and the field operations outside it stay eager.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, ParamSpec, TypeVar

import torch
import torch.nn as nn

__all__ = [
    "CompileSpec", "check_compile", "compile_modules", "conv3d_k3", "cpu_bf16_conv_unsafe", "conv3d_float32_if_unsafe",
    "Conv3x3", "float32_only", "NATIVE_CONV_LIMIT", "native_bound",
]

#: ``False`` (eager), ``True`` (``torch.compile``, inductor) or a ``torch.compile`` backend name.
CompileSpec = bool | str
P = ParamSpec("P")
R = TypeVar("R")


def check_compile(spec: CompileSpec) -> CompileSpec:
    """Validate a ``compile`` argument; raise ``ValueError`` naming the value when it is bad."""
    if isinstance(spec, bool):
        return spec
    if isinstance(spec, str):
        name = spec.strip()
        if name.lower() in ("true", "false"):
            return name.lower() == "true"
        if name not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(
                f"compile: unknown torch.compile backend {spec!r} (use true, false or one of "
                f"{', '.join(sorted(torch._dynamo.list_backends()))})"
            )
        return name
    raise ValueError(f"compile must be true, false or a torch.compile backend name, got {spec!r}")


def compile_modules(modules: Iterable[nn.Module], spec: CompileSpec) -> int:
    """Compile each module's ``forward`` in place (``nn.Module.compile``); returns how many.

    Modules already compiled are left alone, so calling this again (Lightning calls
    ``configure_model`` before every fit and test) costs nothing.
    """
    spec = check_compile(spec)
    if spec is False:
        return 0
    backend = "inductor" if spec is True else spec
    n = 0
    for m in modules:
        if getattr(m, "_regbench_compiled", None) == backend:
            continue
        m.compile(backend=backend)
        m._regbench_compiled = backend  # type: ignore[assignment]
        n += 1
    return n


def cpu_bf16_conv_unsafe(x: torch.Tensor) -> bool:
    """Whether a 3D convolution of ``x (B, C, D, H, W)`` would run in bfloat16 on the CPU with
    a spatial side of at most 4 voxels.

    There, torch 2.13's CPU bfloat16 ``conv3d`` returns a weight gradient with NaN / inf
    entries in some calls (uninitialised memory; measured: 3–4 of 30 calls at 2×2×2 and
    2×8×8, channels-last or not). Depth 3 or more looked safe in that measurement, but a
    full-suite run later saw an all-zero bf16 gradient for MSFF on a 32³ input (its coarse
    levels are 4³ and 2³), so the margin is any side ≤ 4. Only the coarsest levels of small
    volumes get there, where float32 costs nothing; callers run such convolutions in float32
    (:func:`conv3d_float32_if_unsafe`).
    """
    if x.dim() != 5 or x.device.type != "cpu" or min(x.shape[2:]) > 4:
        return False
    if x.dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def conv3d_float32_if_unsafe(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, **kwargs
) -> torch.Tensor | None:
    """``conv3d(x, weight, bias, **kwargs)`` in float32 outside autocast where
    :func:`cpu_bf16_conv_unsafe` says so; ``None`` otherwise (the caller convolves as usual)."""
    if not cpu_bf16_conv_unsafe(x):
        return None
    with torch.autocast("cpu", enabled=False):
        b = None if bias is None else bias.float()
        return torch.nn.functional.conv3d(x.float(), weight.float(), b, **kwargs)


#: PyTorch's CPU convolution gives a batch-1 problem with ``N·C·D·H <= 20480`` and a 3×3×3
#: kernel to its native ("slow_conv3d") kernel instead of oneDNN, forward and backward; the
#: product leaves the last axis out, and a batch of 2 or more always goes to oneDNN.
NATIVE_CONV_LIMIT = 20480


def native_bound(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``conv3d(x, weight)`` (float32, CPU, eager) would run PyTorch's native kernel.

    That kernel is several times slower than oneDNN for the small-channel volumes of the
    built-in data (measured, one thread, forward + backward: 8→8 channels on 32×40×40,
    0.32 s native vs 0.054 s through :func:`conv3d_k3`'s split; 16→16: 0.63 vs 0.076 s).
    """
    return (x.dim() == 5 and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1
            and weight.shape[2:] == (3, 3, 3) and not torch.compiler.is_compiling()
            and x.shape[1] * x.shape[2] * x.shape[3] <= NATIVE_CONV_LIMIT and x.shape[2] >= 4)


def conv3d_k3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1) -> torch.Tensor:
    """``conv3d(x, weight, bias, stride, padding=1)`` for a 3×3×3 kernel, routed to oneDNN.

    Where PyTorch would pick its slow native kernel (:func:`native_bound`: batch 1, few
    channels), the volume is cut into two halves along its first spatial axis, each with the
    rows its outputs read (the 1-voxel zero padding made explicit there), and the halves are
    convolved as a batch of 2 with padding ``(0, 1, 1)``: the same sums, every output voxel
    computed once, and a batch of 2 goes to oneDNN forward and backward. Autograd sees pad,
    slice, cat and conv, so gradients are exact too. Eager only (under ``torch.compile`` the
    plain call is kept); other inputs (bf16 edge cases included) go to
    :func:`conv3d_float32_if_unsafe` or the plain call.

    Shapes: ``x (B, C, D, H, W)``, ``weight (O, C, 3, 3, 3)`` → ``(B, O, D', H', W')`` with
    ``D' = (D − 1) // stride + 1`` (likewise ``H'``, ``W'``).
    """
    if (safe := conv3d_float32_if_unsafe(x, weight, bias, stride=stride, padding=1)) is not None:
        return safe
    if not native_bound(x, weight):
        return torch.nn.functional.conv3d(x, weight, bias, stride=stride, padding=1)
    s = int(stride)
    d = x.shape[2]
    d_out = (d - 1) // s + 1
    h = (d_out + 1) // 2                      # outputs per half (the second may overhang)
    span = (h - 1) * s + 3                    # padded input rows one half reads
    right = max(1, (2 * h - 1) * s + 3 - d - 1)
    xp = torch.nn.functional.pad(x, (0, 0, 0, 0, 1, right))
    halves = torch.cat([xp[:, :, :span], xp[:, :, h * s : h * s + span]], 0)
    y = torch.nn.functional.conv3d(halves, weight, bias, stride=s, padding=(0, 1, 1))
    return torch.cat([y[:1], y[1:]], 2)[:, :, :d_out]


class Conv3x3(nn.Conv3d):
    """``nn.Conv3d(cin, cout, 3, stride, padding=1)`` whose forward is :func:`conv3d_k3`.

    Same parameters (names, shapes, initialisation) as the plain module, so checkpoints load
    either way. ``(B, cin, D, H, W) → (B, cout, D', H', W')``.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(cin, cout, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return conv3d_k3(x, self.weight, self.bias, self.stride[0])


def float32_only(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: run ``fn`` with autocast off (CPU and CUDA), i.e. in float32 even under a
    mixed-precision trainer — for methods whose result 16-bit arithmetic changes."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper
