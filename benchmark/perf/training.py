"""Performance harness for the VoxelMorph training step, side by side with its peers.

One training step = forward + loss + backward + Adam step (batch 1, float32, CPU, ``threads``
torch threads) on a random image pair of each size. Tools:

* ``ours`` — :class:`systems.voxelmorph.VoxelMorph` with the peers' loss (``loss``, MSE by
  default) + ``lambda_ · diffusion(velocity)``, the optimiser of its
  ``configure_optimizers`` (Adam);
* ``ours_ncc`` — the same with the suite's default loss (local NCC 9³);
* ``vxm`` — the ``voxelmorph`` package of the peer venv (0.3.x: ``VxmPairwise`` with its
  defaults), through ``benchmark/perf/peers/vxm_step.py``;
* ``vxm02`` — voxelmorph 0.2 (``VxmDense``, the published network: the same as ours), from a
  second venv, through the same script;
* ``monai`` — MONAI's ``VoxelMorph`` (defaults), through ``benchmark/perf/peers/monai_step.py``.

Every measurement runs in a fresh process (ours: ``python -m benchmark.perf.training
--child ...``; peers: the venv's python), so the peak resident set size sampled during the
timed step (:func:`benchmark.core.timing.timed_call` for ours, the same 5 ms sampler written into
the peer scripts) is that step's and nothing earlier in the run. Each process does
``warmup`` untimed steps, then ``steps`` timed ones. Tools are interleaved within each repeat
(the order rotates between repeats) because the machine may be shared; the figures are
medians over repeats (and timed steps), of wall-clock seconds, process CPU seconds (all
threads) and peak RSS in MB (whole process, baseline included — the RSS before the step is
reported as ``base_mb``). Each process also counts the multiply-adds of one forward pass of
its network (``fwd_gmac``, torch's ``FlopCounterMode``): the networks differ (voxelmorph 0.3's
default is a lighter U-Net than the published VoxelMorph), and a time ratio reads differently
beside a work ratio. Each also counts the floating-point operations of one whole step
(``step_gflop``, backward included), and ours measures the machine's float32 matrix-multiply
rate after its timed steps (``gemm_gflops``, best of five 4096² products at its threads):
``floor_s = step_gflop / gemm_gflops`` is what our step's convolutions and products alone would
take at that rate, the bound on any implementation of the same network on this machine.

Every process gets ``OMP_NUM_THREADS = MKL_NUM_THREADS = threads`` and, by default,
``OMP_WAIT_POLICY=PASSIVE`` (see :func:`perf_vxm_training`): on a shared machine, OpenMP's
default spinning at barriers roughly doubles every tool's step. ``VxmPairwise`` (5 pooling
levels, no padding) needs every size divisible by 32: at 160×192×144 the pair is zero-padded
to 160×192×160 for it (as a user of that package must), and its configuration says so.

Peer pythons: ``peer_python`` or ``$REGBENCH_VXM_PEER_PYTHON`` or
``<project>/../peers_vxm_venv/bin/python`` (voxelmorph 0.3 + MONAI), and
``$REGBENCH_VXM02_PEER_PYTHON`` or ``<project>/../peers_vxm02_venv/bin/python``
(voxelmorph 0.2). A missing one is skipped with a message.
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
from typing import Any, Callable, Sequence

from benchmark.core.memory import GLIBC_KEEP_ENV
from benchmark.perf.child import PROJECT_ROOT, child_env, run_child

import numpy as np
import torch

__all__ = [
    "TOOLS",
    "find_vxm_peer_pythons",
    "perf_vxm_training",
    "format_perf_training",
    "main_perf_training",
]

PEER_SCRIPTS = Path(__file__).resolve().parent / "peers"
DEFAULT_VXM_VENV = PROJECT_ROOT.parent / "peers_vxm_venv"
DEFAULT_VXM02_VENV = PROJECT_ROOT.parent / "peers_vxm02_venv"
DEFAULT_SIZES: tuple[tuple[int, ...], ...] = ((96, 96, 96), (160, 192, 144))
#: All tools, in the order of the table.
TOOLS: tuple[str, ...] = ("ours", "ours_ncc", "vxm", "vxm02", "monai")
PEERS: tuple[str, ...] = ("vxm", "vxm02", "monai")
#: voxelmorph 0.3's ``VxmPairwise`` needs every axis divisible by this (5 poolings, no padding);
#: the harness zero-pads the pair at the axis ends for it, and its row says so.
VXM03_MULTIPLE = 32
#: Weight of the smoothness term in every tool (irrelevant to the timing; kept equal).
LAMBDA = 0.01


def find_vxm_peer_pythons(peer_python: str | None = None) -> dict[str, str | None]:
    """Python interpreters of the peer venvs: ``{"main": ..., "vxm02": ...}`` (``None`` = absent).

    ``main`` (voxelmorph 0.3 and MONAI): the argument, else ``$REGBENCH_VXM_PEER_PYTHON``,
    else ``<project>/../peers_vxm_venv/bin/python``. ``vxm02``: ``$REGBENCH_VXM02_PEER_PYTHON``,
    else ``<project>/../peers_vxm02_venv/bin/python``.
    """

    def first(*cands: str | None) -> str | None:
        for c in cands:
            if c and Path(c).exists():
                return str(c)
        return None

    return {
        "main": first(peer_python, os.environ.get("REGBENCH_VXM_PEER_PYTHON"), str(DEFAULT_VXM_VENV / "bin" / "python")),
        "vxm02": first(os.environ.get("REGBENCH_VXM02_PEER_PYTHON"), str(DEFAULT_VXM02_VENV / "bin" / "python")),
    }


def _size_key(size: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in size)


def _command(tool: str, size: Sequence[int], loss: str, threads: int, warmup: int, steps: int,
             out: str, pythons: dict[str, str | None]) -> list[str] | str:
    """The child command line, or a message saying why the tool cannot run."""
    common = ["--size", ",".join(str(int(s)) for s in size), "--threads", str(threads),
              "--warmup", str(warmup), "--steps", str(steps), "--out", out]
    if tool in ("ours", "ours_ncc"):
        kind = "ncc" if tool == "ours_ncc" else loss
        return [sys.executable, "-m", "benchmark.perf.training", "--child", "--loss", kind, *common]
    if tool == "vxm02":
        py = pythons.get("vxm02")
        if py is None:
            return f"no voxelmorph 0.2 venv (set $REGBENCH_VXM02_PEER_PYTHON or create {DEFAULT_VXM02_VENV})"
        return [py, str(PEER_SCRIPTS / "vxm_step.py"), "--loss", loss, "--lam", str(LAMBDA), *common]
    py = pythons.get("main")
    if py is None:
        return f"no peer venv (pass peer_python, set $REGBENCH_VXM_PEER_PYTHON or create {DEFAULT_VXM_VENV})"
    if tool == "vxm":  # VxmPairwise pools 5 times without padding: pad the pair to a multiple of 32
        return [py, str(PEER_SCRIPTS / "vxm_step.py"), "--loss", loss, "--lam", str(LAMBDA),
                "--pad-multiple", str(VXM03_MULTIPLE), *common]
    return [py, str(PEER_SCRIPTS / "monai_step.py"), "--loss", loss, "--lam", str(LAMBDA), *common]


def _run_child(cmd: list[str], threads: int, timeout_s: float, omp_wait_policy: str | None,
               keep_freed_memory: bool = False) -> dict[str, Any]:
    """Run one measurement process; its JSON record, or ``{"error": ...}``."""
    out = cmd[cmd.index("--out") + 1]
    extra = GLIBC_KEEP_ENV if keep_freed_memory else {}  # glibc keeps freed blocks for the next step
    run = run_child(cmd, out, timeout_s=timeout_s, env=child_env(threads, wait_policy=omp_wait_policy or None, **extra),
                    cwd=PROJECT_ROOT)
    if run.timed_out:
        return {"error": run.timeout_message}
    if run.record is None:
        return {"error": f"exit {run.returncode}: " + run.tail_lines(3)}
    rec = run.record
    rec["process_wall_s"] = run.wall_s
    return rec


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def perf_vxm_training(
    sizes: Sequence[Sequence[int]] = DEFAULT_SIZES,
    repeats: int = 3,
    threads: int = 2,
    peer_python: str | None = None,
    loss: str = "mse",
    tools: Sequence[str] = TOOLS,
    warmup: int = 1,
    steps: int = 1,
    timeout_s: float = 3600.0,
    omp_wait_policy: str | None = "PASSIVE",
    verbose: bool = True,
    keep_freed_memory: bool = False,
    on_update: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time the VoxelMorph training step of ours and the peers, interleaved, fresh process each.

    Args:
        sizes: spatial sizes ``(X, Y, Z)``.
        repeats: fresh processes per tool and size (the order of the tools rotates).
        threads: torch / OpenMP threads of every process.
        peer_python: python of the voxelmorph 0.3 + MONAI venv (see :func:`find_vxm_peer_pythons`).
        loss: the loss of the side-by-side (``"mse"``, as the reference peer figures, or
            ``"ncc"``); ``ours_ncc`` always uses local NCC.
        tools: subset of :data:`TOOLS`.
        warmup, steps: untimed and timed steps per process.
        timeout_s: per process.
        omp_wait_policy: ``OMP_WAIT_POLICY`` of every process (``None``: OpenMP's default,
            spinning). ``"PASSIVE"`` by default: on a machine shared with other jobs, threads
            spinning at OpenMP barriers burn the time slices their descheduled partner
            needs, which doubled every tool's step here (96³, 2 threads, load ~4 on 2 CPUs:
            ours 4.9 → 2.2 s, voxelmorph 0.3.4 4.1 → 2.45 s); on an idle machine it changes
            little. The same for all tools.
        keep_freed_memory: run every process with :data:`benchmark.core.memory.GLIBC_KEEP_ENV` (glibc keeps
            freed blocks for reuse instead of returning them to the kernel). By default
            glibc gives every large tensor fresh pages, and their page faults are a sizeable
            part of a CPU step (ours at 96³: ~210 000 faults, 0.55 s of system time per
            step). The same for all tools; the peak RSS grows with it.
        on_update: called after every measured (or failed) process with the report so far
            (``"complete": False``; the same form as the result), so that a caller can keep
            it on disk: a run that crashes or is killed an hour in loses nothing measured.

    Returns:
        ``{"settings", "device", "results": {size: {tool: {...}}}, "ratios": {size: {peer:
        {"time", "cpu", "peak_mb"}}}, "fastest_peer": {size: tool}}``. Per tool: ``status``
        (``"measured"``, ``"skipped"``, ``"failed"``), ``message``, ``name`` (package and
        version), ``config``, medians ``step_s``, ``cpu_s``, ``peak_mb``, ``base_mb``,
        ``loadavg_1min`` (the machine's load when the steps began), ``fwd_gmac``,
        ``step_gflop``, ours' ``gemm_gflops`` and ``floor_s`` (module docstring) and every run.
        Ratios are ours (loss ``loss``) over the peer: < 1 means ours is faster / smaller;
        ``"floor"`` is ours' ``floor_s`` over the peer's step. ``"complete"``: True.
    """
    from benchmark.core.timing import device_description

    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tools {unknown}; available: {', '.join(TOOLS)}")
    if loss not in ("mse", "ncc"):
        raise ValueError(f"loss must be 'mse' or 'ncc', got {loss!r}")
    pythons = find_vxm_peer_pythons(peer_python)
    tools = [t for t in TOOLS if t in tools]
    raw: dict[str, dict[str, dict[str, Any]]] = {}
    settings = {"sizes": [list(s) for s in sizes], "repeats": repeats, "threads": threads, "loss": loss,
                "omp_wait_policy": omp_wait_policy or "default", "keep_freed_memory": bool(keep_freed_memory),
                "warmup": warmup, "steps": steps, "lambda": LAMBDA, "batch": 1, "dtype": "float32"}
    head = {"benchmark": "voxelmorph training step", "settings": settings, "device": device_description("cpu"),
            "peer_pythons": pythons}

    def update() -> None:
        if on_update is not None:
            on_update({**head, **_summarise(raw, repeats, final=False)})

    with tempfile.TemporaryDirectory(prefix="regbench_perf_training_") as tmp:
        for size in sizes:
            key = _size_key(size)
            res = raw[key] = {t: {"status": "measured", "runs": []} for t in tools}
            for t in tools:
                cmd = _command(t, size, loss, threads, warmup, steps, "x", pythons)
                if isinstance(cmd, str):
                    res[t].update(status="skipped", message=cmd)
                    if verbose:
                        print(f"[{key}] {t}: skipped ({cmd})", flush=True)
            stopped: set[str] = set()  # a tool that failed once is not retried (an OOM costs minutes)
            for rep in range(repeats):
                live = [t for t in tools if res[t]["status"] == "measured" and t not in stopped]
                if not live:
                    break
                k = rep % len(live)
                for t in live[k:] + live[:k]:
                    out = str(Path(tmp) / f"{key}_{t}_{rep}.json")
                    cmd = _command(t, size, loss, threads, warmup, steps, out, pythons)
                    rec = _run_child(cmd, threads, timeout_s, omp_wait_policy, keep_freed_memory)  # type: ignore[arg-type]
                    if "error" in rec:
                        res[t]["message"] = f"repeat {rep}: {rec['error']}"
                        stopped.add(t)
                        if verbose:
                            print(f"[{key}] {t}: FAILED {rec['error']}", flush=True)
                        update()
                        continue
                    res[t]["runs"].append(rec)
                    if verbose:
                        print(f"[{key}] rep {rep} {t:9s} step {', '.join(f'{s:.2f}' for s in rec['step_s'])} s  "
                              f"cpu {', '.join(f'{s:.2f}' for s in rec['cpu_s'])} s  "
                              f"peak {', '.join(f'{m:.0f}' for m in rec['peak_mb'])} MB", flush=True)
                    update()
    return {**head, **_summarise(raw, repeats, final=True)}


