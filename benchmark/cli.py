"""The ``regbench`` command.

Subcommands:
  evaluate     metrics of a displacement field produced by any tool
  run          a grid of methods × datasets × seeds from a YAML config (resumable)
  fit / test   one experiment through LightningCLI
  leaderboard  aggregate a results folder into tables
  perf         the performance harness (``metrics``, ``systems``)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

# OpenMP threads that spin while waiting make 2-thread runs many times slower on a shared
# machine (measured: up to 40x on small tensors); they sleep instead unless the user chose.
# Set before torch (imported lazily below) starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmark.io import DataError


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from benchmark.evaluate import evaluate_files, format_table
    from benchmark.io import atomic_write_json

    res = evaluate_files(
        args.disp,
        fixed_seg=args.fixed_seg,
        moving_seg=args.moving_seg,
        labels=args.labels,
        fixed_landmarks=args.fixed_landmarks,
        moving_landmarks=args.moving_landmarks,
        mask=args.mask,
        moving_image=args.moving_image,
        fixed_image=args.fixed_image,
        resample_labels=args.resample_labels,
        hd95_voxel=args.hd95_voxel,
        resample_field=args.resample_field,
        landmark_units=args.landmark_units,
    )
    if args.out:
        atomic_write_json(args.out, res)
        print(f"wrote {args.out}")
    else:
        print(format_table(res))
    return 0


def _cmd_perf(args: argparse.Namespace) -> int:
    if args.what == "metrics":
        from benchmark.perf import main_perf_metrics

        main_perf_metrics(out=args.out, repeats=args.repeats, threads=args.threads)
        return 0
    if args.what == "data":
        from benchmark.perf_data import main_perf_data

        main_perf_data(args)
        return 0
    if args.what == "patchmorph":
        from benchmark.perf_patchmorph import main_perf_patchmorph

        main_perf_patchmorph(args)
        return 0
    if args.what == "drr":
        from benchmark.perf_drr import main_perf_drr

        main_perf_drr(args)
        return 0
    if args.what == "training":
        from benchmark.perf_training import main_perf_training

        main_perf_training(out=args.out, repeats=args.repeats, threads=args.threads or 2,
                           peer_python=args.peer_python, loss=args.loss)
        return 0
    from benchmark.perf_systems import main_perf_systems

    main_perf_systems(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regbench", description="Medical image registration benchmark suite.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("evaluate", help="metrics of a Learn2Reg-format displacement field")
    e.add_argument("--disp", required=True, help="displacement .nii.gz/.npz/.npy, [X,Y,Z,3] or [3,X,Y,Z], voxels, pull")
    e.add_argument("--fixed-seg", help="fixed label map (defines the fixed grid)")
    e.add_argument("--moving-seg", help="moving label map (on the moving image's grid)")
    e.add_argument("--labels", help="comma-separated label ids (default: all non-zero in the fixed map)")
    e.add_argument("--fixed-landmarks", help="CSV, one x,y,z voxel index per row")
    e.add_argument("--moving-landmarks", help="CSV, one x,y,z voxel index per row")
    e.add_argument("--mask", help="mask on the fixed grid for fold %%, SDlogJ and NDV")
    e.add_argument("--fixed-image", help="fixed image (optional; defines the grid when given)")
    e.add_argument("--moving-image", help="moving image (optional; its grid is where the moving labels must lie)")
    e.add_argument(
        "--resample-labels",
        action="store_true",
        help="resample label maps that lie on another grid through the affines (nearest) instead of refusing",
    )
    e.add_argument("--resample-field", action="store_true",
                   help="a field on another grid than the fixed image (e.g. a run's preprocessed grid) is mapped "
                   "through the affines onto the fixed and moving images' grids instead of refused")
    e.add_argument("--landmark-units", choices=["voxel", "mm"], default="voxel",
                   help="landmark CSV rows are voxel indices of their image (default) or world mm (RAS)")
    e.add_argument("--hd95-voxel", action="store_true", help="HD95 in voxels (Learn2Reg's voxel variant) instead of mm")
    e.add_argument("--out", help="write JSON here instead of printing a table")
    e.set_defaults(func=_cmd_evaluate)

    pf = sub.add_parser("perf", help="performance harness (JSON out)")
    pf.add_argument("what", choices=["metrics", "systems", "training", "data", "drr", "patchmorph"],
                    help="metrics: core ops and metrics at 160x224x192; systems: SyN vs FireANTs/ANTs on the real pair, "
                    "MSFF vs VoxelMorph training step; training: VoxelMorph training step vs the voxelmorph and MONAI "
                    "packages; data: loading a 160x224x192 pair cold and with a warm cache; drr: DRR rendering vs DiffDRR; "
                    "patchmorph: training memory at 64/128/192 cubed beside VoxelMorph, inference time vs patches")
    pf.add_argument("--out", help="JSON output path")
    pf.add_argument("--repeats", type=int, default=5)
    pf.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    pf.add_argument("--pair-dir", default=None, help="real brain pair folder (systems; default ../shared/data/oasis_pair)")
    pf.add_argument("--peer-python", default=None, help="python of a venv with the peers (fireants, voxelmorph, monai)")
    pf.add_argument("--only", default=None, help="comma-separated subset of benchmarks (systems)")
    pf.add_argument("--size", default=None, help="volume size X,Y,Z (systems --only msff; default 160,224,192)")
    pf.add_argument("--device", default=None, help="torch device (systems --only msff; default cpu)")
    pf.add_argument("--loss", default="mse", choices=["mse", "ncc"], help="training: similarity used side by side with the peers")
    pf.set_defaults(func=_cmd_perf)

    from benchmark.runner import add_cli_commands as add_runner_commands

    add_runner_commands(sub)
    for module in ("leaderboard.cli", "benchmark.datacheck", "sweeps.cli"):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_cli_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `fit` / `test` hand the rest of the line to LightningCLI untouched.
    if argv and argv[0] in ("fit", "test", "validate", "predict"):
        from benchmark.runner import lightning_cli_main

        return lightning_cli_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DataError as exc:
        print(f"regbench {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
