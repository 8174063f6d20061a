"""Performance harness for the registration systems (``regbench perf systems``).

``syn``: the suite's greedy SyN (:class:`systems.syn.GreedySyN`, presets ``"fast"``,
``"regular"`` and ``"accurate"``) on a real brain pair, side by side in one run with FireANTs'
``GreedyRegistration`` (run in a peer virtualenv through
``benchmark/perf/peers/fireants_greedy.py``; at the brief's setting, at its published OASIS
setting, and at the brief's with glibc keeping freed memory, which our SyN does inside
``register``) and next to cached ANTs figures. Per tool: Dice per label and mean, fold % and
SDlogJ (:mod:`benchmark.core.metrics`, central differences), wall-clock of the registration
call alone (:func:`benchmark.core.timing.timed_call` for ours; the peer times its own
``optimize()``), process CPU time (less sensitive to a shared machine than wall-clock) and
peak memory.

The peer's displacement is converted to the suite's convention inside the peer script (see
its docstring); the conversion is checked here: the Dice of the converted field warped with
:func:`benchmark.core.spatial.warp` must match the Dice FireANTs' own coordinates give in its own
frame (``conversion_ok``).

``msff``: the MSFF pyramid (:class:`systems.msff.MSFF`) beside VoxelMorph
(:class:`systems.voxelmorph.VoxelMorph`), both with their defaults, in the same run, at
LUMIR's size 160×224×192 (batch 1, float32): the training step (forward + loss + backward +
Adam step) and the inference call (``register`` under ``no_grad``, as the test loop times it).
Each system runs in a fresh process (``python -m benchmark.perf.systems --learned-child``) so
that the peak RSS sampled during its steps is its own; there one untimed warm-up step, then
``repeats`` timed steps, then one untimed and ``repeats`` timed inference calls, each under
:func:`benchmark.core.timing.timed_call`; medians are reported (wall-clock s, process CPU s, peak
RSS MB with the RSS before the step as ``base_mb``; on CUDA, max allocated MB).

Pair: ``moving = image_A``, ``fixed = image_B`` of ``<pair_dir>`` (default
``../shared/data/oasis_pair`` next to the project root). ``image_A_seg`` lies on another grid
than ``image_A``; it is resampled onto ``image_A``'s grid through the affines (nearest
neighbour) by :func:`benchmark.core.io.load_segmentation`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
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

from benchmark.core import metrics as M
from benchmark.core.io import DataError, atomic_write_json, load_segmentation, load_volume, same_grid
from benchmark.core.memory import GLIBC_KEEP_ENV
from benchmark.core.spatial import warp
from benchmark.core.timing import device_description, timed_call
from benchmark.perf.child import PROJECT_ROOT, child_env, run_child

__all__ = [
    "CACHED_ANTS",
    "BrainPair",
    "load_brain_pair",
    "find_peer_python",
    "registration_metrics",
    "perf_syn",
    "format_perf_systems",
    "time_ratios",
    "LEARNED_SYSTEMS",
    "perf_learned",
    "format_perf_learned",
    "main_perf_systems",
]

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

#: FireANTs' own published OASIS setting where it differs from the brief's
#: (:data:`FIREANTS_SETTINGS`): iterations 250/200/100 and Adam's beta1 = 0.1. Both run in
#: one ``perf systems`` call, so a preset is compared with the peer at its best known setting.
FIREANTS_PUBLISHED_OASIS: dict[str, Any] = dict(
    iterations=(250, 200, 100),
    optimizer_params={"beta1": 0.1},
)
#: name -> overrides of :data:`FIREANTS_SETTINGS` for each FireANTs run of ``perf systems``.
#: ``"brief-kept"``: the brief's setting with glibc keeping freed memory (:data:`GLIBC_KEEP_ENV`,
#: as environment variables of the peer's process): what our SyN does inside ``register``
#: (:mod:`benchmark.core.memory`), given to the peer too, so that the ratio is not the allocator's.
FIREANTS_RUNS: dict[str, dict[str, Any]] = {"brief": {}, "published": FIREANTS_PUBLISHED_OASIS,
                                            "brief-kept": {"env": GLIBC_KEEP_ENV}}

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
    d = M.dice_per_label(torch.from_numpy(np.ascontiguousarray(fixed_seg)).long(), warped, labels, moving_seg)
    det = M.jacobian_determinant(u[0])
    return {
        "dice": {str(k): float(v) for k, v in zip(labels, d)},
        "dice_mean": M.dice(fixed_seg, warped, labels, moving_seg),
        "fold_pct": M.fold_pct(det),
        "sdlogj": M.sdlogj(det),
    }


def _run_syn_preset(pair: BrainPair, preset: str, device: str, labels: Sequence[int]) -> dict[str, Any]:
    from systems.syn import GreedySyN

    syn = GreedySyN.preset(preset)
    mov = torch.from_numpy(pair.moving)[None, None].to(device)
    fix = torch.from_numpy(pair.fixed)[None, None].to(device)
    c0 = time.process_time()
    out, stats = timed_call(lambda: syn.register(mov, fix, spacing=pair.spacing, progress=False, with_inverse=False),
                            device)
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
    env = s.pop("env", None)
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
        if s.get("optimizer_params"):
            cmd += ["--optimizer-params", json.dumps(s["optimizer_params"])]
        run = run_child(cmd, tmpd / "info.json", timeout_s=timeout_s, env=child_env(None, **env) if env else None)
        if run.timed_out:
            return {"tool": "fireants", "status": "failed", "error": run.timeout_message}
        if run.record is None:
            return {"tool": "fireants", "status": "failed", "error": f"exit code {run.returncode}: {run.tail_chars(2000)}"}
        info = run.record
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
        "env": dict(env or {}),
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
    presets: Sequence[str] = ("fast", "regular", "accurate"),
    out: str | os.PathLike | None = None,
    device: str = "cpu",
    labels: Sequence[int] = (1, 2),
    with_peers: bool = True,
    peer_timeout_s: float = 7200.0,
    fireants_runs: Sequence[str] = ("brief", "published", "brief-kept"),
    second_pair: bool = True,
) -> dict[str, Any]:
    """Our SyN presets vs FireANTs (when a peer python is found) vs cached ANTs, one run.

    The presets were tuned on this very pair (image_A -> image_B): with ``second_pair`` they
    also run on the reverse direction (image_B -> image_A), which they were not tuned on;
    every record says its ``pair`` and whether the presets were ``tuned_on`` it. FireANTs
    runs once per entry of ``fireants_runs`` (:data:`FIREANTS_RUNS`: the brief's setting, its
    own published OASIS setting, and the brief's with the allocator setting our SyN uses).
    The JSON at ``out`` is rewritten after every tool, so a crash or a kill keeps what was
    measured.

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
        peer_timeout_s: the peer's time limit (per FireANTs run).
        fireants_runs: names of :data:`FIREANTS_RUNS` to run.
        second_pair: also run the presets on image_B -> image_A.

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
        def save() -> None:
            if out is not None:
                atomic_write_json(out, res)

        for p in presets:
            rec = _run_syn_preset(pair, p, device, labels)
            rec.update(pair="A->B", tuned_on=True)
            res["results"].append(rec)
            save()
        if second_pair:
            rev = load_brain_pair(pair_dir, moving="image_B", fixed="image_A")
            res["initial_reverse"] = registration_metrics(
                np.zeros((3,) + rev.fixed.shape, np.float32), rev.moving_seg, rev.fixed_seg, labels)["dice_mean"]
            for p in presets:
                rec = _run_syn_preset(rev, p, device, labels)
                rec.update(pair="B->A", tuned_on=False)
                res["results"].append(rec)
                save()
            del rev
        if with_peers:
            py = find_peer_python(peer_python)
            if py is None:
                res["skipped"].append(
                    "fireants: no peer python (pass --peer-python, set REGBENCH_PEER_PYTHON, or create "
                    f"{DEFAULT_PEER_VENV} with `pip install fireants`)"
                )
            else:
                check = run_child([py, "-c", "import fireants"], None)
                if check.returncode != 0:
                    res["skipped"].append(f"fireants: not importable with {py}: {check.output.strip()[-300:]}")
                else:
                    nthreads = int(threads) if threads is not None else torch.get_num_threads()
                    for run_name in fireants_runs:
                        rec = _run_fireants(pair, py, nthreads, device, labels, peer_timeout_s, FIREANTS_RUNS[run_name])
                        rec.update(preset=run_name, pair="A->B", tuned_on=False)
                        res["results"].append(rec)
                        save()
                        if rec.get("status") == "measured" and not rec.get("conversion_ok"):
                            res["skipped"].append(
                                "fireants: WARNING the converted displacement's Dice "
                                f"{rec['dice_mean']:.4f} differs from FireANTs' own {rec['native_dice_mean']}"
                            )
        res["ratios"] = time_ratios(res["results"])
        res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    finally:
        torch.set_num_threads(before)
    if out is not None:
        atomic_write_json(out, res)
    return res


def time_ratios(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of our presets' wall and CPU time over each FireANTs run's, on the same pair
    (``results``: the measured records of ``regbench perf syn``; ``None`` where a time is missing)."""
    ours = [r for r in results if r.get("tool") == "regbench-syn" and r.get("status") == "measured"]
    peers = [r for r in results if r.get("tool") == "fireants" and r.get("status") == "measured"]
    out = []
    for a in ours:
        for b in peers:
            if a.get("pair") != b.get("pair"):
                continue
            out.append({
                "preset": a["preset"], "fireants": b.get("preset"), "pair": a.get("pair"),
                "wall_ratio": a["wall_s"] / b["wall_s"] if b.get("wall_s") else None,
                "cpu_ratio": a["cpu_s"] / b["cpu_s"] if a.get("cpu_s") and b.get("cpu_s") else None,
            })
    return out


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
        f"{'tool':14s} {'preset':9s} {'pair':5s} "
        + " ".join(f"{'Dice ' + k:>7s}" for k in labels)
        + f" {'Dice':>7s} {'fold %':>7s} {'SDlogJ':>7s} {'wall s':>8s} {'cpu s':>8s} {'mem MB':>8s}  status",
    ]
    for r in res["results"]:
        if r.get("status") != "measured":
            lines.append(f"{r['tool']:14s} {str(r.get('preset') or ''):9s} FAILED: {r.get('error', '')[:200]}")
            continue
        lines.append(
            f"{r['tool']:14s} {str(r.get('preset') or '-'):9s} {str(r.get('pair') or '-'):5s} "
            + " ".join(f"{_fmt(r['dice'].get(k), '7.4f'):>7s}" for k in labels)
            + f" {_fmt(r['dice_mean'], '7.4f'):>7s} {_fmt(r['fold_pct'], '7.3f'):>7s} {_fmt(r['sdlogj'], '7.3f'):>7s}"
            f" {_fmt(r['wall_s'], '8.1f'):>8s} {_fmt(r.get('cpu_s'), '8.1f'):>8s} {_fmt(r.get('peak_mem_mb'), '8.0f'):>8s}"
            f"  measured" + ("" if r["tool"] != "fireants" else f" (conversion {'ok' if r.get('conversion_ok') else 'MISMATCH'})")
        )
    for r in res["cached"]:
        lines.append(
            f"{r['tool']:14s} {'':9s} {'A->B':5s} " + " ".join(f"{'-':>7s}" for _ in labels)
            + f" {_fmt(r['dice_mean'], '7.3f'):>7s} {_fmt(r['fold_pct'], '7.3f'):>7s} {_fmt(r['sdlogj'], '7.2f'):>7s}"
            f" {_fmt(r['wall_s'], '8.0f'):>8s} {'-':>8s} {'-':>8s}  cached ({r['pair']}): {r['version']}, {r['settings']}"
        )
    for q in res.get("ratios", []):
        lines.append(f"time ratio {q['preset']} / fireants {q['fireants']} ({q['pair']}): "
                     f"{_fmt(q['wall_ratio'], '.3f')} wall, {_fmt(q['cpu_ratio'], '.3f')} cpu")
    if any(r.get("pair") == "B->A" for r in res["results"]):
        lines.append(f"note: the presets were tuned on A->B; B->A (initial Dice {_fmt(res.get('initial_reverse'), '.4f')}) "
                     "is a direction they were not tuned on")
    for msg in res["skipped"]:
        lines.append(f"note: {msg}")
    return "\n".join(lines)


#: Learned systems of the ``msff`` benchmark: name → (class path, init arguments).
LEARNED_SYSTEMS: dict[str, tuple[str, dict[str, Any]]] = {
    "msff": ("systems.msff.MSFF", {}),
    "voxelmorph": ("systems.voxelmorph.VoxelMorph", {}),
}
LUMIR_SIZE: tuple[int, int, int] = (160, 224, 192)


def _median(xs: Sequence[float]) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def _learned_child(system: str, size: Sequence[int], threads: int, repeats: int, device: str, out: str, seed: int = 0) -> None:
    """One measurement process: warm-up, ``repeats`` timed training steps, then inference."""
    from benchmark.core.classpath import import_object

    from benchmark.core.timing import current_rss_mb

    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    path, kwargs = LEARNED_SYSTEMS[system]
    model = import_object(path)(**kwargs).to(device)
    opt = model.configure_optimizers()
    g = torch.Generator().manual_seed(seed)
    batch = {
        "moving": torch.rand(1, 1, *size, generator=g).to(device),
        "fixed": torch.rand(1, 1, *size, generator=g).to(device),
    }

    def step() -> float:
        loss, _ = model.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def infer() -> torch.Tensor:
        with torch.no_grad():
            return model.register(batch)

    rec: dict[str, Any] = {"system": system, "class_path": path, "size": list(size), "threads": torch.get_num_threads(),
                           "parameters": int(sum(p.numel() for p in model.parameters())), "train": [], "infer": []}
    model.train()
    _, warm = timed_call(step, device)
    rec["train_warmup_s"] = warm.seconds
    for _ in range(int(repeats)):
        base = current_rss_mb() if device == "cpu" else None
        c0 = time.process_time()
        _, st = timed_call(step, device)
        rec["train"].append({"wall_s": st.seconds, "cpu_s": time.process_time() - c0, "peak_mem_mb": st.peak_mem_mb, "base_mb": base})
    model.eval()
    _, warm = timed_call(infer, device)
    rec["infer_warmup_s"] = warm.seconds
    for _ in range(int(repeats)):
        base = current_rss_mb() if device == "cpu" else None
        c0 = time.process_time()
        disp, st = timed_call(infer, device)
        rec["infer"].append({"wall_s": st.seconds, "cpu_s": time.process_time() - c0, "peak_mem_mb": st.peak_mem_mb, "base_mb": base})
    rec["disp_shape"] = list(disp.shape)
    atomic_write_json(out, rec)


def perf_learned(
    size: Sequence[int] = LUMIR_SIZE,
    repeats: int = 3,
    threads: int = 2,
    systems: Sequence[str] = ("msff", "voxelmorph"),
    device: str = "cpu",
    out: str | os.PathLike | None = None,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Training step and inference of MSFF beside VoxelMorph, one fresh process per system.

    Args:
        size: spatial size of the random pair (LUMIR's 160×224×192 by default).
        repeats: timed training steps and timed inference calls per system (after one
            untimed of each); medians are reported.
        threads: torch threads (and ``OMP_NUM_THREADS``) of each process.
        systems: names in :data:`LEARNED_SYSTEMS`.
        device: ``"cpu"`` or ``"cuda"``.
        out: write the result JSON here (atomically).

    Returns:
        dict with ``results``: per system ``train_s``, ``train_cpu_s``, ``train_peak_mb``,
        ``train_base_mb``, ``infer_s``, ``infer_cpu_s``, ``infer_peak_mb`` (medians),
        ``parameters`` and the raw per-repeat records; or ``status: "failed"`` with the error.
    """
    unknown = [s for s in systems if s not in LEARNED_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown learned system(s) {unknown}; available: {', '.join(LEARNED_SYSTEMS)}")
    res: dict[str, Any] = {
        "benchmark": "msff",
        "size": [int(s) for s in size],
        "repeats": int(repeats),
        "threads": int(threads),
        "device": device_description(device),
        "results": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    env = child_env(threads, wait_policy=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), on_path=True)
    for name in systems:
        with tempfile.TemporaryDirectory(prefix="regbench_learned_") as tmp:
            rec_path = Path(tmp) / "rec.json"
            cmd = [sys.executable, "-m", "benchmark.perf.systems", "--learned-child", "--system", name,
                   "--size", ",".join(str(int(s)) for s in size), "--threads", str(threads),
                   "--repeats", str(repeats), "--device", device, "--out", str(rec_path)]  # fmt: skip
            run = run_child(cmd, rec_path, timeout_s=timeout_s, env=env, cwd=PROJECT_ROOT)
            if run.timed_out:
                res["results"].append({"system": name, "status": "failed", "error": run.timeout_message})
                continue
            if run.record is None:
                res["results"].append({"system": name, "status": "failed",
                                       "error": f"exit code {run.returncode}: {run.tail_chars(2000)}"})
                continue
            raw = run.record
        tr, inf = raw["train"], raw["infer"]
        res["results"].append({
            "system": name,
            "status": "measured",
            "class_path": raw["class_path"],
            "parameters": raw["parameters"],
            "train_s": _median([r["wall_s"] for r in tr]),
            "train_cpu_s": _median([r["cpu_s"] for r in tr]),
            "train_peak_mb": _median([r["peak_mem_mb"] for r in tr]),
            "train_base_mb": _median([r["base_mb"] for r in tr]),
            "infer_s": _median([r["wall_s"] for r in inf]),
            "infer_cpu_s": _median([r["cpu_s"] for r in inf]),
            "infer_peak_mb": _median([r["peak_mem_mb"] for r in inf]),
            "train_warmup_s": raw["train_warmup_s"],
            "infer_warmup_s": raw["infer_warmup_s"],
            "raw": {"train": tr, "infer": inf},
        })  # fmt: skip
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if out is not None:
        atomic_write_json(out, res)
    return res


def format_perf_learned(res: dict[str, Any]) -> str:
    """A plain-text table of :func:`perf_learned`'s result."""
    size = "x".join(str(s) for s in res["size"])
    lines = [
        f"learned systems at {size}, batch 1, float32; threads {res['threads']}, device {res['device'].get('device')}; "
        f"medians of {res['repeats']} (after 1 warm-up)",
        f"{'system':11s} {'params':>9s} {'train s':>8s} {'cpu s':>8s} {'peak MB':>8s} {'base MB':>8s}"
        f" {'infer s':>8s} {'peak MB':>8s}",
    ]
    for r in res["results"]:
        if r.get("status") != "measured":
            lines.append(f"{r['system']:11s} FAILED: {r.get('error', '')[:300]}")
            continue
        lines.append(
            f"{r['system']:11s} {r['parameters']:9d} {_fmt(r['train_s'], '8.2f'):>8s} {_fmt(r['train_cpu_s'], '8.1f'):>8s}"
            f" {_fmt(r['train_peak_mb'], '8.0f'):>8s} {_fmt(r['train_base_mb'], '8.0f'):>8s}"
            f" {_fmt(r['infer_s'], '8.2f'):>8s} {_fmt(r['infer_peak_mb'], '8.0f'):>8s}"
        )
    return "\n".join(lines)


BENCHMARKS = ("syn", "msff")
#: Run when ``--only`` is not given (``msff`` takes minutes at LUMIR's size: ask for it).
DEFAULT_BENCHMARKS = ("syn",)


def main_perf_systems(args: Any) -> dict[str, Any]:
    """CLI entry (``regbench perf systems``): reads ``args.pair_dir``, ``args.peer_python``,
    ``args.threads`` (default 2, as the reference figures), ``args.only`` (comma-separated
    subset of :data:`BENCHMARKS`; default :data:`DEFAULT_BENCHMARKS`), ``args.repeats``
    (``msff``: timed steps per system, default 3), ``args.size`` (``msff``: e.g.
    ``"160,224,192"``, the default), ``args.device`` (``msff``: default ``"cpu"``) and
    ``args.out``; prints the tables. With one benchmark the JSON at ``out`` is its result;
    with several, ``{name: result}``."""
    only = getattr(args, "only", None)
    wanted = [s.strip() for s in only.split(",")] if only else list(DEFAULT_BENCHMARKS)
    unknown = [w for w in wanted if w not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown systems benchmark(s) {unknown}; available: {', '.join(BENCHMARKS)}")
    threads = getattr(args, "threads", None)
    out = getattr(args, "out", None)
    single_out = out if len(wanted) == 1 else None
    results: dict[str, Any] = {}
    if "syn" in wanted:
        results["syn"] = perf_syn(
            pair_dir=getattr(args, "pair_dir", None),
            threads=2 if threads is None else threads,
            peer_python=getattr(args, "peer_python", None),
            out=single_out,
        )
        print(format_perf_systems(results["syn"]))
    if "msff" in wanted:
        size_arg = getattr(args, "size", None)
        size = tuple(int(v) for v in str(size_arg).replace("x", ",").split(",")) if size_arg else LUMIR_SIZE
        repeats = getattr(args, "repeats", None)
        results["msff"] = perf_learned(
            size=size,
            repeats=3 if repeats is None else int(repeats),
            threads=2 if threads is None else int(threads),
            device=getattr(args, "device", None) or "cpu",
            out=single_out,
        )
        print(format_perf_learned(results["msff"]))
    if out and len(wanted) > 1:
        atomic_write_json(out, results)
    if out:
        print(f"wrote {out}")
    sys.stdout.flush()
    return results[wanted[0]] if len(wanted) == 1 else results


def _main(argv: list[str] | None = None) -> int:
    """``python -m benchmark.perf.systems --learned-child ...``: one measurement process of
    :func:`perf_learned` (not meant to be called by hand)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmark.perf.systems")
    p.add_argument("--learned-child", action="store_true", required=True)
    p.add_argument("--system", required=True, choices=sorted(LEARNED_SYSTEMS))
    p.add_argument("--size", required=True, help="X,Y,Z")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    _learned_child(a.system, tuple(int(v) for v in a.size.split(",")), a.threads, a.repeats, a.device, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
