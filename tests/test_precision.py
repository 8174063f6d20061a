"""Mixed precision and ``torch.compile`` for every learned system (issue 20, item 2).

The truth for a bf16 step is the same step in float32 on the same weights and data: under
``torch.autocast(cpu, bfloat16)`` only convolutions / linear layers run in 16 bits (about 3
significant digits), and every system keeps its fields, losses and FFTs in float32
(:mod:`systems.speed`). Stated tolerances:

* training loss: finite, ``|loss_bf16 - loss_fp32| <= 2 % · |loss_fp32| + 1e-3`` (DiffOp-net:
  5 %, its energy holds ``½‖Lv‖²``, a squared Laplacian of the network's 16-bit output, which
  weighs the rounding noise by the squared frequency);
* gradient (all parameters, one vector): cosine with the float32 gradient >= 0.95;
* registration: a float32 field within 5 % of the float32 field's largest magnitude.

``compile`` against eager: the same weights give the same field within 1e-4 voxel (inductor
reorders float sums, nothing more).

Weights whose initial spread is tiny (the flow heads, initialised at N(0, 1e-5) so the
first field is the identity) are redrawn at N(0, 0.02) so that the field — and the bf16 error
in it — is not trivially zero.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch

from benchmark.core.spatial import gaussian_smooth
from systems.diffop import DiffOpNet
from systems.msff import MSFF
from systems.patchmorph import PatchMorph
from systems.speed import check_compile, compile_modules
from systems.voxelmorph import VoxelMorph

LOSS_REL_TOL = 0.02
LOSS_REL_TOL_PER_SYSTEM = {"diffop": 0.05}
GRAD_COSINE_MIN = 0.95
FIELD_REL_TOL = 0.05


def _pair(n: int = 32) -> dict[str, Any]:
    """A smooth random image and a copy shifted 2 voxels along axis 0, intensities in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    f = gaussian_smooth(torch.rand(1, 1, n, n, n, generator=g), 2.0)
    m = torch.roll(f, 2, 2)
    f = (f - f.min()) / (f.max() - f.min())
    m = (m - m.min()) / (m.max() - m.min())
    a = torch.eye(4)[None]
    return {"fixed": f, "moving": m, "fixed_affine": a, "moving_affine": a.clone()}


