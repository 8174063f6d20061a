"""Time VoxelMorph training steps of the ``voxelmorph`` package — executed INSIDE a peer venv.

This script imports nothing of regbench (the peer venv does not have it). It is started by
:func:`benchmark.perf.training.perf_vxm_training` as ``<peer python> vxm_step.py ...`` and
writes one JSON file (``--out``). One training step = forward + loss + backward + Adam step,
batch 1, float32 on CPU; every step is timed on the wall clock and on the process CPU clock,
and the peak resident set size during the step is sampled every 5 ms from
``/proc/self/statm`` (MB, the whole process: Python, torch, model, data), as the suite's
``benchmark.core.timing.timed_call`` does for its own steps. ``--warmup`` untimed steps come first.

Models (whichever ``voxelmorph`` the venv holds):

* voxelmorph 0.2.x (``VXM_BACKEND=pytorch``, and ``NEURITE_BACKEND=pytorch`` for its neurite
  0.2): ``vxm.networks.VxmDense`` in its default, published configuration — U-Net encoder
  16-32-32-32, decoder 32-32-32-32-32-16-16, LeakyReLU 0.2, velocity at half resolution, 7 scaling-and-squaring steps; the same network
  as regbench's ``VoxelMorph``. Loss: ``vxm.losses.MSE`` (or ``NCC``; 0.2's torch NCC puts
  its window on "cuda" and cannot run on CPU) + ``lambda · vxm.losses.Grad('l2')`` on the
  pre-integration (half-resolution) velocity.
* voxelmorph 0.3.x: ``vxm.nn.models.VxmPairwise(ndim=3, source_channels=1,
  target_channels=1)`` with the package's defaults (neurite ``BasicUNet`` 16-16-16-16-16,
  ReLU, full-resolution velocity, 5 integration steps: a lighter network than the published
  VoxelMorph). Loss: ``neurite.nn.modules.MSE`` + ``lambda · SpatialGradient('l2')`` on the
  velocity.

voxelmorph 0.2 calls ``inspect.getargspec``, which Python 3.11 removed; a shim returning the
first four fields of ``inspect.getfullargspec`` is installed before the import.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import threading
import time

import numpy as np

os.environ.setdefault("VXM_BACKEND", "pytorch")
os.environ.setdefault("NEURITE_BACKEND", "pytorch")  # neurite 0.2 (voxelmorph 0.2's) imports tensorflow otherwise
if not hasattr(inspect, "getargspec"):  # Python >= 3.11; voxelmorph 0.2's modelio needs it
    inspect.getargspec = lambda func: inspect.getfullargspec(func)[:4]  # type: ignore[attr-defined]

import torch  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Resident set size of this process now (MB)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE / 2**20


class PeakRss:
    """Samples the RSS every ``interval`` s in a thread while the ``with`` block runs."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def build(size: tuple[int, ...], loss: str, lam: float):
    """Model and a ``step_loss(moving, fixed) -> loss`` closure for the installed voxelmorph."""
    import voxelmorph as vxm

    version = str(getattr(vxm, "__version__", "?"))
    if version.startswith("0.2") or version in ("0.1",):
        model = vxm.networks.VxmDense(list(size), int_steps=7, int_downsize=2)
        if loss == "ncc":
            sim = vxm.losses.NCC().loss
        else:
            sim = vxm.losses.MSE().loss
        grad = vxm.losses.Grad("l2").loss

        def step_loss(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
            warped, preint = model(moving, fixed)
            return sim(fixed, warped) + lam * grad(None, preint)

        settings = "VxmDense default (enc 16-32-32-32, dec 32-32-32-32-32-16-16, int_steps 7, int_downsize 2)"
        return model, step_loss, f"voxelmorph {version}", settings
    import neurite as ne

    model = vxm.nn.models.VxmPairwise(ndim=len(size), source_channels=1, target_channels=1)
    if loss == "ncc":
        sim_mod = ne.nn.modules.NCC()
    else:
        sim_mod = ne.nn.modules.MSE()
    reg = ne.nn.modules.SpatialGradient("l2")

    def step_loss(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        velocity, warped = model(moving, fixed, return_warped_source=True, return_field_type="velocity")
        return sim_mod(warped, fixed) + lam * reg(velocity)

    settings = "VxmPairwise defaults (BasicUNet 16x5, ReLU, integration_steps 5, full-resolution velocity)"
    return model, step_loss, f"voxelmorph {version}", settings


def forward_gmac(fn) -> float:
    """Multiply-adds (10⁹) of one call of ``fn`` without autograd, by torch's FlopCounterMode
    (convolutions and matrix products; what the network computes, whatever its layout)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 2e9


def step_gflop(fn) -> float:
    """Floating-point operations (10⁹) of one call of ``fn`` with autograd (a whole training
    step, backward included), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", required=True, help="spatial size, e.g. 96,96,96")
    p.add_argument("--loss", default="mse", choices=("mse", "ncc"))
    p.add_argument("--lam", type=float, default=0.01, help="weight of the gradient regulariser")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pad-multiple", type=int, default=1,
                   help="zero-pad every axis at its end up to a multiple of this (VxmPairwise needs 32)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    asked = tuple(int(s) for s in a.size.split(","))
    m = max(a.pad_multiple, 1)
    size = tuple(-(-n // m) * m for n in asked)  # the padded grid the network runs on
    torch.manual_seed(a.seed)
    model, step_loss, version, settings = build(size, a.loss, a.lam)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = np.random.default_rng(a.seed)
    moving = torch.zeros((1, 1, *size))
    fixed = torch.zeros((1, 1, *size))
    inner = (0, 0) + tuple(slice(0, n) for n in asked)
    moving[inner] = torch.from_numpy(g.random((1, 1, *asked), dtype=np.float32))[0, 0]
    fixed[inner] = torch.from_numpy(g.random((1, 1, *asked), dtype=np.float32))[0, 0]
    if size != asked:
        settings += f"; zero-padded {'x'.join(map(str, asked))} -> {'x'.join(map(str, size))}"

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = step_loss(moving, fixed)
        loss.backward()
        opt.step()
        return float(loss.detach())

    rec: dict = {"tool": version, "settings": settings, "size": list(asked), "run_size": list(size), "loss_kind": a.loss,
                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "step_s": [], "cpu_s": [], "peak_mb": [], "base_mb": [], "loss": []}
    for _ in range(a.warmup):
        step()
    rec["fwd_gmac"] = forward_gmac(lambda: step_loss(moving, fixed))
    rec["step_gflop"] = step_gflop(step)
    for _ in range(a.steps):
        rec.setdefault("loadavg_1min", []).append(os.getloadavg()[0])
        base = rss_mb()
        with PeakRss() as sampler:
            t0, c0 = time.perf_counter(), time.process_time()
            val = step()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        rec["step_s"].append(dt)
        rec["cpu_s"].append(dc)
        rec["peak_mb"].append(sampler.peak)
        rec["base_mb"].append(base)
        rec["loss"].append(val)
    with open(a.out, "w") as fh:
        json.dump(rec, fh)


if __name__ == "__main__":
    main()