def _summarise(raw: dict[str, dict[str, dict[str, Any]]], repeats: int, final: bool) -> dict[str, Any]:
    """Medians per tool and size, ratios of ours to every measured peer, the fastest peer.

    ``raw``: ``{size: {tool: {"status", "runs", ["message"]}}}`` as measured so far (not
    modified). Before the end (``final=False``) a tool without runs yet is left "measured"
    with no figures, and no "only n of m repeats" message is added.
    """
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for key, res in raw.items():
        results[key] = {}
        for t, src in res.items():
            r = dict(src)
            runs = r["runs"] = list(src["runs"])
            if runs:
                r["name"] = runs[0].get("tool", t)
                r["config"] = runs[0].get("settings", "")
            for f in ("step_s", "cpu_s", "peak_mb", "base_mb", "loadavg_1min", "fwd_gmac", "step_gflop", "gemm_gflops"):
                # per step lists, or one value per process (fwd_gmac, step_gflop, gemm_gflops)
                r[f] = _median([v for run in runs for v in (run[f] if isinstance(run.get(f), list)
                                                            else [run[f]] if f in run else [])])
            if np.isfinite(r["step_gflop"]) and np.isfinite(r["gemm_gflops"]):
                # what the step's convolutions and products alone take at the matrix-multiply rate
                r["floor_s"] = r["step_gflop"] / r["gemm_gflops"]
            if final and r["status"] == "measured" and not runs:
                r["status"] = "failed"
            elif final and runs and len(runs) < repeats:
                r["message"] = f"only {len(runs)} of {repeats} repeats measured; " + r.get("message", "")
            results[key][t] = r
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    fastest: dict[str, str | None] = {}
    for key, res in results.items():
        ratios[key] = {}
        ours = res.get("ours")
        measured_peers = [p for p in PEERS if p in res and res[p]["status"] == "measured" and res[p]["runs"]]
        fastest[key] = min(measured_peers, key=lambda p: res[p]["step_s"]) if measured_peers else None
        if ours is None or ours["status"] != "measured" or not ours["runs"]:
            continue
        for p in measured_peers:
            ratios[key][p] = {
                "time": ours["step_s"] / res[p]["step_s"],
                "cpu": ours["cpu_s"] / res[p]["cpu_s"],
                "peak_mb": ours["peak_mb"] / res[p]["peak_mb"],
            }
            if "floor_s" in ours:
                ratios[key][p]["floor"] = ours["floor_s"] / res[p]["step_s"]
    return {"results": results, "ratios": ratios, "fastest_peer": fastest, "complete": final}


