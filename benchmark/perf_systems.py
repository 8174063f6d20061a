"""Performance harness for the registration systems (``regbench perf systems``).

``syn``: the suite's greedy SyN (:class:`systems.syn.GreedySyN`, presets ``"fast"`` and
``"accurate"``) on a real brain pair, side by side in one run with FireANTs'
``GreedyRegistration`` (run in a peer virtualenv through ``benchmark/peers/fireants_greedy.py``)
and next to cached ANTs figures. Per tool: Dice per label and mean, fold % and SDlogJ
(:mod:`benchmark.metrics`, central differences), wall-clock of the registration call alone
(:func:`benchmark.timing.timed_call` for ours; the peer times its own ``optimize()``), process
CPU time (less sensitive to a shared machine than wall-clock) and peak memory.

The peer's displacement is converted to the suite's convention inside the peer script (see
its docstring); the conversion is checked here: the Dice of the converted field warped with
:func:`benchmark.spatial.warp` must match the Dice FireANTs' own coordinates give in its own
frame (``conversion_ok``).

Pair: ``moving = image_A``, ``fixed = image_B`` of ``<pair_dir>`` (default
``../shared/data/oasis_pair`` next to the project root). ``image_A_seg`` lies on another grid
than ``image_A``; it is resampled onto ``image_A``'s grid through the affines (nearest
neighbour) by :func:`benchmark.io.load_segmentation`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch

from benchmark import metrics as M
from benchmark.io import DataError, atomic_write_json, load_segmentation, load_volume, same_grid
from benchmark.spatial import warp
from benchmark.timing import device_description, timed_call

__all__ = [
    "CACHED_ANTS",
    "BrainPair",
    "load_brain_pair",
    "find_peer_python",
    "registration_metrics",
    "perf_syn",
    "format_perf_systems",
    "main_perf_systems",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAIR_DIR = PROJECT_ROOT.parent / "shared" / "data" / "oasis_pair"
DEFAULT_PEER_VENV = PROJECT_ROOT.parent / "peers_venv"
PEER_SCRIPTS = Path(__file__).resolve().parent / "peers"

#: FireANTs settings of the reference run (FireANTs 1.5.0, CPU, 2 threads: Dice 0.820 in 306 s).
FIREANTS_SETTINGS: dict[str, Any] = dict(
    scales=(4, 2, 1),
    iterations=(200, 100, 50),
    cc_kernel=7,
    lr=0.25,
    smooth_grad_sigma=1.0,
    smooth_warp_sigma=0.25,
)

#: ANTs figures on the OASIS pair only (moving image_A, fixed image_B, labels 1 and 2),
#: measured earlier with 2 threads on this kind of machine. Not re-run (the second takes
#: over an hour); shown whatever pair is run, marked with the pair they belong to.
CACHED_ANTS: tuple[dict[str, Any], ...] = (
    dict(
        tool="ants",
        status="cached",
        pair="oasis_pair image_A -> image_B",
        version="antspyx 0.6.3",
        settings="antsRegistrationSyNQuick[so] (rigid + SyN, CC/MI defaults of the quick script)",
        threads=2,
        dice_mean=0.756,
        fold_pct=None,
        sdlogj=None,
        wall_s=46.0,
    ),
    dict(
        tool="ants",
        status="cached",
        pair="oasis_pair image_A -> image_B",
        version="antspyx 0.6.3",
        settings="SyNOnly, CC, syn_sampling=4, reg_iterations=(100, 70, 50)",
        threads=2,
        dice_mean=0.793,
        fold_pct=0.0,
        sdlogj=0.28,
        wall_s=4133.0,
    ),
)


@dataclass
class BrainPair:
    """A moving / fixed pair on one grid, with label maps on that grid.

    Attributes:
        moving, fixed: ``(X, Y, Z)`` float32 images.
        moving_seg, fixed_seg: ``(X, Y, Z)`` int64 label maps on the images' grid.
        affine: ``(4, 4)`` voxel→world of the (shared) grid.
        spacing: voxel size in mm per array axis.
        paths: the files read (``moving``, ``fixed``, ``moving_seg``, ``fixed_seg``).
        notes: what was done to the data (e.g. labels resampled through the affines).
    """

    moving: np.ndarray
    fixed: np.ndarray
    moving_seg: np.ndarray
    fixed_seg: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    paths: dict[str, str]
    notes: list[str] = field(default_factory=list)


def load_brain_pair(pair_dir: str | os.PathLike | None = None, moving: str = "image_A", fixed: str = "image_B") -> BrainPair:
    """Read ``<moving>.nii.gz``, ``<fixed>.nii.gz`` and their ``_seg`` label maps.

    Label maps on another grid than their image are resampled onto it through the affines
    (nearest neighbour), with a note. The two images must share one grid.

    Raises:
        DataError: missing files, or images on different grids.
    """
    d = Path(pair_dir) if pair_dir is not None else DEFAULT_PAIR_DIR
    if not d.is_dir():
        raise DataError(d, "pair folder not found", "pass --pair-dir (a folder with image_A/B.nii.gz and their _seg files)")
    paths = {
        "moving": str(d / f"{moving}.nii.gz"),
        "fixed": str(d / f"{fixed}.nii.gz"),
        "moving_seg": str(d / f"{moving}_seg.nii.gz"),
        "fixed_seg": str(d / f"{fixed}_seg.nii.gz"),
    }
    mov = load_volume(paths["moving"])
    fix = load_volume(paths["fixed"])
    if not same_grid(mov, fix):
        raise DataError(paths["moving"], f"lies on another grid than {paths['fixed']}", "resample the pair onto one grid first")
    notes: list[str] = []
    segs = {}
    for key, ref in (("moving_seg", mov), ("fixed_seg", fix)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            segs[key] = load_segmentation(paths[key], reference=ref, on_grid_mismatch="resample")
        notes += [str(w.message) for w in caught]
    return BrainPair(
        moving=mov.data,
        fixed=fix.data,
        moving_seg=segs["moving_seg"].data,
        fixed_seg=segs["fixed_seg"].data,
        affine=fix.affine,
        spacing=fix.spacing,
        paths=paths,
        notes=notes,
    )


def find_peer_python(peer_python: str | None = None) -> str | None:
    """The peer virtualenv's python: the argument, else ``$REGBENCH_PEER_PYTHON``, else
    ``<project>/../peers_venv/bin/python`` if it exists; ``None`` when there is none."""
    for cand in (peer_python, os.environ.get("REGBENCH_PEER_PYTHON"), str(DEFAULT_PEER_VENV / "bin" / "python")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def registration_metrics(
    disp: np.ndarray | torch.Tensor,
    moving_seg: np.ndarray,
    fixed_seg: np.ndarray,
    labels: Sequence[int],
) -> dict[str, Any]:
    """Dice (per label, mean), fold % and SDlogJ of one displacement.

    Args:
        disp: ``(3, X, Y, Z)`` or ``(1, 3, X, Y, Z)`` voxels of the fixed grid, pull.
        moving_seg, fixed_seg: ``(X, Y, Z)`` label maps on the moving / fixed grid.
        labels: label ids for Dice.
    """
    u = torch.as_tensor(np.asarray(disp) if not isinstance(disp, torch.Tensor) else disp).float().cpu()
    if u.dim() == 4:
        u = u.unsqueeze(0)
    seg = torch.from_numpy(np.ascontiguousarray(moving_seg)).long()[None, None]
    warped = warp(seg, u, mode="nearest")[0, 0]
    d = M.dice_per_label(torch.from_numpy(np.ascontiguousarray(fixed_seg)).long(), warped, labels)
    det = M.jacobian_determinant(u[0])
    return {
        "dice": {str(k): float(v) for k, v in zip(labels, d)},
        "dice_mean": M.dice(fixed_seg, warped, labels),
        "fold_pct": M.fold_pct(det),
        "sdlogj": M.sdlogj(det),
    }


def _run_syn_preset(pair: BrainPair, preset: str, device: str, labels: Sequence[int]) -> dict[str, Any]:
    from systems.syn import GreedySyN

    syn = GreedySyN.preset(preset)
    mov = torch.from_numpy(pair.moving)[None, None].to(device)
    fix = torch.from_numpy(pair.fixed)[None, None].to(device)
    c0 = time.process_time()
    out, stats = timed_call(lambda: syn.register(mov, fix, spacing=pair.spacing, progress=False), device)
    cpu = time.process_time() - c0
    rec = {
        "tool": "regbench-syn",
        "preset": preset,
        "status": "measured",
        "settings": syn.hparams(),
        "wall_s": stats.seconds,
        "cpu_s": cpu,
        "peak_mem_mb": stats.peak_mem_mb,
    }
    rec.update(registration_metrics(out["disp"].cpu(), pair.moving_seg, pair.fixed_seg, labels))
    return rec


def _run_fireants(
    pair: BrainPair,
    peer_python: str,
    threads: int,
    device: str,
    labels: Sequence[int],
    timeout_s: float,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run FireANTs in the peer venv; returns a record, or one with ``status`` "failed".

    ``settings`` overrides entries of :data:`FIREANTS_SETTINGS`.
    """
    s = {**FIREANTS_SETTINGS, **(settings or {})}
    with tempfile.TemporaryDirectory(prefix="regbench_fireants_") as tmp:
        tmpd = Path(tmp)
        # The moving labels on the moving image's grid (the original lies on another grid).
        mseg = tmpd / "moving_seg_on_image.nii.gz"
        nib.save(nib.Nifti1Image(pair.moving_seg.astype(np.int16), pair.affine), str(mseg))
        fseg = tmpd / "fixed_seg_on_image.nii.gz"
        nib.save(nib.Nifti1Image(pair.fixed_seg.astype(np.int16), pair.affine), str(fseg))
        cmd = [
            peer_python,
            str(PEER_SCRIPTS / "fireants_greedy.py"),
            "--fixed", pair.paths["fixed"],
            "--moving", pair.paths["moving"],
            "--fixed-seg", str(fseg),
            "--moving-seg", str(mseg),
            "--labels", ",".join(str(k) for k in labels),
            "--out-disp", str(tmpd / "disp.npy"),
            "--out-json", str(tmpd / "info.json"),
            "--threads", str(threads),
            "--device", device,
            "--scales", ",".join(map(str, s["scales"])),
            "--iterations", ",".join(map(str, s["iterations"])),
            "--cc-kernel", str(s["cc_kernel"]),
            "--lr", str(s["lr"]),
            "--smooth-grad-sigma", str(s["smooth_grad_sigma"]),
            "--smooth-warp-sigma", str(s["smooth_warp_sigma"]),
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"tool": "fireants", "status": "failed", "error": f"timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0 or not (tmpd / "info.json").exists():
            tail = (proc.stderr or proc.stdout or "")[-2000:]
            return {"tool": "fireants", "status": "failed", "error": f"exit code {proc.returncode}: {tail}"}
        info = json.loads((tmpd / "info.json").read_text())
        disp = np.load(tmpd / "disp.npy")
    rec = {
        "tool": "fireants",
        "preset": None,
        "status": "measured",
        "version": f"fireants {info.get('fireants_version')} (torch {info.get('torch_version')})",
        "settings": info.get("settings"),
        "wall_s": info["wall_s"],
        "cpu_s": info.get("cpu_s"),
        "peak_mem_mb": info.get("peak_mem_mb"),
    }
    rec.update(registration_metrics(disp, pair.moving_seg, pair.fixed_seg, labels))
    native = info.get("native_dice_mean")
    rec["native_dice_mean"] = native
    rec["conversion_ok"] = native is not None and abs(native - rec["dice_mean"]) < 2e-3
    return rec


def perf_syn(
    pair_dir: str | os.PathLike | None = None,
    threads: int | None = 2,
    peer_python: str | None = None,
    presets: Sequence[str] = ("fast", "accurate"),
    out: str | os.PathLike | None = None,
    device: str = "cpu",
    labels: Sequence[int] = (1, 2),
    with_peers: bool = True,
    peer_timeout_s: float = 7200.0,
) -> dict[str, Any]:
    """Our SyN presets vs FireANTs (when a peer python is found) vs cached ANTs, one run.

    Args:
        pair_dir: folder with ``image_A/B.nii.gz`` and ``image_A/B_seg.nii.gz``.
        threads: torch threads for ours and for the peer (``None``: leave torch's setting).
        peer_python: python of a venv with ``fireants`` (else ``$REGBENCH_PEER_PYTHON`` or
            ``<project>/../peers_venv/bin/python``); a missing peer is skipped with a message.
        presets: :data:`systems.syn.SYN_PRESETS` names to run.
        out: write the result JSON here (atomically).
        device: ``"cpu"`` or ``"cuda"`` (ours and the peer).
        labels: label ids for Dice.
        with_peers: run FireANTs when available.
        peer_timeout_s: the peer's time limit.

    Returns:
        dict with ``results`` (one record per measured tool: ``dice`` per label, ``dice_mean``,
        ``fold_pct``, ``sdlogj``, ``wall_s``, ``cpu_s``, ``peak_mem_mb``, ``settings``),
        ``cached`` (ANTs figures, ``status: "cached"``), ``initial`` (before registration),
        ``skipped`` (messages), the pair, threads and device description.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        pair = load_brain_pair(pair_dir)
        init = registration_metrics(np.zeros((3,) + pair.fixed.shape, np.float32), pair.moving_seg, pair.fixed_seg, labels)
        res: dict[str, Any] = {
            "benchmark": "syn",
            "pair": {k: v for k, v in pair.paths.items()},
            "pair_notes": pair.notes,
            "labels": list(labels),
            "threads": torch.get_num_threads(),
            "device": device_description(device),
            "initial": {"dice": init["dice"], "dice_mean": init["dice_mean"]},
            "results": [],
            "cached": [dict(r) for r in CACHED_ANTS],
            "skipped": [],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        # One small call first so one-time library start-up is not charged to the first preset.
        from systems.syn import GreedySyN

        small = torch.rand(1, 1, 24, 24, 24, device=device)
        _, warm = timed_call(lambda: GreedySyN(scales=(1,), iterations=(2,)).register(small, small), device)
        res["warmup_s"] = warm.seconds
        for p in presets:
            res["results"].append(_run_syn_preset(pair, p, device, labels))
        if with_peers:
            py = find_peer_python(peer_python)
            if py is None:
                res["skipped"].append(
                    "fireants: no peer python (pass --peer-python, set REGBENCH_PEER_PYTHON, or create "
                    f"{DEFAULT_PEER_VENV} with `pip install fireants`)"
                )
            else:
                check = subprocess.run([py, "-c", "import fireants"], capture_output=True, text=True)
                if check.returncode != 0:
                    res["skipped"].append(f"fireants: not importable with {py}: {check.stderr.strip()[-300:]}")
                else:
                    nthreads = int(threads) if threads is not None else torch.get_num_threads()
                    rec = _run_fireants(pair, py, nthreads, device, labels, peer_timeout_s)
                    res["results"].append(rec)
                    if rec.get("status") == "measured" and not rec.get("conversion_ok"):
                        res["skipped"].append(
                            "fireants: WARNING the converted displacement's Dice "
                            f"{rec['dice_mean']:.4f} differs from FireANTs' own {rec['native_dice_mean']}"
                        )
        res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    finally:
        torch.set_num_threads(before)
    if out is not None:
        atomic_write_json(out, res)
    return res


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def format_perf_systems(res: dict[str, Any]) -> str:
    """A plain-text table of :func:`perf_syn`'s result."""
    labels = [str(k) for k in res["labels"]]
    lines = [
        f"SyN on {Path(res['pair']['moving']).name} -> {Path(res['pair']['fixed']).name}  "
        f"threads {res['threads']}  device {res['device'].get('device')}  "
        f"initial Dice {res['initial']['dice_mean']:.4f}",
        f"{'tool':14s} {'preset':9s} "
        + " ".join(f"{'Dice ' + k:>7s}" for k in labels)
        + f" {'Dice':>7s} {'fold %':>7s} {'SDlogJ':>7s} {'wall s':>8s} {'cpu s':>8s} {'mem MB':>8s}  status",
    ]
    for r in res["results"]:
        if r.get("status") != "measured":
            lines.append(f"{r['tool']:14s} {'':9s} FAILED: {r.get('error', '')[:200]}")
            continue
        lines.append(
            f"{r['tool']:14s} {str(r.get('preset') or '-'):9s} "
            + " ".join(f"{_fmt(r['dice'].get(k), '7.4f'):>7s}" for k in labels)
            + f" {_fmt(r['dice_mean'], '7.4f'):>7s} {_fmt(r['fold_pct'], '7.3f'):>7s} {_fmt(r['sdlogj'], '7.3f'):>7s}"
            f" {_fmt(r['wall_s'], '8.1f'):>8s} {_fmt(r.get('cpu_s'), '8.1f'):>8s} {_fmt(r.get('peak_mem_mb'), '8.0f'):>8s}"
            f"  measured" + ("" if r["tool"] != "fireants" else f" (conversion {'ok' if r.get('conversion_ok') else 'MISMATCH'})")
        )
    for r in res["cached"]:
        lines.append(
            f"{r['tool']:14s} {'':9s} " + " ".join(f"{'-':>7s}" for _ in labels)
            + f" {_fmt(r['dice_mean'], '7.3f'):>7s} {_fmt(r['fold_pct'], '7.3f'):>7s} {_fmt(r['sdlogj'], '7.2f'):>7s}"
            f" {_fmt(r['wall_s'], '8.0f'):>8s} {'-':>8s} {'-':>8s}  cached ({r['pair']}): {r['version']}, {r['settings']}"
        )
    for msg in res["skipped"]:
        lines.append(f"note: {msg}")
    return "\n".join(lines)


BENCHMARKS = ("syn",)


def main_perf_systems(args: Any) -> dict[str, Any]:
    """CLI entry (``regbench perf systems``): reads ``args.pair_dir``, ``args.peer_python``,
    ``args.threads`` (default 2, as the reference figures), ``args.only`` (comma-separated
    subset of :data:`BENCHMARKS`) and ``args.out``; prints the table."""
    only = getattr(args, "only", None)
    wanted = [s.strip() for s in only.split(",")] if only else list(BENCHMARKS)
    unknown = [w for w in wanted if w not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown systems benchmark(s) {unknown}; available: {', '.join(BENCHMARKS)}")
    threads = getattr(args, "threads", None)
    res: dict[str, Any] = {}
    if "syn" in wanted:
        res = perf_syn(
            pair_dir=getattr(args, "pair_dir", None),
            threads=2 if threads is None else threads,
            peer_python=getattr(args, "peer_python", None),
            out=getattr(args, "out", None),
        )
        print(format_perf_systems(res))
        if getattr(args, "out", None):
            print(f"wrote {args.out}")
    sys.stdout.flush()
    return res
