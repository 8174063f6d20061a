"""``regbench perf drr``: DRR rendering speed, ours and DiffDRR's, side by side in one run.

Case: a 256×256 DRR of a 256³ CT (a synthetic spine CT drawn at 64³ / 4 mm and resampled
to 256³ at 1 mm), the cdreg paper's C-arm (source–detector 1020 mm, source–isocentre 510 mm,
0.798 mm pixels), AP view with the CT centre at the isocentre. Timed: forward (no autograd)
and forward + backward (gradient of the image sum w.r.t. the 6 pose parameters), the median
of ``repeats`` calls after one warm-up call, on ``threads`` CPU threads (default 2), with the
process's peak RSS.

Ours is timed twice: ``method="trilinear"`` (the renderer's default: ``n_samples`` trilinear
samples per ray, as DiffDRR's trilinear renderer) and ``method="slices"`` (one bilinear
sample where each ray crosses each CT slice: on the 256³ CT also 256 samples per ray).

Peer: when ``peer_python`` (or ``$REGBENCH_DRR_PEER_PYTHON``, or ``../peers_drr_venv``) is a
python with ``diffdrr``, the same attenuation volume (written as NIfTI in the values that make
DiffDRR's own HU conversion return it: :func:`peer_volume`) and geometry are rendered there in a
subprocess with DiffDRR's ``trilinear`` renderer at the same sample count (``n_points``) and
with its ``siddon`` renderer (exact ray–voxel intersections, no sample count), also under the
same thread count. The two images are compared at the geometry's own orientation
(:func:`image_agreement`): DiffDRR 0.6.1 reading the CT with ``orientation="AP"`` returns
its detector in our array layout (measured at 64² and 128² detectors, 0.798·256/size mm
pixels, 128 samples, both fed the same HU then: NCC 0.998 as returned; the best flip 0.982
and 0.762, transposes below 0.65). The CT carries a dense bead off the centre in two
detector directions, so a mirrored or transposed geometry moves
its shadow: a flip is reported as a disagreement, never searched for as the best match.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.core.drr import CArmGeometry, hu_to_mu, reference_transform, render_pose
from benchmark.core.timing import current_rss_mb, timed_call
from benchmark.perf.child import PROJECT_ROOT, child_env, run_child

__all__ = ["perf_drr", "main_perf_drr", "make_perf_ct", "peer_volume", "find_drr_peer_python", "image_agreement",
           "AGREEMENT_NCC"]

#: Lowest NCC at the geometry's own orientation that counts as agreement with the peer.
AGREEMENT_NCC = 0.99

DEFAULT_PEER_VENV = PROJECT_ROOT.parent / "peers_drr_venv"
SIZE = 256
N_SAMPLES = 256

_PEER_SCRIPT = r'''
import json, resource, statistics, sys, time
import numpy as np, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
import diffdrr
from diffdrr.data import read
from diffdrr.drr import DRR
from diffdrr.pose import convert
subject = read(args["ct"], orientation="AP")
out = {"diffdrr_version": diffdrr.__version__, "torch_version": torch.__version__, "threads": torch.get_num_threads(), "renderers": {}}
for renderer in ("trilinear", "siddon"):
    drr = DRR(subject, sdd=args["sdd"], height=args["size"], delx=args["pixel"], renderer=renderer)
    rot = torch.zeros(1, 3)
    tr = torch.tensor([[0.0, args["sid"], 0.0]])
    kw = {"n_points": args["n_samples"]} if renderer == "trilinear" else {}
    def fwd():
        with torch.no_grad():
            return drr(convert(rot, tr, parameterization="euler_angles", convention="ZXY"), **kw)
    def fwd_bwd():
        r = rot.clone().requires_grad_(True); t = tr.clone().requires_grad_(True)
        img = drr(convert(r, t, parameterization="euler_angles", convention="ZXY"), **kw)
        img.sum().backward()
        return img
    res = {}
    for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
        t0 = time.perf_counter(); img = fn(); warm = time.perf_counter() - t0
        times = []
        for _ in range(args["repeats"]):
            t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
        res[name] = {"median_s": statistics.median(times), "times_s": times, "warmup_s": warm}
    np.save(args["img"] if renderer == "trilinear" else args["img_siddon"], img.detach()[0, 0].numpy())
    # VmHWM, this process's own peak: ru_maxrss survives exec and would be regbench's peak
    res["peak_rss_mb"] = next(int(l.split()[1]) / 1024.0 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    out["renderers"][renderer] = res
json.dump(out, open(args["out"], "w"))
'''


def peer_volume(mu: np.ndarray) -> np.ndarray:
    """The values to hand DiffDRR so that it renders our attenuation volume ``mu`` (per mm).

    DiffDRR's ``read`` turns "HU" into density its own way (``transform_hu_to_density``: every
    value ≤ -800 is set to the smallest value above it, then the volume is shifted to start at
    0 and scaled to end at 1), which differs from :func:`benchmark.core.drr.hu_to_mu`
    (``μ_water (1 + HU / 1000)``) by an offset in every non-air voxel: fed the same HU, the two
    renderers integrate different volumes and their images disagree (docs/speed.md).
    ``-799 + 2000 μ / max μ`` lies above -800 everywhere, so DiffDRR's density is exactly
    ``μ / max μ`` (where ``μ`` has a zero, as in air): the images then differ only by geometry
    and sampling, which is what the comparison is for. The image scale is not compared (NCC).
    """
    top = float(mu.max())
    return np.ascontiguousarray(-799.0 + 2000.0 * mu / (top if top > 0 else 1.0), dtype=np.float32)


def make_perf_ct(size: int = SIZE, marker: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(hu (size³) float32, affine)``: a synthetic spine CT resampled to ``size³`` at 1 mm.

    ``marker`` adds a dense bead (3000 HU, a cube of ``size/6`` voxels) off the centre along
    array axes 0 and 2 (the detector's two directions in the AP view), so that the image is
    not mirror-symmetric and a flipped projection geometry shows (:func:`image_agreement`).
    """
    from datamodules.synthetic_spine import make_spine_ct

    ct = make_spine_ct(64, size / 64.0, seed=11)
    vol = torch.from_numpy(ct.hu)[None, None]
    hu = F.interpolate(vol, size=(size, size, size), mode="trilinear", align_corners=True)[0, 0].numpy()
    if marker:
        w = max(2, size // 6)
        c0, c1, c2 = int(0.72 * size), size // 2, int(0.62 * size)
        hu[c0 - w // 2 : c0 - w // 2 + w, c1 - w // 2 : c1 - w // 2 + w, c2 - w // 2 : c2 - w // 2 + w] = 3000.0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -(size - 1) / 2.0
    return np.ascontiguousarray(hu, dtype=np.float32), affine


def find_drr_peer_python(peer_python: str | None = None) -> str | None:
    """Python of a venv with diffdrr: the argument, ``$REGBENCH_DRR_PEER_PYTHON``, or
    ``<project>/../peers_drr_venv/bin/python``; ``None`` when none exists."""
    for cand in (peer_python, os.environ.get("REGBENCH_DRR_PEER_PYTHON"), str(DEFAULT_PEER_VENV / "bin" / "python")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def _time(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    times, peaks = [], []
    for _ in range(repeats):
        _, st = timed_call(fn)
        times.append(st.seconds)
        peaks.append(st.peak_mem_mb)
    return {"median_s": statistics.median(times), "times_s": times, "warmup_s": warm, "peak_rss_mb": max(peaks)}


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    u, v = a - a.mean(), b - b.mean()
    return float((u * v).sum() / np.sqrt((u * u).sum() * (v * v).sum() + 1e-12))


def image_agreement(ours: np.ndarray, peer: np.ndarray, threshold: float = AGREEMENT_NCC) -> dict[str, Any]:
    """Whether a peer's DRR shows the same geometry as ours: compared as it is, at the
    geometry's own orientation, never at the best of several.

    Args:
        ours, peer: ``(H, W)`` images of the same CT, pose and C-arm.
        threshold: lowest NCC that counts as agreement.

    Returns:
        ``{"ncc": NCC as returned, "ncc_mirrored": {name: NCC} for the 7 other flips and
        transposes (diagnostics: which one a wrong convention would be), "agrees": ncc >=
        threshold and no mirrored version matches better, "reason": text when it does not}``.
    """
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(peer, dtype=np.float64)
    own = _ncc(a, b) if a.shape == b.shape else float("nan")
    mirrored: dict[str, float] = {}
    for t in (False, True):
        for fr in (False, True):
            for fc in (False, True):
                if not (t or fr or fc):
                    continue
                x = b.T if t else b
                x = x[::-1] if fr else x
                x = x[:, ::-1] if fc else x
                name = "+".join(n for n, on in (("transpose", t), ("flip_rows", fr), ("flip_cols", fc)) if on)
                mirrored[name] = _ncc(a, x) if x.shape == a.shape else float("nan")
    best_name = max(mirrored, key=lambda k: -np.inf if np.isnan(mirrored[k]) else mirrored[k])
    reason = None
    if not own >= threshold:
        reason = f"NCC {own:.4f} at the geometry's own orientation is below {threshold}"
    if mirrored[best_name] > own:
        reason = (f"the image matches better {best_name} ({mirrored[best_name]:.4f} vs {own:.4f}): "
                  "the projection geometry is mirrored")
    return {"ncc": own, "ncc_mirrored": mirrored, "agrees": reason is None, "reason": reason}


def perf_drr(repeats: int = 5, threads: int = 2, peer_python: str | None = None, n_samples: int = N_SAMPLES,
             size: int = SIZE, device: str = "cpu", out: str | None = None) -> dict[str, Any]:
    """Run the DRR benchmark; returns (and writes to ``out``) the JSON record."""
    torch.set_num_threads(int(threads))
    hu, affine = make_perf_ct(size)
    geom = CArmGeometry(sdd=1020.0, sid=510.0, height=size, width=size, dely=0.798, delx=0.798)
    dev = torch.device(device)
    mu = hu_to_mu(torch.from_numpy(hu)).to(dev)[None, None]
    aff = torch.from_numpy(affine).to(dev)
    base = reference_transform(torch.zeros(3)).to(dev)[None]
    pose0 = torch.zeros(1, 6, device=dev)

    def fwd(method: str = "trilinear") -> torch.Tensor:
        with torch.no_grad():
            return render_pose(mu, aff, pose0, base, geom, n_samples, method=method)

    def fwd_bwd(method: str = "trilinear") -> torch.Tensor:
        p = pose0.clone().requires_grad_(True)
        img = render_pose(mu, aff, p, base, geom, n_samples, method=method)
        img.sum().backward()
        return img

    rss0 = current_rss_mb()
    ours = {"forward": _time(fwd, repeats), "forward_backward": _time(fwd_bwd, repeats), "baseline_rss_mb": rss0}
    # the slice method (one bilinear sample per CT slice: 256 samples per ray on this 256³ CT)
    slices = {"forward": _time(lambda: fwd("slices"), repeats),
              "forward_backward": _time(lambda: fwd_bwd("slices"), repeats),
              "samples_per_ray": size}
    images = {m: fwd(m)[0, 0].cpu().numpy() for m in ("trilinear", "slices")}  # each rendered once, untimed
    slices["image_ncc_vs_trilinear"] = _ncc(images["slices"], images["trilinear"])
    result: dict[str, Any] = {
        "case": {"ct": f"{size}^3 synthetic spine, 1 mm", "detector": f"{size}x{size} at 0.798 mm", "sdd_mm": 1020.0,
                 "sid_mm": 510.0, "n_samples": n_samples, "device": str(dev), "threads": torch.get_num_threads(),
                 "repeats": repeats, "torch": torch.__version__},
        "regbench": ours,
        "regbench_slices": slices,
    }
    py = find_drr_peer_python(peer_python)
    if py is None:
        result["diffdrr"] = {"status": "skipped", "reason": "no python with diffdrr (pass --peer-python, or create ../peers_drr_venv)"}
    elif dev.type != "cpu":
        result["diffdrr"] = {"status": "skipped", "reason": "the peer is run on CPU only"}
    else:
        import nibabel as nib

        with tempfile.TemporaryDirectory(prefix="regbench_drr_") as tmp:
            ct_path = str(Path(tmp) / "ct.nii.gz")
            nib.save(nib.Nifti1Image(peer_volume(mu[0, 0].cpu().numpy()), affine), ct_path)
            args = {"ct": ct_path, "sdd": 1020.0, "sid": 510.0, "size": size, "pixel": 0.798, "n_samples": n_samples,
                    "threads": int(threads), "repeats": int(repeats), "out": str(Path(tmp) / "peer.json"), "img": str(Path(tmp) / "img.npy"),
                    "img_siddon": str(Path(tmp) / "img_siddon.npy")}
            run = run_child([py, "-c", _PEER_SCRIPT, json.dumps(args)], args["out"], timeout_s=3600, env=child_env(threads))
            if run.record is None:
                result["diffdrr"] = {"status": "failed", "error": "timed out" if run.timed_out else run.tail_chars(2000)}
            else:
                peer = run.record
                peer["status"] = "measured"
                peer_img = np.load(args["img"])
                agreement = image_agreement(images["trilinear"], peer_img)
                peer["image_ncc_vs_regbench"] = agreement["ncc"]
                peer["image_agreement"] = agreement
                slices["image_agreement"] = image_agreement(images["slices"], peer_img)
                # Siddon's exact ray-voxel intersections: the line integral every sampler approximates
                exact = np.load(args["img_siddon"])
                peer["image_ncc_vs_siddon"] = {
                    "regbench_trilinear": _ncc(images["trilinear"], exact),
                    "regbench_slices": _ncc(images["slices"], exact),
                    "diffdrr_trilinear": _ncc(peer_img, exact),
                }
                result["diffdrr"] = peer
                tri = peer["renderers"]["trilinear"]
                fastest = min(peer["renderers"].values(), key=lambda r: r["forward"]["median_s"])
                result["speedup_vs_diffdrr_trilinear"] = {
                    k: tri[k]["median_s"] / ours[k]["median_s"] for k in ("forward", "forward_backward")}
                result["speedup_vs_diffdrr_fastest"] = {
                    k: fastest[k]["median_s"] / ours[k]["median_s"] for k in ("forward", "forward_backward")}
                slices["speedup_vs_diffdrr_fastest"] = {
                    k: fastest[k]["median_s"] / slices[k]["median_s"] for k in ("forward", "forward_backward")}
    if out:
        from benchmark.core.io import atomic_write_json

        atomic_write_json(out, result)
    return result


def format_perf_drr(res: dict[str, Any]) -> str:
    """A small text table of :func:`perf_drr`'s result."""
    c = res["case"]
    lines = [f"DRR {c['detector']} of a {c['ct']}, {c['n_samples']} samples/ray, {c['threads']} threads, {c['device']}",
             f"{'renderer':28s} {'forward s':>10s} {'fwd+bwd s':>10s} {'peak RSS MB':>12s}"]
    o = res["regbench"]
    lines.append(f"{'regbench trilinear':28s} {o['forward']['median_s']:10.3f} {o['forward_backward']['median_s']:10.3f} "
                 f"{max(o['forward']['peak_rss_mb'], o['forward_backward']['peak_rss_mb']):12.0f}")
    sl = res.get("regbench_slices")
    if sl:
        lines.append(f"{'regbench slices':28s} {sl['forward']['median_s']:10.3f} {sl['forward_backward']['median_s']:10.3f} "
                     f"{max(sl['forward']['peak_rss_mb'], sl['forward_backward']['peak_rss_mb']):12.0f}")
    peer = res.get("diffdrr", {})
    if peer.get("status") == "measured":
        for name, r in peer["renderers"].items():
            label = f"diffdrr {peer['diffdrr_version']} {name}"
            lines.append(f"{label:28s} {r['forward']['median_s']:10.3f} {r['forward_backward']['median_s']:10.3f} {r['peak_rss_mb']:12.0f}")
        ag = peer.get("image_agreement") or {}
        verdict = "agrees" if ag.get("agrees", True) else f"DISAGREES: {ag.get('reason')}"
        lines.append(f"image NCC regbench vs diffdrr trilinear, as returned: {peer['image_ncc_vs_regbench']:.4f} ({verdict})")
        vs = peer.get("image_ncc_vs_siddon")
        if vs:
            lines.append("image NCC vs diffdrr siddon (exact intersections): regbench trilinear "
                         f"{vs['regbench_trilinear']:.5f}, slices {vs['regbench_slices']:.5f}, "
                         f"diffdrr trilinear {vs['diffdrr_trilinear']:.5f}")
        if sl and sl.get("image_agreement"):
            ag2 = sl["image_agreement"]
            verdict2 = "agrees" if ag2.get("agrees") else f"DISAGREES: {ag2.get('reason')}"
            lines.append(f"image NCC regbench slices vs diffdrr trilinear: {ag2['ncc']:.4f} ({verdict2}); "
                         f"vs regbench trilinear {sl['image_ncc_vs_trilinear']:.5f}")
        for label, rec in (("trilinear", res), ("slices", sl or {})):
            sp = rec.get("speedup_vs_diffdrr_fastest")
            if sp:
                lines.append(f"time / diffdrr's fastest: {label} {1 / sp['forward']:.2f} forward, "
                             f"{1 / sp['forward_backward']:.2f} forward+backward")
    else:
        lines.append(f"diffdrr: {peer.get('status')} ({peer.get('reason') or peer.get('error', '')[:200]})")
    return "\n".join(lines)


def main_perf_drr(args: Any) -> dict[str, Any]:
    """CLI entry (``regbench perf drr``): ``args.out`` (JSON path or None), ``args.repeats``
    (default 5), ``args.threads`` (default 2), ``args.peer_python``; optional ``args.device``,
    ``args.n_samples``. Prints the table."""
    repeats = getattr(args, "repeats", None)
    threads = getattr(args, "threads", None)
    res = perf_drr(repeats=5 if repeats is None else int(repeats), threads=2 if threads is None else int(threads),
                   peer_python=getattr(args, "peer_python", None), n_samples=int(getattr(args, "n_samples", None) or N_SAMPLES),
                   device=getattr(args, "device", None) or "cpu", out=getattr(args, "out", None))
    print(format_perf_drr(res))
    if getattr(args, "out", None):
        print(f"wrote {args.out}")
    sys.stdout.flush()
    return res
