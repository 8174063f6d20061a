"""Tests of the VoxelMorph baseline (``systems.voxelmorph``).

The fast network (channels-last activations, zero-padded input channels, "upsample +
concatenate + convolve" as a transposed convolution) is pinned against a straightforward
reference written here from the published description — plain ``conv``, LeakyReLU 0.2,
max-pooling, nearest 2× upsampling, zero padding to the skip's size, concatenation, flow
conv, trilinear resize of the field (magnitudes rescaled), scaling and squaring — evaluated
with the very same weights, forward and gradients, on even and odd sizes, 3D and 2D.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmark.core.spatial import integrate_velocity, warp
from systems.voxelmorph import VoxelMorph, VoxelMorphNet, VxmUNet, up_conv_weight

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- reference


def _ref_conv(x: torch.Tensor, conv: torch.nn.Module) -> torch.Tensor:
    f = F.conv3d if x.dim() == 5 else F.conv2d
    return F.leaky_relu(f(x, conv.weight, conv.bias, padding=1), 0.2)


def _ref_unet(unet: VxmUNet, x: torch.Tensor) -> torch.Tensor:
    """VoxelMorph's U-Net, written plainly, reading ``unet``'s weights."""
    pool = F.max_pool3d if x.dim() == 5 else F.max_pool2d
    skips = []
    for block in unet.enc:
        x = _ref_conv(x, block[0])
        skips.append(x)
        x = pool(x, 2)
    for block in unet.up:
        x = _ref_conv(x, block[0])
        skip = skips.pop()
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        pad = []
        for have, want in zip(reversed(x.shape[2:]), reversed(skip.shape[2:])):
            pad += [0, want - have]  # pooling floors, so the upsampled tensor is never larger
        x = torch.cat([F.pad(x, pad), skip], dim=1)
    for block in unet.extra:
        x = _ref_conv(x, block[0])
    return x


def _ref_resize(field: torch.Tensor, size: list[int]) -> torch.Tensor:
    mode = "trilinear" if field.dim() == 5 else "bilinear"
    out = F.interpolate(field, size=size, mode=mode, align_corners=True)
    for d, (new, old) in enumerate(zip(size, field.shape[2:])):
        out[:, d] = out[:, d] * ((new - 1) / (old - 1))
    return out


def _ref_net(net: VoxelMorphNet, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
    f = F.conv3d if moving.dim() == 5 else F.conv2d
    feats = _ref_unet(net.unet, torch.cat([moving, fixed], dim=1))
    flow = f(feats, net.flow.weight, net.flow.bias, padding=1)
    full = list(fixed.shape[2:])
    vel = _ref_resize(flow, [n // 2 for n in full])
    disp = _ref_resize(integrate_velocity(vel, 7), full)
    return {"disp": disp, "velocity": vel}


def _pair(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).detach())


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("shape", [(16, 16, 16), (19, 22, 17)])
def test_forward_and_gradients_match_reference(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = VoxelMorphNet()
    with torch.no_grad():  # a flow head large enough that the field is far from zero
        net.flow.weight.normal_(0.0, 2.0)
    moving, fixed = _pair(shape)
    got = net(moving, fixed)
    ref = _ref_net(net, moving, fixed)
    assert got["disp"].shape == (1, 3, *shape)
    assert got["velocity"].shape == (1, 3, *[n // 2 for n in shape])
    assert float(ref["disp"].detach().abs().max()) > 0.5  # a real deformation, in voxels
    assert _rel(got["velocity"], ref["velocity"]) < 1e-4
    assert _rel(got["disp"], ref["disp"]) < 1e-4
    # gradients of a loss through warp, for every parameter
    params = list(net.parameters())
    loss_got = (warp(moving, got["disp"]) - fixed).square().mean() + got["velocity"].square().mean()
    loss_ref = (warp(moving, ref["disp"]) - fixed).square().mean() + ref["velocity"].square().mean()
    g_got = torch.autograd.grad(loss_got, params)
    g_ref = torch.autograd.grad(loss_ref, params)
    for (name, _), a, b in zip(net.named_parameters(), g_got, g_ref):
        assert _rel(a, b) < 1e-3, name


@pytest.mark.parametrize("channels_last,fused_levels", [(True, 4), (False, 2), (False, 0), (True, 0)])
def test_speed_options_compute_the_same_function(channels_last: bool, fused_levels: int) -> None:
    torch.manual_seed(1)
    ref_unet = VxmUNet()
    unet = VxmUNet(channels_last=channels_last, fused_levels=fused_levels)
    unet.load_state_dict(ref_unet.state_dict())  # same parameter names and shapes
    x = torch.rand(2, 2, 21, 18, 23)
    got, want = unet(x), _ref_unet(ref_unet, x)
    assert _rel(got, want) < 1e-5
    weight = torch.rand_like(want)  # gradients through every path (skips, pooling, in-place backward)
    g_got = torch.autograd.grad((got * weight).sum(), list(unet.parameters()))
    g_ref = torch.autograd.grad((want * weight).sum(), list(ref_unet.parameters()))
    for (name, _), a, b in zip(unet.named_parameters(), g_got, g_ref):
        assert _rel(a, b) < 1e-4, name


def test_caller_gradients_are_left_alone() -> None:
    """Inner activations reuse their incoming gradient's memory; the output's must not (a
    caller's hook may keep the very tensor that autograd hands on to the network)."""
    unet = VxmUNet()
    out = unet(torch.rand(1, 2, 16, 16, 16)).view_as(torch.empty(1, 16, 16, 16, 16))
    kept: dict[str, torch.Tensor] = {}

    def hook(g: torch.Tensor) -> None:
        kept["grad"], kept["copy"] = g, g.clone()

    out.register_hook(hook)
    (out * torch.rand_like(out)).sum().backward()
    assert torch.equal(kept["grad"], kept["copy"])


#: Large enough in its first two axes that the first convolution (3 channels) and the
#: second level's (16 channels at half size) go to oneDNN, where the U-Net's hand-written
#: backward passes (_InputConv, _PoolConv) take over from autograd's; thin in the last axis.
LEAN_SHAPE = (96, 72, 16)


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, names, todo = set(), set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return names


def test_memory_lean_backward_matches_reference() -> None:
    """Where the U-Net rebuilds its padded input and its pooled skips in the backward pass
    instead of keeping them, forward and every parameter's gradient still equal the plain
    reference's; with an input that needs a gradient the plain path is taken and the
    input's gradient is right too."""
    torch.manual_seed(3)
    net = VoxelMorphNet(enc=(16, 16, 16, 16), dec=(16, 16, 16, 16, 16, 8, 8))
    with torch.no_grad():
        net.flow.weight.normal_(0.0, 0.5)
    moving, fixed = _pair(LEAN_SHAPE, seed=4)
    got, ref = net(moving, fixed), _ref_net(net, moving, fixed)
    names = _graph_names(got["disp"])
    assert {"_InputConvBackward", "_PoolConvBackward"} <= names, names  # the lean paths ran
    assert _rel(got["disp"], ref["disp"]) < 1e-4
    weight = torch.rand_like(ref["disp"])
    params = list(net.parameters())
    g_got = torch.autograd.grad((got["disp"] * weight).sum(), params)
    g_ref = torch.autograd.grad((ref["disp"] * weight).sum(), params)
    for (name, _), a, b in zip(net.named_parameters(), g_got, g_ref):
        assert _rel(a, b) < 1e-3, name

    # the input's gradient runs through the whole network; float32 rounding in the plain
    # reference alone is 4e-3 here, so the truth is the float64 reference (ours: 1.2e-3)
    moving.requires_grad_(True)
    got = net(moving, fixed)
    assert "_InputConvBackward" not in _graph_names(got["disp"])
    a = torch.autograd.grad((got["disp"] * weight).sum(), moving)[0]
    m64 = moving.detach().double().requires_grad_(True)
    ref = _ref_net(copy.deepcopy(net).double(), m64, fixed.double())
    b = torch.autograd.grad((ref["disp"] * weight.double()).sum(), m64)[0]
    assert _rel(a.double(), b) < 3e-3


def test_rebuilt_first_activation_survives_a_second_backward_and_refuses_edited_inputs() -> None:
    """The rebuilt activation is dropped after its last reader; a retained graph's second
    backward rebuilds it again (same gradients). Images edited in place between forward and
    backward cannot rebuild the activation they produced: a clear error, not a wrong gradient."""
    torch.manual_seed(7)
    net = VoxelMorphNet(enc=(16, 16, 16, 16), dec=(16, 16, 16, 16, 16, 8, 8))
    moving, fixed = _pair(LEAN_SHAPE, seed=8)
    import systems.voxelmorph as vxm_module

    calls = {"n": 0}
    first_conv = vxm_module._first_conv

    def counted(*args: object) -> torch.Tensor:
        calls["n"] += 1
        return first_conv(*args)

    vxm_module._first_conv = counted
    try:
        loss = net(moving, fixed)["disp"].square().sum()
        params = list(net.parameters())
        first = torch.autograd.grad(loss, params, retain_graph=True)
        assert calls["n"] == 2  # the forward pass, one rebuild
        second = torch.autograd.grad(loss, params)
        assert calls["n"] == 3  # one rebuild per backward pass, not one per reader
    finally:
        vxm_module._first_conv = first_conv
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    loss = net(moving, fixed)["disp"].square().sum()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the rebuild keeps the forward's precision
        third = torch.autograd.grad(loss, params)  # (before, oneDNN refused the bf16 rebuild)
    for a, b in zip(first, third):  # (autocast reaches a few backward ops elsewhere: not equal)
        assert _rel(b, a) < 1e-2
    decoder = [p for name, p in net.named_parameters() if not name.startswith("unet.enc")]
    loss = net(moving, fixed)["disp"].square().sum()
    with torch.no_grad():
        net.unet.enc[0][0].weight.mul_(3.0)  # as an optimizer step would, before a partial backward
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(loss, decoder)
    loss = net(moving, fixed)["disp"].square().sum()
    moving.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


@pytest.mark.parametrize("batch,channels_last,fused_levels", [(1, True, 2), (2, False, 0)])
def test_memory_lean_paths_are_bit_identical_to_autograds(batch: int, channels_last: bool, fused_levels: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-written backward passes call the kernels autograd would: forward and every
    gradient equal the plain path's exactly (the plain path forced by declaring no problem
    fit for them)."""
    import systems.voxelmorph as vxm_module

    torch.manual_seed(9)
    net = VoxelMorphNet(enc=(16, 16, 16, 16), dec=(16, 16, 16, 16, 16, 8, 8),
                        channels_last=channels_last, fused_levels=fused_levels)
    g = torch.Generator().manual_seed(10)
    moving, fixed = torch.rand(batch, 1, *LEAN_SHAPE, generator=g), torch.rand(batch, 1, *LEAN_SHAPE, generator=g)
    params = list(net.parameters())

    def run() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        disp = net(moving, fixed)["disp"]
        return disp.detach(), torch.autograd.grad(disp.square().sum(), params)

    lean, lean_grads = run()
    monkeypatch.setattr(vxm_module, "_direct_conv_ok", lambda *args: False)
    plain, plain_grads = run()
    assert torch.equal(lean, plain)
    for (name, _), a, b in zip(net.named_parameters(), lean_grads, plain_grads):
        assert torch.equal(a, b), name


def test_network_keeps_no_padded_input_indices_or_pooled_copies() -> None:
    """What a training forward pass leaves for the backward pass: none of the 3-channel
    padded input, the int64 pooling indices or the pooled copy of the first skip (each is
    rebuilt from tensors kept anyway). Checked on the tensors autograd saves, seen through
    saved-tensor hooks of the test's own, under which the first activation is saved as
    usual (it is the caller's hooks' to handle): the three 16-channel full-resolution
    activations."""
    net = VoxelMorphNet()
    moving, fixed = _pair(LEAN_SHAPE, seed=6)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(moving, fixed)["disp"].sum()
    half = tuple(n // 2 for n in LEAN_SHAPE)
    shapes = {(t.dtype, tuple(t.shape)) for t in saved}
    assert (torch.float32, (1, 3, *LEAN_SHAPE)) not in shapes
    assert (torch.float32, (1, 16, *half)) not in shapes
    assert not any(dtype == torch.int64 for dtype, _ in shapes)
    full16 = {t.untyped_storage().data_ptr() for t in saved if tuple(t.shape) == (1, 16, *LEAN_SHAPE)}
    assert len(full16) == 3


@pytest.mark.parametrize("tokens", [True, False])
def test_first_activation_is_not_held_by_the_graph(tokens: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the graph alive (the loss not yet differentiated) nothing holds the first level's
    output: autograd keeps tokens. Control: with the tokens switched off the same check sees
    the tensor held (so the check can fail). ``rebuild_first_activation=False`` rebuilds nothing."""
    import gc
    import weakref

    import systems.voxelmorph as vxm_module

    refs: list[weakref.ref] = []
    watch = vxm_module._RebuiltActivation.watch

    def recording_watch(self: object, t: torch.Tensor) -> None:
        refs.append(weakref.ref(t))
        watch(self, t)  # type: ignore[arg-type]

    monkeypatch.setattr(vxm_module._RebuiltActivation, "watch", recording_watch)
    if not tokens:
        monkeypatch.setattr(vxm_module._RebuiltActivation, "_pack", lambda self, t: t)
    net = VoxelMorphNet()
    moving, fixed = _pair(LEAN_SHAPE, seed=6)
    loss = net(moving, fixed)["disp"].square().sum()
    gc.collect()
    assert len(refs) == 1
    assert (refs[0]() is None) == tokens
    loss.backward()  # and the graph still differentiates
    assert all(p.grad is not None for p in net.parameters())
    refs.clear()
    VoxelMorphNet(rebuild_first_activation=False)(moving, fixed)["disp"].sum().backward()
    assert refs == []


@pytest.mark.parametrize("shape", [(32, 16), (35, 19)])
def test_2d_network_matches_reference(shape: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    net = VoxelMorphNet(ndim=2)
    with torch.no_grad():
        net.flow.weight.normal_(0.0, 2.0)
    moving, fixed = _pair(shape, seed=3)
    got, ref = net(moving, fixed), _ref_net(net, moving, fixed)
    assert got["disp"].shape == (1, 2, *shape)
    assert _rel(got["disp"], ref["disp"]) < 1e-4


@pytest.mark.parametrize("low,full", [((5, 6, 4), (10, 13, 9)), ((7, 5), (15, 10))])
def test_transposed_conv_equals_upsample_then_conv(low: tuple[int, ...], full: tuple[int, ...]) -> None:
    """The identity behind the fused decoder level, against interpolate + pad + conv."""
    nd = len(low)
    x = torch.randn(2, 4, *low, dtype=torch.float64)
    w = torch.randn(3, 4, *([3] * nd), dtype=torch.float64)
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    pad = []
    for have, want in zip(reversed(up.shape[2:]), reversed(full)):
        pad += [0, want - have]
    conv = F.conv3d if nd == 3 else F.conv2d
    want = conv(F.pad(up, pad), w, padding=1)
    convt = F.conv_transpose3d if nd == 3 else F.conv_transpose2d
    extra = [n - 2 * m for n, m in zip(full, low)]
    got = convt(x, up_conv_weight(w), stride=2, padding=1, output_padding=extra)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def _blob_pair(shape: tuple[int, ...], shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    axes = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")

    def blob(cx: float) -> torch.Tensor:
        return torch.exp(-((x - cx) ** 2 + y**2 + z**2) / (2 * 3.0**2))

    return blob(-shift)[None, None], blob(shift)[None, None]


@pytest.mark.parametrize("similarity", ["ncc", "mse"])
def test_training_steps_decrease_the_loss(similarity: str) -> None:
    torch.manual_seed(0)
    model = VoxelMorph(lambda_=0.01, lr=1e-3, similarity=similarity)
    opt = model.configure_optimizers()
    moving, fixed = _blob_pair((20, 16, 18), shift=2.0)
    batch = {"moving": moving, "fixed": fixed}
    losses = []
    for _ in range(12):
        opt.zero_grad(set_to_none=True)
        loss, parts = model.training_loss(batch)
        assert set(parts) == {"sim", "reg"}
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05 * abs(losses[0])
    with torch.no_grad():
        disp = model.register(batch)
    assert disp.shape == (1, 3, 20, 16, 18)
    # the learned field moves the moving blob towards the fixed one (+x at the centre)
    assert float(disp[0, 0, 10, 8, 9]) < 0.0


@pytest.mark.parametrize("shape", [(9, 11, 13), (15, 7, 10)])
def test_odd_sizes_train(shape: tuple[int, ...]) -> None:
    model = VoxelMorph(enc=(8, 8), dec=(8, 8, 8))
    moving, fixed = _pair(shape, seed=5)
    loss, _ = model.training_loss({"moving": moving, "fixed": fixed})
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.register({"moving": moving, "fixed": fixed}).shape == (1, 3, *shape)


def test_bad_similarity_is_refused() -> None:
    with pytest.raises(ValueError, match="similarity"):
        VoxelMorph(similarity="mi")


def test_perf_training_child_reports_a_step() -> None:
    """The harness's child process measures our step and reports time and peak RSS."""
    from benchmark.perf.training import perf_vxm_training

    res = perf_vxm_training(sizes=((16, 16, 16),), repeats=1, threads=1, tools=("ours",), verbose=False)
    r = res["results"]["16x16x16"]["ours"]
    assert r["status"] == "measured", r.get("message")
    assert r["step_s"] > 0 and r["peak_mb"] >= r["base_mb"] > 0
    # the whole step's work: every convolution's backward computes two products as large as its
    # forward (input and weight gradients) except the first one's input gradient (the images
    # need none), so the step counts just under three forward passes
    assert 2.85 < r["step_gflop"] / (2 * r["fwd_gmac"]) < 3.0
    assert r["gemm_gflops"] > 0 and r["floor_s"] == pytest.approx(r["step_gflop"] / r["gemm_gflops"])


def test_perf_training_floor_is_ours_work_at_the_gemm_rate_over_the_peers_step() -> None:
    """``floor_s`` = ours' step GFLOP / this machine's GEMM rate; its ratio is to each peer's
    median step (hand-made runs, so the arithmetic is checked against known numbers)."""
    from benchmark.perf.training import _summarise, format_perf_training

    def run(step_s: float, **extra: float) -> dict:
        return {"step_s": [step_s], "cpu_s": [step_s], "peak_mb": [100.0], "base_mb": [50.0], **extra}

    raw = {"8x8x8": {
        "ours": {"status": "measured", "runs": [run(2.0, step_gflop=300.0, gemm_gflops=150.0),
                                                run(2.2, step_gflop=300.0, gemm_gflops=200.0)]},
        "vxm": {"status": "measured", "runs": [run(2.5, step_gflop=90.0)]},
        "vxm02": {"status": "measured", "runs": [run(4.0)]},
    }}
    res = _summarise(raw, repeats=2, final=True)
    ours = res["results"]["8x8x8"]["ours"]
    assert ours["gemm_gflops"] == 175.0 and ours["floor_s"] == pytest.approx(300.0 / 175.0)
    assert res["fastest_peer"]["8x8x8"] == "vxm"
    assert res["ratios"]["8x8x8"]["vxm"]["floor"] == pytest.approx(300.0 / 175.0 / 2.5)
    assert res["ratios"]["8x8x8"]["vxm02"]["floor"] == pytest.approx(300.0 / 175.0 / 4.0)
    assert "floor_s" not in res["results"]["8x8x8"]["vxm"]  # a peer's own GEMM rate is not measured
    head = {"settings": {"threads": 2, "loss": "mse", "repeats": 2, "steps": 1}, "device": {"cpu_count": 2}}
    assert "take 1.71 s = 0.69x vxm's step" in format_perf_training({**head, **res})


def test_perf_training_keeps_what_it_measured_as_it_goes(tmp_path: Path) -> None:
    """The JSON is rewritten after every measured process (a crash an hour in loses nothing):
    the partial reports grow one run at a time and say they are incomplete; the last file on
    disk is the complete report."""
    from benchmark.perf.training import main_perf_training, perf_vxm_training

    updates: list[dict] = []
    res = perf_vxm_training(sizes=((16, 16, 16),), repeats=2, threads=1, tools=("ours",), verbose=False,
                            on_update=lambda partial: updates.append(partial))
    assert [len(u["results"]["16x16x16"]["ours"]["runs"]) for u in updates] == [1, 2]
    assert [u["complete"] for u in updates] == [False, False] and res["complete"] is True
    assert updates[0]["results"]["16x16x16"]["ours"]["step_s"] > 0  # medians of what is there
    out = tmp_path / "perf.json"
    main_perf_training(out=str(out), sizes=((16, 16, 16),), repeats=1, threads=1, tools=("ours",))
    import json

    on_disk = json.loads(out.read_text())
    assert on_disk["complete"] is True and len(on_disk["results"]["16x16x16"]["ours"]["runs"]) == 1


def test_perf_training_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "benchmark.perf.training", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--sizes" in out.stdout


def test_conv_with_short_axis_moved_last_equals_plain_conv() -> None:
    """A 16-channel 32×40×40 input (PyTorch's native-kernel size, the 5 mm built-in brain) is
    convolved with its short axis moved last; forward and gradients equal a plain conv3d."""
    import torch.nn.functional as F

    from systems.voxelmorph import _conv_nd

    g = torch.Generator().manual_seed(0)
    for shape in [(32, 40, 40), (40, 32, 40)]:
        x = torch.randn(1, 16, *shape, generator=g, requires_grad=True)
        w = torch.randn(8, 16, 3, 3, 3, generator=g, requires_grad=True)
        b = torch.randn(8, generator=g, requires_grad=True)
        up = torch.randn(1, 8, *shape, generator=g)
        ref = F.conv3d(x, w, b, padding=1)
        ref_grads = torch.autograd.grad(ref, (x, w, b), up)
        for channels_last in (True, False):
            out = _conv_nd(x, w, b, channels_last)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            for got, want in zip(torch.autograd.grad(out, (x, w, b), up), ref_grads):
                # float32 sums over 51,200 voxels in another order: relative to the largest entry
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