def _fmt(v: Any, spec: str) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if not np.isfinite(f) else format(f, spec)


def format_perf_training(res: dict[str, Any]) -> str:
    """A plain-text table of :func:`perf_vxm_training`'s result."""
    s = res["settings"]
    lines = [f"VoxelMorph training step (forward + loss + backward + Adam), batch 1, {s['threads']} threads, "
             f"OMP_WAIT_POLICY {s.get('omp_wait_policy', 'default')}, peers' loss {s['loss']}, "
             f"medians of {s['repeats']} fresh processes x {s['steps']} step(s)"
             + (", glibc keeping freed memory (every tool)" if s.get("keep_freed_memory") else "")]
    for key, tools in res["results"].items():
        fastest = res["fastest_peer"].get(key)
        lines.append(f"\n{key}  (fastest peer: {fastest or '-'})")
        lines.append(f"  {'tool':9s} {'package':18s} {'loss':4s} {'step s':>8s} {'cpu s':>8s} {'peak MB':>8s} {'base MB':>8s}"
                     f" {'t/peer':>7s} {'mem/peer':>8s} {'GMAC':>6s} {'load':>5s}  configuration")
        ratio = res["ratios"].get(key, {})
        for t, r in tools.items():
            kind = "ncc" if t == "ours_ncc" else s["loss"]
            if r["status"] != "measured":
                lines.append(f"  {t:9s} {'':18s} {kind:4s} {r['status'].upper()}: {r.get('message', '')[:160]}")
                continue
            rr = ratio.get(t, {})
            lines.append(
                f"  {t:9s} {str(r.get('name', ''))[:18]:18s} {kind:4s} {_fmt(r['step_s'], '8.2f'):>8s} {_fmt(r['cpu_s'], '8.2f'):>8s}"
                f" {_fmt(r['peak_mb'], '8.0f'):>8s} {_fmt(r['base_mb'], '8.0f'):>8s}"
                f" {_fmt(rr.get('time'), '7.2f'):>7s} {_fmt(rr.get('peak_mb'), '8.2f'):>8s}"
                f" {_fmt(r.get('fwd_gmac'), '6.1f'):>6s}"
                f" {_fmt(r.get('loadavg_1min'), '5.1f'):>5s}  {r.get('config', '')[:70]}"
            )
        ours = tools.get("ours", {})
        if "floor_s" in ours and fastest and "floor" in ratio.get(fastest, {}):
            lines.append(f"  ours' convolutions and products: {ours['step_gflop']:.4g} GFLOP per step; at this machine's"
                         f" float32 matrix-multiply rate ({ours['gemm_gflops']:.0f} GFLOP/s, same process) they alone"
                         f" take {ours['floor_s']:.2f} s = {ratio[fastest]['floor']:.2f}x {fastest}'s step")
        lines.append("  (t/peer, mem/peer: ours at this loss over that peer, < 1 = ours faster / smaller;"
                     " GMAC: multiply-adds of one forward pass, 10⁹, torch's FlopCounterMode;"
                     " load: 1-min load average when the steps began, the machine has "
                     f"{res['device'].get('cpu_count', '?')} CPUs)")
    return "\n".join(lines)


