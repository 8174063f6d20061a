"""How often does plain NCC's pose gradient at the start point toward the true pose?

The reference figure for cdreg's ``grad_toward_truth`` (docs/cdreg.md): no learning, global
NCC between each held-out case's X-ray and the DRR at its starting pose, the gradient with
respect to the pose in the chart about the isocentre or about the CT's attenuation centroid
(``systems.pose_base``), and the share of cases whose descent direction has a positive
cosine with the geodesic direction to the truth (rotation and translation parts, in the
same chart). The data are the spine quickstart's (benchmark/configs/spine_quickstart.yaml),
its test split with ``--cts`` unseen CTs × ``--poses`` starting poses each.

    OMP_NUM_THREADS=1 python scripts/ncc_start_direction.py --rotation-centre isocentre
    OMP_NUM_THREADS=1 python scripts/ncc_start_direction.py --rotation-centre centroid
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from benchmark.core.drr import render_pose
from benchmark.core.se3 import recentre, uncentre
from datamodules.spine import SpineDRRDataModule, collate_pose
from systems.cdreg import toward_truth_cosines
from systems.pose_base import ROTATION_CENTRES, PoseSystem
from systems.pose_baseline import _global_ncc as global_ncc  # NCC of (B, C, H, W) images over all pixels

CONFIG = Path(__file__).resolve().parents[1] / "benchmark" / "configs" / "spine_quickstart.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rotation-centre", choices=ROTATION_CENTRES, default="isocentre")
    ap.add_argument("--cts", type=int, default=4, help="unseen test CTs")
    ap.add_argument("--poses", type=int, default=32, help="starting poses per CT")
    args = ap.parse_args()
    kw = dict(yaml.safe_load(CONFIG.read_text())["datasets"]["synthetic_spine"]["init_args"])
    kw.update(n_train_cts=1, n_val_cts=1, n_test_cts=args.cts, poses_per_ct=args.poses)  # test CTs do not depend on these
    dm = SpineDRRDataModule(**kw)
    ds = dm.dataset("test")
    batch = collate_pose([ds[i] for i in range(len(ds))])
    chart = PoseSystem(rotation_centre=args.rotation_centre)
    centre = chart.chart_centre(batch).double()
    start = recentre(batch["pose_init"].double(), centre)
    truth = recentre(batch["pose_true"].double(), centre)
    grads = []
    for i in range(start.shape[0]):
        theta = start[i : i + 1].clone().requires_grad_(True)
        drr = render_pose(batch["volume"][i : i + 1], batch["affine"][i : i + 1], uncentre(theta, centre[i : i + 1]).float(),
                          batch["base"][i : i + 1].float(), batch["geometry"], kw["n_samples"])
        (g,) = torch.autograd.grad(-global_ncc(drr.mean(1, keepdim=True), batch["xray"][i : i + 1]).sum(), theta)
        grads.append(g)
    cos = toward_truth_cosines(torch.cat(grads).float(), start.float(), truth.float())
    print(json.dumps({"rotation_centre": args.rotation_centre, "cases": int(cos.shape[0]),
                      "toward_rot": round(float((cos[:, 0] > 0).float().mean()), 4),
                      "toward_trans": round(float((cos[:, 1] > 0).float().mean()), 4),
                      "mean_cos_rot": round(float(cos[:, 0].mean()), 3), "mean_cos_trans": round(float(cos[:, 1].mean()), 3),
                      "centre_mm_mean": [round(v, 1) for v in centre.mean(0).tolist()]}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