def _wake(model: torch.nn.Module) -> None:
    """Redraw near-zero weight tensors (identity-initialised heads) at N(0, 0.02)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and float(p.std()) < 1e-3:
                p.normal_(0.0, 0.02, generator=g)


SYSTEMS: dict[str, Callable[..., torch.nn.Module]] = {
    "voxelmorph": lambda **kw: VoxelMorph(enc=(8, 8, 8, 8), dec=(8, 8, 8, 8, 8, 8, 8), ncc_window=5, **kw),
    "msff": lambda **kw: MSFF(width=2, width_mults=(1, 2, 2, 2, 2), ncc_window=5, **kw),
    "diffop": lambda **kw: DiffOpNet(width=4, ncc_window=3, **kw),
    "patchmorph": lambda **kw: PatchMorph(patch_size=8, extents_mm=(20.0, 10.0), train_patches=2, ncc_window=5,
                                          backbone_args={"enc": [8, 8], "dec": [8, 8, 8]}, **kw),
}


def _loss_and_grad(model: torch.nn.Module, batch: dict[str, Any], bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # PatchMorph draws its training patches
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = model.training_loss(batch)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grad


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_bf16_training_step_and_registration_match_float32(name: str, one_thread) -> None:
    torch.manual_seed(0)
    model = SYSTEMS[name]()
    _wake(model)
    batch = _pair()
    l32, g32 = _loss_and_grad(model, batch, bf16=False)
    l16, g16 = _loss_and_grad(model, batch, bf16=True)
    assert l16.dtype == torch.float32, "the loss must be computed in float32 under autocast"
    assert math.isfinite(float(l16)) and bool(torch.isfinite(g16).all())
    tol = LOSS_REL_TOL_PER_SYSTEM.get(name, LOSS_REL_TOL)
    assert abs(float(l16) - float(l32)) <= tol * abs(float(l32)) + 1e-3, (float(l32), float(l16))
    cos = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
    assert cos >= GRAD_COSINE_MIN, cos
    with torch.no_grad():
        d32 = model.register(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d16 = model.register(batch)
    assert d16.dtype == torch.float32, "registration must return a float32 field under autocast"
    scale = float(d32.abs().max())
    assert scale > 0.02, "the woken network should produce a non-trivial field"
    assert float((d16 - d32).abs().max()) <= FIELD_REL_TOL * scale


def test_bf16_changes_the_result_so_the_comparison_can_fail(one_thread) -> None:
    """The bf16 run is really in 16 bits: the field differs from float32 (not bit-identical)."""
    torch.manual_seed(0)
    model = SYSTEMS["voxelmorph"]()
    _wake(model)
    batch = _pair()
    with torch.no_grad():
        d32 = model.register(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d16 = model.register(batch)
    assert float((d16 - d32).abs().max()) > 1e-6


def test_cdreg_keeps_float32_under_bf16_autocast(one_thread) -> None:
    """cdreg follows the direction of dS/dtheta, which 16-bit convolutions change (see
    CDReg.similarity), so its network runs in float32 under autocast: the training loss and
    its gradient are float32's to rounding, and the pose gradient keeps its direction."""
    from datamodules.spine import SpineDRRDataModule, collate_pose
    from systems.cdreg import CDReg

    torch.manual_seed(0)
    dm = SpineDRRDataModule(n_train_cts=1, n_test_cts=1, synthetic_size=24, synthetic_spacing=6.0, height=32, width=32,
                            pixel_mm=8.0, n_samples=16, poses_per_ct=1, domain_randomization=False)
    ds = dm.dataset("train")
    batch = collate_pose([ds[i] for i in range(2)])
    model = CDReg(widths=(4, 8, 8, 16, 16), n_samples=16)
    theta = batch["pose_true"] + torch.tensor([0.05, -0.03, 0.02, 4.0, -3.0, 6.0])
    out = []
    for bf16 in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.training_loss(batch, theta=theta)
        loss.backward()
        out.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (l32, g32), (l16, g16) = out
    assert l16.dtype == torch.float32 and math.isfinite(float(l16)) and bool(torch.isfinite(g16).all())
    assert abs(float(l16) - float(l32)) <= 1e-4 * abs(float(l32)) + 1e-5, (float(l32), float(l16))
    assert float(torch.nn.functional.cosine_similarity(g32, g16, dim=0)) >= 0.999


def test_compile_argument_is_checked() -> None:
    assert check_compile(False) is False and check_compile(True) is True
    assert check_compile("aot_eager") == "aot_eager" and check_compile("false") is False
    with pytest.raises(ValueError, match="no_such_backend"):
        check_compile("no_such_backend")
    with pytest.raises(ValueError, match="compile"):
        VoxelMorph(compile="no_such_backend")
    with pytest.raises(ValueError, match="compile must be"):
        check_compile(3)  # type: ignore[arg-type]


def _compile_matches_eager(model: Any, backend: str, batch: dict[str, Any], grads: bool = True) -> None:
    """Compile ``model``'s networks with ``backend`` the way Lightning does (``configure_model``)
    and check field, loss and gradient against the same model eager."""
    with torch.no_grad():
        eager = model.register(batch)
    if grads:
        l_e, g_e = _loss_and_grad(model, batch, bf16=False)
    model.configure_model()  # what Lightning calls before fit / test
    assert model.networks() and all(getattr(m, "_regbench_compiled", None) == backend for m in model.networks())
    assert compile_modules(model.networks(), backend) == 0, "a second call must not recompile"
    with torch.no_grad():
        comp = model.register(batch)
    assert float((comp - eager).abs().max()) <= 1e-4
    if grads:
        l_c, g_c = _loss_and_grad(model, batch, bf16=False)
        assert abs(float(l_c) - float(l_e)) <= 1e-4 * abs(float(l_e)) + 1e-6
        assert float(torch.nn.functional.cosine_similarity(g_e, g_c, dim=0)) >= 0.9999
    # the parameter names (checkpoints) are those of the eager model
    assert not any("_orig_mod" in k for k in model.state_dict())