def main_perf_training(
    out: str | None = None,
    sizes: Sequence[Sequence[int]] = DEFAULT_SIZES,
    repeats: int = 3,
    threads: int = 2,
    peer_python: str | None = None,
    loss: str = "mse",
    tools: Sequence[str] = TOOLS,
    warmup: int = 1,
    steps: int = 1,
    omp_wait_policy: str | None = "PASSIVE",
    keep_freed_memory: bool = False,
) -> dict[str, Any]:
    """Run :func:`perf_vxm_training`, print the table, keep the JSON at ``out`` if given (rewritten
    after every measured process, complete at the end)."""
    from benchmark.core.io import atomic_write_json

    # the JSON is rewritten (atomically) after every measured process: nothing is lost to a crash
    res = perf_vxm_training(sizes=sizes, repeats=repeats, threads=threads, peer_python=peer_python, loss=loss,
                            tools=tools, warmup=warmup, steps=steps, omp_wait_policy=omp_wait_policy,
                            keep_freed_memory=keep_freed_memory,
                            on_update=(lambda partial: atomic_write_json(out, partial)) if out else None)
    print(format_perf_training(res))
    if out:
        atomic_write_json(out, res)
        print(f"wrote {out}")
    sys.stdout.flush()
    return res


# --------------------------------------------------------------------------- child process


