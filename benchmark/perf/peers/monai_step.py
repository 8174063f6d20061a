"""Time MONAI ``VoxelMorph`` training steps — executed INSIDE a peer venv.

Started by :func:`benchmark.perf.training.perf_vxm_training` as
``<peer python> monai_step.py ...``; imports nothing of regbench and writes one JSON file
(``--out``) with the same fields as ``vxm_step.py`` (whose RSS sampler it uses: both scripts
sit in the same folder). One training step = forward + loss + backward + Adam step, batch 1,
float32 on CPU, timed on the wall and process CPU clocks, peak RSS sampled every 5 ms.

Model: ``monai.networks.nets.VoxelMorph()`` with MONAI's defaults — ``VoxelMorphUNet``
(channels 16-32-32-32-32-32, final convs 16-16, LeakyReLU 0.2), 7 integration steps
(``DVF2DDF``); ``half_res`` False by default (the velocity is integrated at full resolution;
``--half-res`` integrates at half resolution as the published VoxelMorph does). Loss:
``torch.nn.MSELoss`` (or ``monai.losses.LocalNormalizedCrossCorrelationLoss``, window 9) on
the warped moving image + ``lambda · monai.losses.DiffusionLoss`` on the displacement.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np
import torch

from vxm_step import PeakRss, forward_gmac, rss_mb, step_gflop  # same folder: the script's directory is on sys.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", required=True, help="spatial size, e.g. 96,96,96")
    p.add_argument("--loss", default="mse", choices=("mse", "ncc"))
    p.add_argument("--lam", type=float, default=0.01)
    p.add_argument("--half-res", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    size = tuple(int(s) for s in a.size.split(","))
    torch.manual_seed(a.seed)
    warnings.filterwarnings("ignore", message=".*native grid_sample.*")
    import monai
    from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss
    from monai.networks.nets import VoxelMorph

    model = VoxelMorph(half_res=a.half_res)
    model.train()
    if a.loss == "ncc":
        sim = LocalNormalizedCrossCorrelationLoss(spatial_dims=len(size), kernel_size=9)
    else:
        sim = torch.nn.MSELoss()
    reg = DiffusionLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = np.random.default_rng(a.seed)
    moving = torch.from_numpy(g.random((1, 1, *size), dtype=np.float32))
    fixed = torch.from_numpy(g.random((1, 1, *size), dtype=np.float32))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        warped, ddf = model(moving, fixed)
        loss = sim(warped, fixed) + a.lam * reg(ddf)
        loss.backward()
        opt.step()
        return float(loss.detach())

    rec: dict = {"tool": f"monai {monai.__version__}",
                 "settings": f"VoxelMorph defaults (half_res={a.half_res}, integration_steps 7)",
                 "size": list(size), "loss_kind": a.loss, "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "step_s": [], "cpu_s": [], "peak_mb": [], "base_mb": [], "loss": []}
    for _ in range(a.warmup):
        step()
    rec["fwd_gmac"] = forward_gmac(lambda: model(moving, fixed))
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
