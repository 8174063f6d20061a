"""``regbench perf data`` (second part): the cost of the built-in anatomy data at the comparison size.

Measured per call, medians over ``repeats`` fresh subjects (the memo bypassed):

* ``subject_s``: one subject (velocity, scaling and squaring, image and label warps,
  intensity augmentation, exact landmark inversion);
* ``truth_s``: the dense true displacement of one evaluation pair (pointwise inversion);
* ``vxm_step_s``: one VoxelMorph training step (forward + backward + Adam) on a pair of that
  size, measured in the same process with the same threads, as the peer the data must keep
  up with.

Training subjects are generated once per run and kept (pairs are drawn from them), so a
training step pays ``subject_s · n_train / steps`` on average; the report gives that too.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def perf_anatomy(repeats: int = 3, threads: int | None = None, spacing: float = 3.0, n_train: int = 16,
                 steps: int = 300) -> dict[str, Any]:
    """Time subject generation, true fields and a VoxelMorph step (see the module docstring)."""
    from datamodules.anatomy import mni_template
    from datamodules.anatomy_brain import AnatomyBrainGenerator
    from systems.voxelmorph import VoxelMorph

    if threads:
        torch.set_num_threads(int(threads))
    repeats = max(1, int(repeats))
    t0 = time.perf_counter()
    mni_template(spacing)
    template_s = time.perf_counter() - t0
    gen = AnatomyBrainGenerator(spacing=spacing, seed=12345)
    gen.template  # landmarks
    subj = []
    for i in range(repeats):
        t0 = time.perf_counter()
        gen._subject(i, False)
        subj.append(time.perf_counter() - t0)
    truth = []
    for i in range(repeats):
        t0 = time.perf_counter()
        super(AnatomyBrainGenerator, gen).true_displacement(i, i + 1)
        truth.append(time.perf_counter() - t0)
    shape = gen.shape
    vxm = VoxelMorph()
    opt = torch.optim.Adam(vxm.parameters(), lr=1e-3)
    batch = {"fixed": torch.rand(1, 1, *shape), "moving": torch.rand(1, 1, *shape)}
    step = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        loss, _ = vxm.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first is a warm-up
            step.append(time.perf_counter() - t0)
    s_med, st_med = statistics.median(subj), statistics.median(step)
    return {
        "benchmark": "anatomy_data",
        "spacing_mm": spacing,
        "shape": list(shape),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "template_s": template_s,
        "subject_s": s_med,
        "subject_samples_s": subj,
        "truth_s": statistics.median(truth),
        "truth_samples_s": truth,
        "vxm_step_s": st_med,
        "vxm_step_samples_s": step,
        "subject_per_vxm_step": s_med / st_med,
        "amortised_per_step_s": s_med * n_train / max(steps, 1),
        "amortised_assumes": {"n_train": n_train, "steps": steps},
    }


def print_perf_anatomy(res: dict[str, Any]) -> None:
    print(f"anatomy data at {res['spacing_mm']:g} mm ({'x'.join(map(str, res['shape']))}), {res['threads']} threads: "
          f"template {res['template_s']:.2f} s (cached after the first build), one subject {res['subject_s']:.2f} s, "
          f"one true field {res['truth_s']:.2f} s; VoxelMorph training step {res['vxm_step_s']:.2f} s "
          f"(subject = {res['subject_per_vxm_step']:.1f} steps, generated once per run: "
          f"{res['amortised_per_step_s'] * 1e3:.0f} ms per step over {res['amortised_assumes']['steps']} steps)")