def _child(size: Sequence[int], loss: str, threads: int, warmup: int, steps: int, out: str, seed: int = 0) -> None:
    """Measure our training step in this (fresh) process and write the JSON record."""
    from benchmark.core.timing import current_rss_mb, timed_call
    from systems.voxelmorph import VoxelMorph

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = VoxelMorph(lambda_=LAMBDA, similarity=loss)
    model.train()
    opt = model.configure_optimizers()
    g = np.random.default_rng(seed)
    batch = {
        "moving": torch.from_numpy(g.random((1, 1, *size), dtype=np.float32)),
        "fixed": torch.from_numpy(g.random((1, 1, *size), dtype=np.float32)),
    }

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss_value, _ = model.training_loss(batch)
        loss_value.backward()
        opt.step()
        return float(loss_value.detach())

    rec: dict[str, Any] = {
        "tool": "regbench",
        "settings": "VoxelMorph (enc 16-32-32-32, dec 32-32-32-32-32-16-16, int_steps 7, int_downsize 2)",
        "size": list(size), "loss_kind": loss, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "step_s": [], "cpu_s": [], "peak_mb": [], "base_mb": [], "loss": [],
    }
    for _ in range(warmup):
        step()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch["moving"], batch["fixed"])
    rec["fwd_gmac"] = counter.get_total_flops() / 2e9  # multiply-adds of the forward pass, 10⁹
    with FlopCounterMode(display=False) as counter:
        step()
    rec["step_gflop"] = counter.get_total_flops() / 1e9  # the whole step, backward included
    for _ in range(steps):
        rec.setdefault("loadavg_1min", []).append(os.getloadavg()[0])
        base = current_rss_mb()
        c0 = time.process_time()
        val, st = timed_call(step)
        rec["cpu_s"].append(time.process_time() - c0)
        rec["step_s"].append(st.seconds)
        rec["peak_mb"].append(st.peak_mem_mb)
        rec["base_mb"].append(base)
        rec["loss"].append(val)
    rec["gemm_gflops"] = gemm_gflops()  # after the timed steps: it must not move their baseline
    with open(out, "w") as fh:
        json.dump(rec, fh)


