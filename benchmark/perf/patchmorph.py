"""Performance harness for PatchMorph: training memory flat in image size; inference vs patches.

``main_perf_patchmorph(args)`` (``args.out``, ``args.repeats``, ``args.threads``) measures

* **training-step memory** of :class:`systems.patchmorph.PatchMorph` (defaults: 32³ patches,
  three scales, two patch pairs per step, VxmUNet backbone) and, beside it,
  :class:`systems.voxelmorph.VoxelMorph` (defaults), at image sizes 64³, 128³ and 192³
  (1 mm, identity affines, a random image pair, batch 1). One step = ``training_loss`` +
  backward + Adam step. Criterion: PatchMorph's figure at 192³ ≤ 1.2 × its figure at 64³.
* **inference time versus number of patches**: ``register`` on a 64³ pair with
  ``infer_passes`` = 1, 2, 4, 8 (each pass a jittered lattice per scale), wall clock of the
  call (:func:`benchmark.core.timing.timed_call`) and the patch count.

How memory is measured, and why: on CPU the suite's rule is the resident set size
(:func:`benchmark.core.timing.timed_call` samples ``/proc/self/statm`` every 5 ms). torch's CPU
allocations are plain ``malloc``s, so they are visible to RSS, but glibc keeps freed memory
for reuse, which would hide a step's allocations behind the previous step's. Therefore every
configuration runs in a **fresh subprocess** (``python -m benchmark.perf.patchmorph --child …``)
with ``MALLOC_MMAP_THRESHOLD_=65536`` (every block above 64 KiB is its own mapping, returned
to the system when freed), does one untimed warm-up step (oneDNN primitives, Adam state),
then timed steps. The figure per step is ``peak RSS during the step − RSS just before it``
(``step_mb``): the memory the training step itself needs, excluding the interpreter, torch
and the data already in memory; the absolute peak (``peak_mb``) and the RSS before the step
(``base_mb``, which contains the images and grows with them for both methods) are reported
too. ``tracemalloc`` was not used: it sees only Python-level allocations, not torch's.

Figures are medians over ``repeats`` processes (and the timed steps within them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmark.core.io import atomic_write_text
from benchmark.perf.child import PROJECT_ROOT, child_env, run_child

__all__ = ["SIZES", "measure_training", "measure_inference", "format_perf_patchmorph", "main_perf_patchmorph"]

SIZES: tuple[int, ...] = (64, 128, 192)
INFER_SIZE = 64
INFER_PASSES: tuple[int, ...] = (1, 2, 4, 8)
METHODS: tuple[str, ...] = ("patchmorph", "voxelmorph")


def _run_child(argv: list[str], threads: int, timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "benchmark.perf.patchmorph", "--child", *argv, "--threads", str(threads), "--out", str(out)]
        env = child_env(threads, wait_policy=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), on_path=True,
                        MALLOC_MMAP_THRESHOLD_="65536")
        run = run_child(cmd, out, timeout_s=timeout_s, env=env, cwd=PROJECT_ROOT)
        if run.timed_out:
            return {"error": run.timeout_message}
        if run.record is None:
            return {"error": f"exit {run.returncode}: " + run.tail_lines(5)}
        return run.record


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def measure_training(sizes: Sequence[int] = SIZES, methods: Sequence[str] = METHODS, repeats: int = 3, threads: int = 2,
                     steps: int = 2, timeout_s: float = 900.0) -> dict[str, Any]:
    """Training-step memory and time per method and size, each run in a fresh process.

    Returns:
        ``{method: {size: {"step_mb", "peak_mb", "base_mb", "seconds", "runs"}}}`` (medians;
        ``"error"`` instead when a run failed).
    """
    res: dict[str, Any] = {m: {} for m in methods}
    for rep in range(repeats):
        for method in methods:
            for size in sizes:
                r = _run_child(["train", "--method", method, "--size", str(size), "--steps", str(steps)], threads, timeout_s)
                res[method].setdefault(str(size), []).append(r)
                print(f"[perf patchmorph] {method} {size}³ repeat {rep}: " + (r.get("error") or
                      f"step {r['step_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB, {r['seconds']:.2f} s"), flush=True)
    out: dict[str, Any] = {}
    for method, per in res.items():
        out[method] = {}
        for size, runs in per.items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                out[method][size] = {"error": runs[0]["error"]}
                continue
            out[method][size] = {k: _median([r[k] for r in ok]) for k in ("step_mb", "peak_mb", "base_mb", "seconds")}
            out[method][size]["runs"] = len(ok)
    return out


def measure_inference(size: int = INFER_SIZE, passes: Sequence[int] = INFER_PASSES, repeats: int = 3, threads: int = 2,
                      timeout_s: float = 900.0) -> list[dict[str, Any]]:
    """``register`` time versus number of patches (``infer_passes``), fresh process per repeat."""
    runs = [_run_child(["infer", "--size", str(size), "--passes", ",".join(str(p) for p in passes)], threads, timeout_s)
            for _ in range(repeats)]
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return [{"error": runs[0]["error"]}]
    rows = []
    for i, p in enumerate(passes):
        rows.append({
            "passes": p,
            "patches": ok[0]["rows"][i]["patches"],
            "patches_per_scale": ok[0]["rows"][i]["patches_per_scale"],
            "seconds": _median([r["rows"][i]["seconds"] for r in ok]),
            "peak_mb": _median([r["rows"][i]["peak_mb"] for r in ok]),
        })
    return rows


def format_perf_patchmorph(res: dict[str, Any]) -> str:
    """Markdown tables of a result of :func:`main_perf_patchmorph`."""
    lines = ["Training step (batch 1, 1 mm, CPU): step MB = peak RSS during the step − RSS before it", "",
             "| method | size | step MB | peak RSS MB | RSS before MB | step s |", "| --- | --- | --- | --- | --- | --- |"]
    for method, per in res["training"].items():
        for size, r in per.items():
            if "error" in r:
                lines.append(f"| {method} | {size}³ | {r['error']} | | | |")
            else:
                lines.append(f"| {method} | {size}³ | {r['step_mb']:.0f} | {r['peak_mb']:.0f} | {r['base_mb']:.0f} | {r['seconds']:.2f} |")
    lines += ["", f"PatchMorph step memory, largest / smallest size: {res.get('patchmorph_ratio', float('nan')):.3f} (criterion ≤ 1.2)", "",
              f"Inference ({res['inference_size']}³):", "", "| passes | patches (per scale) | seconds | peak RSS MB |", "| --- | --- | --- | --- |"]
    for r in res["inference"]:
        if "error" in r:
            lines.append(f"| | {r['error']} | | |")
        else:
            lines.append(f"| {r['passes']} | {r['patches']} ({'/'.join(str(c) for c in r['patches_per_scale'])}) | {r['seconds']:.2f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def main_perf_patchmorph(args: argparse.Namespace) -> dict[str, Any]:
    """``regbench perf patchmorph``: training memory vs image size (PatchMorph beside
    VoxelMorph), inference time vs patches; JSON to ``args.out`` and a table on stdout."""
    repeats = max(int(getattr(args, "repeats", 3) or 1), 1)
    threads = int(getattr(args, "threads", None) or 2)
    sizes = tuple(int(s) for s in (getattr(args, "sizes", None) or SIZES))
    t0 = time.time()
    training = measure_training(sizes=sizes, repeats=repeats, threads=threads)
    pm = training.get("patchmorph", {})
    figs = [pm[str(s)]["step_mb"] for s in (sizes[0], sizes[-1]) if "step_mb" in pm.get(str(s), {})]
    ratio = figs[1] / figs[0] if len(figs) == 2 and figs[0] > 0 else float("nan")
    res: dict[str, Any] = {
        "training": training,
        "patchmorph_ratio": ratio,
        "patchmorph_flat": bool(ratio <= 1.2),
        "inference_size": INFER_SIZE,
        "inference": measure_inference(repeats=repeats, threads=threads),
        "threads": threads,
        "repeats": repeats,
        "memory_rule": "fresh process per configuration, MALLOC_MMAP_THRESHOLD_=65536, one warm-up step; "
                       "step_mb = peak RSS (5 ms sampling) during a step minus RSS before it",
        "seconds_total": time.time() - t0,
    }
    text = format_perf_patchmorph(res)
    print(text)
    out = getattr(args, "out", None)
    if out:
        atomic_write_text(out, json.dumps(res, indent=2))
        print(f"wrote {out}")
    return res


# ----------------------------------------------------------------------------- children
def _pair(size: int):
    import torch

    g = torch.Generator().manual_seed(size)
    shape = (size, size, size)
    # smooth-ish random images in [0, 1] (content does not matter for memory or time)
    fixed = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *shape, generator=g), 5, stride=1, padding=2)
    moving = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *shape, generator=g), 5, stride=1, padding=2)
    aff = torch.eye(4, dtype=torch.float64)
    aff[:3, 3] = -(size - 1) / 2
    return {"fixed": fixed, "moving": moving, "fixed_affine": aff[None].clone(), "moving_affine": aff[None].clone(),
            "case_id": ["a_b"], "fixed_id": ["a"], "moving_id": ["b"]}


def _child_train(method: str, size: int, steps: int) -> dict[str, Any]:
    import torch

    from benchmark.core.timing import current_rss_mb, timed_call

    batch = _pair(size)
    if method == "patchmorph":
        from systems.patchmorph import PatchMorph

        system: Any = PatchMorph()
    elif method == "voxelmorph":
        from systems.voxelmorph import VoxelMorph

        system = VoxelMorph()
    else:
        raise ValueError(f"unknown method {method!r}")
    opt = torch.optim.Adam(system.parameters(), lr=1e-4)

    def step() -> float:
        loss, _ = system.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    torch.manual_seed(0)
    step()  # warm-up: oneDNN primitives, Adam state
    rows = []
    for _ in range(steps):
        base = current_rss_mb()
        _, st = timed_call(step)
        rows.append((st.peak_mem_mb - base, st.peak_mem_mb, base, st.seconds))
    return {
        "method": method,
        "size": size,
        "step_mb": _median([r[0] for r in rows]),
        "peak_mb": _median([r[1] for r in rows]),
        "base_mb": _median([r[2] for r in rows]),
        "seconds": _median([r[3] for r in rows]),
    }


def _child_infer(size: int, passes: Sequence[int]) -> dict[str, Any]:
    from benchmark.core.timing import timed_call
    from systems.patchmorph import PatchMorph

    batch = _pair(size)
    small = _pair(32)
    rows = []
    for p in passes:
        system = PatchMorph(infer_passes=p).eval()
        system.register(small)  # warm-up (oneDNN primitives for this batch shape)
        _, st = timed_call(lambda s=system: s.register(batch))
        counts = list(system.last_patch_counts)
        rows.append({"passes": p, "patches": int(sum(counts)), "patches_per_scale": counts, "seconds": st.seconds,
                     "peak_mb": st.peak_mem_mb})
        del system
    return {"size": size, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.perf.patchmorph")
    p.add_argument("--child", choices=["train", "infer"], default=None)
    p.add_argument("--method", default="patchmorph")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--passes", default=",".join(str(x) for x in INFER_PASSES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.child is None:
        main_perf_patchmorph(a)
        return 0
    import torch

    torch.set_num_threads(a.threads)
    if a.child == "train":
        res = _child_train(a.method, a.size, a.steps)
    else:
        res = _child_infer(a.size, [int(x) for x in a.passes.split(",")])
    Path(a.out).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
