"""Dice against regularity of SyN settings on the real OASIS pair (issue 20, item 1).

Runs :class:`systems.syn.GreedySyN` with one preset plus overrides per line and prints Dice
(labels 1 and 2), the number of folded voxels (det J <= 0), SDlogJ (all voxels; inside the
fixed brain mask, label > 0; outside it) and the time of the registration call, as
``regbench perf systems`` measures them (:func:`benchmark.perf.systems.registration_metrics`),
without the peers::

    OMP_NUM_THREADS=1 python scripts/syn_frontier.py                       # every setting below
    python scripts/syn_frontier.py --only accurate,free --threads 2 --reverse

The settings are the ones docs/methods.md reports (SyN, "the frontier"); the first part varies
``accurate`` as it was before the volume penalty (``free``), the second the penalty.
"""

from __future__ import annotations

import argparse
import os
import time

import benchmark  # noqa: F401  (OpenMP wait policy before torch)
import numpy as np
import torch

from benchmark.core import metrics as M
from benchmark.perf.systems import load_brain_pair, registration_metrics
from systems.syn import GreedySyN

#: ``accurate`` as it was before the volume penalty (the table's first part varies it)
_FREE = {"jacobian_weight": 0.0, "smooth_warp_sigma": 0.7}

#: name -> (preset, overrides)
SETTINGS: dict[str, tuple[str, dict]] = {
    # Gaussian smoothing and the optimiser's knobs, without the volume penalty
    "free": ("accurate", dict(_FREE)),
    "window_9": ("accurate", {**_FREE, "cc_window": 9}),
    "window_11": ("accurate", {**_FREE, "cc_window": 11}),
    "window_9_warp_0.5": ("accurate", {**_FREE, "cc_window": 9, "smooth_warp_sigma": 0.5}),
    "grad_1.5": ("accurate", {**_FREE, "smooth_grad_sigma": 1.5}),
    "grad_2": ("accurate", {**_FREE, "smooth_grad_sigma": 2.0}),
    "grad_2_warp_0.5": ("accurate", {**_FREE, "smooth_grad_sigma": 2.0, "smooth_warp_sigma": 0.5}),
    "warp_1.0": ("accurate", {**_FREE, "smooth_warp_sigma": 1.0}),
    "warp_1.2": ("accurate", {**_FREE, "smooth_warp_sigma": 1.2}),
    "window_11_warp_1.0": ("accurate", {**_FREE, "cc_window": 11, "smooth_warp_sigma": 1.0}),
    "adam_eps_1e-7": ("accurate", {**_FREE, "adam_eps": 1e-7}),
    "adam_eps_1e-6": ("accurate", {**_FREE, "adam_eps": 1e-6}),
    "ants_local_gradient": ("accurate", {**_FREE, "cc_gradient": "local"}),
    "image_sigmas_2_1_0.7": ("accurate", {**_FREE, "image_sigmas": [2.0, 1.0, 0.7]}),
    "iterations_100_100_5": ("accurate", {**_FREE, "iterations": [100, 100, 5]}),
    "window_9_warp_1.1_100_100_5": ("accurate", {**_FREE, "cc_window": 9, "smooth_warp_sigma": 1.1,
                                                 "iterations": [100, 100, 5]}),
    # the volume penalty (jacobian_weight) with field smoothing
    "jac_0.4_warp_0.6": ("accurate", {"jacobian_weight": 0.4}),
    "accurate": ("accurate", {}),
    "jac_0.8_warp_0.6": ("accurate", {"jacobian_weight": 0.8}),
    "jac_0.8_warp_0.65": ("accurate", {"jacobian_weight": 0.8, "smooth_warp_sigma": 0.65}),
    "jac_1.0_warp_0.65": ("accurate", {"jacobian_weight": 1.0, "smooth_warp_sigma": 0.65}),
    "jac_0.8_warp_0.5": ("accurate", {"jacobian_weight": 0.8, "smooth_warp_sigma": 0.5}),
    "jac_0.8_warp_0.7": ("accurate", {"jacobian_weight": 0.8, "smooth_warp_sigma": 0.7}),
    "jac_1.2_warp_0.5": ("accurate", {"jacobian_weight": 1.2, "smooth_warp_sigma": 0.5}),
    "regular": ("regular", {}),
    "fast": ("fast", {}),
    "fast_jac_0.8": ("fast", {"jacobian_weight": 0.8}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated names of SETTINGS")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--reverse", action="store_true", help="image_B -> image_A (the presets were tuned on A -> B)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    names = a.only.split(",") if a.only else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"--only: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    pair = load_brain_pair(moving="image_B", fixed="image_A") if a.reverse else load_brain_pair()
    mv = torch.from_numpy(np.ascontiguousarray(pair.moving)).float()[None, None]
    fx = torch.from_numpy(np.ascontiguousarray(pair.fixed)).float()[None, None]
    brain = torch.from_numpy(np.ascontiguousarray(pair.fixed_seg) > 0)
    print(f"{'setting':28s} {'Dice':>6s} {'folds':>6s} {'SDlogJ':>7s} {'brain':>6s} {'other':>6s} {'wall s':>7s} {'cpu s':>7s}  "
          f"({'B -> A' if a.reverse else 'A -> B'}, {a.threads} threads)", flush=True)
    for name in names:
        preset, overrides = SETTINGS[name]
        eng = GreedySyN.preset(preset, **overrides)
        t0, c0 = time.perf_counter(), time.process_time()
        out = eng.register(mv, fx, spacing=pair.spacing, with_inverse=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        m = registration_metrics(out["disp"], pair.moving_seg, pair.fixed_seg, (1, 2))
        det = M.jacobian_determinant(out["disp"][0])
        inside, outside = M.sdlogj(det, brain), M.sdlogj(det, ~brain)
        print(f"{name:28s} {m['dice_mean']:6.4f} {int((det <= 0).sum()):6d} {m['sdlogj']:7.3f} {inside:6.3f} {outside:6.3f} "
              f"{wall:7.1f} {cpu:7.1f}", flush=True)


if __name__ == "__main__":
    main()