def gemm_gflops(n: int = 4096, repeats: int = 5) -> float:
    """This process's float32 matrix-multiply rate (GFLOP/s, best of ``repeats`` ``n×n``
    products at the current torch threads): the machine's practical peak for the convolutions,
    which oneDNN runs as blocked matrix products. Takes ~3·n²·4 bytes and a few seconds."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm the kernel and the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def _parse_size(text: str) -> tuple[int, ...]:
    """``"96,96,96"`` or ``"96x96x96"`` → ``(96, 96, 96)``."""
    return tuple(int(v) for v in text.replace("x", ",").split(",") if v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.perf.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="96x96x96,160x192x144", help="comma-separated sizes, e.g. 96x96x96,160x192x144")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loss", default="mse", choices=("mse", "ncc"))
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {', '.join(TOOLS)}")
    p.add_argument("--peer-python", default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE", "default"),
                   help="OMP_WAIT_POLICY of every measured process ('default': leave OpenMP's default)")
    p.add_argument("--out", default=None, help="JSON output path (the child's record path with --child)")
    a = p.parse_args(argv)
    if a.child:
        if not a.size or not a.out:
            p.error("--child needs --size and --out")
        _child(_parse_size(a.size), a.loss, a.threads, a.warmup, a.steps, a.out)
        return 0
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",") if s.strip()]
    main_perf_training(out=a.out, sizes=sizes, repeats=a.repeats, threads=a.threads, peer_python=a.peer_python,
                       loss=a.loss, tools=[t.strip() for t in a.tools.split(",") if t.strip()],
                       warmup=a.warmup, steps=a.steps,
                       omp_wait_policy=None if a.omp_wait_policy == "default" else a.omp_wait_policy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