@pytest.mark.parametrize("name", [n if n == "voxelmorph" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(SYSTEMS)])
def test_compile_captures_every_network_and_matches_eager(name: str, one_thread) -> None:
    """Every network goes through dynamo's graph capture (backend ``eager``: the graphs that
    inductor would compile, run as captured) and gives eager's field, loss and gradient
    (msff, diffop, patchmorph: 45-85 s each at load 20 on 2 cores, hence ``slow``)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SYSTEMS[name](compile="eager")
    _wake(model)
    _compile_matches_eager(model, "eager", _pair(16 if name != "msff" else 32))


@pytest.mark.slow
def test_compile_aot_autograd_voxelmorph_matches_eager(one_thread) -> None:
    """AOT autograd (``aot_eager``: the joint forward/backward graph inductor compiles,
    without code generation) through VoxelMorph's in-place activations."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = VoxelMorph(enc=(4, 4), dec=(4, 4, 4), ncc_window=3, compile="aot_eager")
    _wake(model)
    _compile_matches_eager(model, "aot_eager", _pair(16))


@pytest.mark.slow
def test_compile_inductor_voxelmorph_registration_matches_eager(one_thread) -> None:
    """The default backend (``compile: true``: inductor, generated C++) on a small VoxelMorph:
    the registration field equals eager's (forward only, to keep the code generation short)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = VoxelMorph(enc=(4, 4), dec=(4, 4, 4), ncc_window=3, compile=True)
    _wake(model)
    _compile_matches_eager(model, "inductor", _pair(16), grads=False)


def test_trainer_bf16_mixed_fits_and_tests_voxelmorph(tmp_path, one_thread) -> None:
    """Lightning's ``precision="bf16-mixed"`` end to end: a few steps, finite loss, float32 fields."""
    import lightning as L

    from datamodules.synthetic_brain import SyntheticBrainDataModule

    torch.manual_seed(0)
    dm = SyntheticBrainDataModule(size=32, n_train=2, n_val=2, n_test=2, batch_size=1)
    model = SystemsRecorder.wrap(SYSTEMS["voxelmorph"](lr=1e-3))
    trainer = L.Trainer(precision="bf16-mixed", max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        limit_val_batches=0, inference_mode=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    assert model.losses and all(math.isfinite(v) for v in model.losses)
    assert model.autocast_seen, "training_step did not run under autocast"
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.test_records and all(math.isfinite(r["dice"]) for r in model.test_records)
    assert all(d == torch.float32 for d in model.field_dtypes)


class SystemsRecorder:
    """Records what a system saw during ``fit`` / ``test`` (losses, autocast, field dtypes)."""

    @staticmethod
    def wrap(model: Any) -> Any:
        model.losses, model.field_dtypes, model.autocast_seen = [], [], False
        step, register = model.training_step, model.register

        def training_step(batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            model.autocast_seen |= torch.is_autocast_enabled("cpu")
            loss = step(batch, batch_idx)
            model.losses.append(float(loss.detach()))
            return loss

        def reg(batch: dict[str, Any]) -> torch.Tensor:
            d = register(batch)
            model.field_dtypes.append(d.dtype)
            return d

        model.training_step, model.register = training_step, reg
        return model


@pytest.mark.parametrize("shape,stride", [((32, 40, 40), 1), ((33, 9, 10), 1), ((32, 40, 40), 2), ((5, 7, 6), 2),
                                          ((4, 4, 4), 1)])
def test_split_conv_equals_plain_conv_and_leaves_the_native_kernel(shape, stride, one_thread) -> None:
    """:func:`systems.speed.conv3d_k3` cuts a small batch-1 volume into two halves convolved as a
    batch of 2: output and all three gradients equal a plain ``conv3d`` (odd and even depths,
    stride 1 and 2), and the profiler shows oneDNN instead of PyTorch's native kernel."""
    import torch.nn.functional as F
    from torch.profiler import profile

    from systems.speed import conv3d_k3, native_bound

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, *shape, generator=g, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    assert native_bound(x, w)
    ref = F.conv3d(x, w, b, stride=stride, padding=1)
    with profile() as prof:
        out = conv3d_k3(x, w, b, stride)
    names = {e.key for e in prof.key_averages()}
    assert "aten::slow_conv3d_forward" not in names and "aten::mkldnn_convolution" in names
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    up = torch.randn(ref.shape, generator=g)
    for a, c in zip(torch.autograd.grad(ref, (x, w, b), up), torch.autograd.grad(out, (x, w, b), up)):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-3 * float(a.abs().max()))
    # not small: the plain call (nothing to gain)
    assert not native_bound(torch.zeros(1, 32, 40, 48, 48), w.new_zeros(8, 32, 3, 3, 3))
    assert not native_bound(torch.zeros(2, 8, 32, 40, 40), w)
