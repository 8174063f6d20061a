"""Run FireANTs ``GreedyRegistration`` on one pair — executed INSIDE a peer virtualenv.

This script imports nothing of regbench (the peer venv does not have it): it is started by
:func:`benchmark.perf.systems.perf_syn` as ``<peer python> fireants_greedy.py ...`` and
talks back through files only:

* ``--out-disp``: ``.npy`` float32 array ``(3, X, Y, Z)`` — the displacement in regbench's
  convention: voxels of the fixed grid, array axes in nibabel order (channel ``d`` = shift
  along nibabel array axis ``d``), pull ``warped(x) = moving(x + u(x))``.
* ``--out-json``: wall and CPU time of ``optimize()`` alone, peak memory (CPU: the
  process's lifetime peak RSS), versions, settings, and the Dice that
  FireANTs' own coordinates give when the labels are sampled in FireANTs' own frame (so
  the caller can check the conversion of the displacement).

Conversion (read in FireANTs 1.5 ``io/image.py`` and ``registration/abstract.py``):
images are read with SimpleITK, so the torch array is ``(Z, Y, X)`` = nibabel axes
reversed; ``get_warped_coordinates`` returns ``grid_sample`` coordinates of the moving
image, ``(1, Z, Y, X, 3)``, last axis ``(x, y, z)`` = SimpleITK index order = nibabel
axis order, normalised with ``align_corners=True``: ``index_i = (g_i + 1) (n_i - 1) / 2``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F


def _peak_rss_mb() -> float:
    """This process's own peak RSS, MB: ``VmHWM`` (``ru_maxrss`` survives exec and would
    report the parent's peak when the parent was larger; benchmark.core.timing.peak_rss_mb)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _dice(a: np.ndarray, b: np.ndarray, labels: list[int]) -> dict[str, float]:
    out = {}
    for lab in labels:
        x = a == lab
        y = b == lab
        denom = x.sum() + y.sum()
        out[str(lab)] = float(2.0 * np.logical_and(x, y).sum() / denom) if denom else float("nan")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--fixed", required=True)
    p.add_argument("--moving", required=True)
    p.add_argument("--fixed-seg", default=None, help="labels on the fixed image's grid")
    p.add_argument("--moving-seg", default=None, help="labels on the moving image's grid")
    p.add_argument("--labels", default="1,2")
    p.add_argument("--out-disp", required=True)
    p.add_argument("--out-json", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scales", default="4,2,1")
    p.add_argument("--iterations", default="200,100,50")
    p.add_argument("--cc-kernel", type=int, default=7)
    p.add_argument("--lr", type=float, default=0.25)
    p.add_argument("--smooth-grad-sigma", type=float, default=1.0)
    p.add_argument("--smooth-warp-sigma", type=float, default=0.25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--optimizer-params", default=None,
                   help="JSON dict for GreedyRegistration's optimizer_params (e.g. {\"beta1\": 0.1})")
    args = p.parse_args()
    opt_params = json.loads(args.optimizer_params) if args.optimizer_params else None

    torch.set_num_threads(args.threads)
    import fireants
    from fireants.io.image import BatchedImages, Image
    from fireants.registration.greedy import GreedyRegistration

    dev = args.device
    fixed = BatchedImages([Image.load_file(args.fixed, device=dev)])
    moving = BatchedImages([Image.load_file(args.moving, device=dev)])
    scales = [int(s) for s in args.scales.split(",")]
    iters = [int(s) for s in args.iterations.split(",")]
    reg = GreedyRegistration(
        scales=scales,
        iterations=iters,
        fixed_images=fixed,
        moving_images=moving,
        loss_type="cc",
        cc_kernel_size=args.cc_kernel,
        optimizer="Adam",
        optimizer_lr=args.lr,
        smooth_grad_sigma=args.smooth_grad_sigma,
        smooth_warp_sigma=args.smooth_warp_sigma,
        deformation_type="compositive",
        progress_bar=False,
        **({"optimizer_params": opt_params} if opt_params else {}),
    )
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    reg.optimize()
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    with torch.no_grad():
        coords = reg.get_warped_coordinates(fixed, moving)  # (1, Z, Y, X, 3), xyz, moving normalised
        mshape_xyz = moving().shape[2:][::-1]  # SimpleITK (Z,Y,X) array -> sizes in x,y,z order
        size = torch.tensor([float(n) for n in mshape_xyz], dtype=coords.dtype)
        idx = (coords[0].cpu() + 1.0) * (size - 1.0) / 2.0  # (Z, Y, X, 3) moving index (x, y, z)
        idx_nib = idx.permute(3, 2, 1, 0)  # (3, X, Y, Z): channel = nibabel axis
        fshape = idx_nib.shape[1:]
        ident = torch.stack(
            torch.meshgrid(*[torch.arange(n, dtype=idx.dtype) for n in fshape], indexing="ij"), 0
        )
        disp = (idx_nib - ident).numpy().astype(np.float32)
    np.save(args.out_disp, disp)

    info: dict = {
        "tool": "fireants",
        "fireants_version": getattr(fireants, "__version__", None),
        "torch_version": torch.__version__,
        "threads": args.threads,
        "device": dev,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mem_mb": (
            torch.cuda.max_memory_allocated() / 2**20
            if dev.startswith("cuda")
            else _peak_rss_mb()
        ),
        "settings": {
            "class": "GreedyRegistration",
            "scales": scales,
            "iterations": iters,
            "loss": "cc",
            "cc_kernel_size": args.cc_kernel,
            "optimizer": "Adam",
            "lr": args.lr,
            "smooth_grad_sigma": args.smooth_grad_sigma,
            "smooth_warp_sigma": args.smooth_warp_sigma,
            "deformation_type": "compositive",
            "optimizer_params": opt_params or {},
        },
    }
    try:
        from importlib.metadata import version

        info["fireants_version"] = info["fireants_version"] or version("fireants")
    except Exception:  # noqa: BLE001 - version lookup is informative only
        pass
    if args.fixed_seg and args.moving_seg:
        labels = [int(s) for s in args.labels.split(",")]
        fseg = sitk.GetArrayFromImage(sitk.ReadImage(args.fixed_seg))  # (Z, Y, X)
        mseg = sitk.GetArrayFromImage(sitk.ReadImage(args.moving_seg))
        with torch.no_grad():
            ms = torch.from_numpy(mseg.astype(np.float32))[None, None].to(coords.device)
            warped = F.grid_sample(ms, coords, mode="nearest", align_corners=True)[0, 0].cpu().numpy()
        d = _dice(fseg, np.rint(warped).astype(np.int64), labels)
        info["native_dice"] = d
        info["native_dice_mean"] = float(np.nanmean(list(d.values())))
    with open(args.out_json, "w") as fh:
        json.dump(info, fh, indent=1)


if __name__ == "__main__":
    main()
