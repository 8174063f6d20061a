"""``regbench perf gpu``: what the learned systems cost on a GPU node.

One command that, on a CUDA machine, measures for every learned system at LUMIR's size
(160×224×192; cdreg at its own detector size):

* the **training step** (forward, backward, Adam step) in float32, under ``bf16`` autocast,
  under ``fp16`` autocast with a gradient scaler (Lightning's ``16-mixed``), and compiled
  (``torch.compile`` of the network, float32; the first step, which compiles, is reported
  apart): median seconds over ``repeats`` steps after warm-up, steps/s, peak CUDA memory;
* the **registration call** (``register`` under ``no_grad``) in float32 and bf16: median
  seconds and peak memory;
* the **DataLoader**: samples/s of a warm-cache :class:`~datamodules.nifti_pairs.NiftiPairsDataModule`
  at the same size (0 and 4 workers, pinned memory) against VoxelMorph's training step
  rate: does the loader keep up?
* **DDP scaling**: VoxelMorph training steps/s at 1 and at N processes (N = visible GPUs;
  one fresh interpreter per rank, NCCL), throughput and efficiency
  ``throughput_N / (N · throughput_1)``.

Every figure is device-synchronised. A system or mode that fails (out of memory, a compile
error) is recorded with its one-line error and the run goes on. Writes JSON (``--out``) and
prints a table.

On a machine without CUDA it says so and exits 0 without measuring. ``--device cpu`` runs
the same code path on the CPU (gloo for DDP, 2 processes) — for checking the harness at a
small ``--size``, not for CPU figures (those are ``perf systems`` / ``perf training``).
"""

from __future__ import annotations

import json
import math
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["perf_gpu", "main_perf_gpu", "format_perf_gpu", "LUMIR_SHAPE", "SYSTEMS"]

LUMIR_SHAPE = (160, 224, 192)
#: name -> (module, class, init args) of the deformable learned systems, at their defaults.
SYSTEMS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "voxelmorph": ("systems.voxelmorph", "VoxelMorph", {}),
    "msff": ("systems.msff", "MSFF", {}),
    "diffop": ("systems.diffop", "DiffOpNet", {}),
    "patchmorph": ("systems.patchmorph", "PatchMorph", {}),
}
MODES = ("fp32", "bf16", "fp16", "compiled")


# ------------------------------------------------------------------------------ helpers
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _pair_batch(shape: Sequence[int], dev: torch.device, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
    """Two smooth random volumes ``(B, 1, *shape)`` in [0, 1] with identity affines (1 mm)."""
    from benchmark.core.spatial import gaussian_smooth

    g = torch.Generator().manual_seed(seed)
    imgs = []
    for _ in range(2):
        x = torch.rand(batch_size, 1, *shape, generator=g)
        x = gaussian_smooth(x, 2.0)
        imgs.append((x - x.amin()) / (x.amax() - x.amin()))
    aff = torch.eye(4, dtype=torch.float64).expand(batch_size, 4, 4).clone()
    return {"fixed": imgs[0].to(dev), "moving": imgs[1].to(dev), "fixed_affine": aff.to(dev), "moving_affine": aff.to(dev)}


def _pose_batch(dev: torch.device, size: int | None) -> tuple[dict[str, Any], str]:
    """A cdreg training batch from the synthetic spine data module at its default geometry
    (or a ``size``² detector), moved to ``dev``; and a description of the size."""
    from datamodules.spine import SpineDRRDataModule, collate_pose

    kw: dict[str, Any] = {"n_train_cts": 1, "n_test_cts": 1, "poses_per_ct": 1, "domain_randomization": False}
    if size is not None:
        kw.update(height=size, width=size, synthetic_size=max(16, size), n_samples=16)
    dm = SpineDRRDataModule(**kw)
    ds = dm.dataset("train")
    batch = collate_pose([ds[0]])
    out = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return out, f"detector {tuple(batch['xray'].shape[-2:])}, CT {tuple(batch['volume'].shape[-3:])}"


def _autocast(dev: torch.device, mode: str):
    if mode == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    if mode == "fp16":
        return torch.autocast(dev.type, dtype=torch.float16)
    return torch.autocast(dev.type, enabled=False)


def _build(name: str, dev: torch.device, compile_: bool) -> torch.nn.Module:
    from benchmark.core.classpath import import_object

    if name == "cdreg":
        from systems.cdreg import CDReg

        model = CDReg(compile=compile_)
    else:
        mod, cls, kw = SYSTEMS[name]
        model = import_object(f"{mod}.{cls}")(**kw, compile=compile_)
    model = model.to(dev)
    model.configure_model()  # compiles when asked, as Lightning does before fit
    return model


def _train_steps(model: Any, batch: dict[str, Any], dev: torch.device, mode: str, warmup: int, repeats: int
                 ) -> dict[str, Any]:
    """Median training-step seconds (forward + backward + Adam step) and peak memory."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type) if mode == "fp16" else None

    def step() -> float:
        _sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with _autocast(dev, "bf16" if mode == "bf16" else ("fp16" if mode == "fp16" else "fp32")):
            loss, _ = model.training_loss(batch)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        _sync(dev)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"non-finite training loss under {mode}")
        return time.perf_counter() - t0

    _reset_peak(dev)
    first = step()
    for _ in range(max(0, warmup - 1)):
        step()
    times = [step() for _ in range(repeats)]
    med = statistics.median(times)
    return {"step_s": med, "steps_per_s": 1.0 / med, "first_step_s": first, "peak_mem_mb": _peak_mb(dev),
            "samples_s": times}


def _register_time(model: Any, batch: dict[str, Any], dev: torch.device, mode: str, repeats: int) -> dict[str, Any]:
    model.eval()

    def call() -> float:
        _sync(dev)
        t0 = time.perf_counter()
        with _autocast(dev, mode):
            if getattr(model, "learns", True) and "xray" not in batch:
                with torch.no_grad():
                    out = model.register(batch)
            else:  # cdreg follows a pose gradient: autograd on
                out = model._register_grad_ok(batch)
        _sync(dev)
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"non-finite registration output under {mode}")
        return time.perf_counter() - t0

    _reset_peak(dev)
    call()  # warm-up (the suite's timing rule: one untimed call for learned methods)
    times = [call() for _ in range(repeats)]
    return {"register_s": statistics.median(times), "peak_mem_mb": _peak_mb(dev), "samples_s": times}


def _free(dev: torch.device) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ parts
def measure_systems(names: Sequence[str], shape: Sequence[int], dev: torch.device, warmup: int, repeats: int,
                    pose_size: int | None = None, log: Callable[[str], None] = print,
                    modes: Sequence[str] = MODES,
                    on_system: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Training step per mode (of :data:`MODES`) and registration time (fp32, bf16) per system;
    ``on_system(name, record)`` after each system (measured or failed)."""
    out: dict[str, Any] = {}
    for name in names:
        rec: dict[str, Any] = {"train": {}, "register": {}}
        try:
            if name == "cdreg":
                batch, rec["size"] = _pose_batch(dev, pose_size)
            else:
                batch, rec["size"] = _pair_batch(shape, dev), "x".join(map(str, shape))
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            out[name] = {"error": _one_line(exc)}
            if on_system is not None:
                on_system(name, out[name])
            continue
        for mode in modes:
            log(f"[perf gpu] {name}: training step, {mode}")
            model = None
            try:
                torch.manual_seed(0)
                model = _build(name, dev, compile_=(mode == "compiled"))
                rec["train"][mode] = _train_steps(model, batch, dev, mode, warmup, repeats)
                if mode in ("fp32", "bf16"):
                    log(f"[perf gpu] {name}: registration, {mode}")
                    rec["register"][mode] = _register_time(model, batch, dev, mode, repeats)
            except Exception as exc:  # noqa: BLE001 - out of memory, compile errors: recorded
                rec["train"].setdefault(mode, {"error": _one_line(exc)})
                if mode in ("fp32", "bf16") and mode not in rec["register"]:
                    rec["register"][mode] = {"error": _one_line(exc)}
            finally:
                del model
                _free(dev)
        fp32 = rec["train"].get("fp32", {}).get("step_s")
        for mode, r in rec["train"].items():
            if fp32 and r.get("step_s"):
                r["speedup_vs_fp32"] = fp32 / r["step_s"]
        out[name] = rec
        if on_system is not None:
            on_system(name, rec)
        del batch
        _free(dev)
    return out


def measure_loader(shape: Sequence[int], dev: torch.device, workers: Sequence[int] = (0, 4), samples: int = 24,
                   workdir: str | None = None) -> dict[str, Any]:
    """Samples/s of a warm-cache NiftiPairsDataModule loader at ``shape`` (host → device copy included)."""
    import shutil

    from torch.utils.data import ConcatDataset, DataLoader

    from benchmark.perf.data import write_pair
    from datamodules.nifti_pairs import NiftiPairsDataModule

    tmp = Path(tempfile.mkdtemp(prefix="regbench_perf_gpu_", dir=workdir))
    res: dict[str, Any] = {"shape": list(shape), "samples": samples}
    try:
        data = tmp / "pair"
        data.mkdir()
        write_pair(data, tuple(shape))
        dm = NiftiPairsDataModule(str(data), cache_dir=str(tmp / "cache"), num_workers=0, pin_memory=dev.type == "cuda",
                                  label_ids=list(range(1, 37)), val_pairs=1)
        dm.setup("test")
        ds = dm.pair_dataset("test")
        next(iter(dm.test_dataloader()))  # fills the cache: what follows reads it warm
        for nw in workers:
            kw = dm.loader_kwargs()
            kw.update(num_workers=nw, persistent_workers=False, pin_memory=dev.type == "cuda")
            if nw == 0:
                kw.pop("prefetch_factor", None)
            else:
                kw["prefetch_factor"] = 2
            loader = DataLoader(ConcatDataset([ds] * samples), shuffle=False, **kw)
            it = iter(loader)
            first = next(it)  # worker start-up, apart
            del first
            t0 = time.perf_counter()
            n = 0
            for batch in it:
                for k in ("fixed", "moving"):
                    batch[k].to(dev, non_blocking=True)
                n += batch["fixed"].shape[0]
            _sync(dev)
            dt = time.perf_counter() - t0
            res[f"workers_{nw}"] = {"samples_per_s": n / dt if dt > 0 else None, "samples": n, "seconds": dt}
    except Exception as exc:  # noqa: BLE001
        res["error"] = _one_line(exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, shape: list[int], warmup: int, repeats: int, device: str,
                out_dir: str) -> None:
    """One DDP rank (a fresh interpreter): VoxelMorph training steps, its timings to JSON."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from systems.voxelmorph import VoxelMorph

    cuda = device == "cuda"
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(dev)
        else:
            torch.set_num_threads(1)
        torch.manual_seed(0)
        model = VoxelMorph().to(dev)
        model.net = DDP(model.net, device_ids=[rank] if cuda else None)
        batch = _pair_batch(shape, dev, seed=rank)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step() -> float:
            _sync(dev)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss, _ = model.training_loss(batch)
            loss.backward()  # DDP all-reduces the gradients here
            opt.step()
            _sync(dev)
            return time.perf_counter() - t0

        for _ in range(warmup):
            step()
        dist.barrier()
        t0 = time.perf_counter()
        times = [step() for _ in range(repeats)]
        dist.barrier()
        total = time.perf_counter() - t0
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "step_s": times, "total_s": total}))
    finally:
        dist.destroy_process_group()


def measure_ddp(shape: Sequence[int], device: str, procs: Sequence[int], warmup: int, repeats: int,
                timeout_s: float = 900.0) -> dict[str, Any]:
    """VoxelMorph training steps/s at each process count in ``procs`` (fresh interpreters,
    spawn). A run that does not finish within ``timeout_s`` is stopped and recorded as an error."""
    import torch.multiprocessing as mp

    res: dict[str, Any] = {"system": "voxelmorph", "shape": list(shape), "runs": {}}
    for n in procs:
        with tempfile.TemporaryDirectory(prefix="regbench_ddp_") as tmp:
            try:
                ctx = mp.start_processes(_ddp_worker, args=(n, _free_port(), list(shape), warmup, repeats, device, tmp),
                                         nprocs=n, join=False, start_method="spawn")
                deadline = time.monotonic() + timeout_s
                while not ctx.join(timeout=5.0):
                    if time.monotonic() > deadline:
                        for proc in ctx.processes:
                            if proc.is_alive():
                                proc.terminate()
                        raise TimeoutError(f"{n} DDP processes did not finish within {timeout_s:.0f} s")
                ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(n)]
            except Exception as exc:  # noqa: BLE001
                res["runs"][str(n)] = {"error": _one_line(exc)}
                continue
        per_step = statistics.median([max(r["step_s"][i] for r in ranks) for i in range(repeats)])
        res["runs"][str(n)] = {"processes": n, "step_s": per_step, "steps_per_s": 1.0 / per_step,
                               "samples_per_s": n / per_step}
    one = res["runs"].get("1", {}).get("samples_per_s")
    for n, r in res["runs"].items():
        if one and r.get("samples_per_s"):
            r["efficiency"] = r["samples_per_s"] / (int(n) * one)
    return res


# ------------------------------------------------------------------------------ driver
def perf_gpu(
    shape: Sequence[int] = LUMIR_SHAPE,
    device: str = "cuda",
    systems: Sequence[str] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    ddp_procs: Sequence[int] | None = None,
    pose_size: int | None = None,
    loader: bool = True,
    log: Callable[[str], None] = print,
    modes: Sequence[str] = MODES,
    on_update: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the GPU measurements (module docstring). ``device="cuda"`` without CUDA returns a
    record with ``cuda_available: False`` and nothing measured. ``on_update(report)`` after
    every system, the loader and DDP, with what is measured so far (``"complete": False``):
    GPU time is scarce, and a crash or a kill late in the run loses nothing measured."""
    from benchmark.core.timing import device_description

    shape = [int(s) for s in shape]
    res: dict[str, Any] = {
        "benchmark": "gpu",
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": device,
        "shape": shape,
        "warmup": warmup,
        "repeats": repeats,
    }
    if device == "cuda" and not torch.cuda.is_available():
        res["status"] = "skipped"
        res["message"] = (f"CUDA is absent (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                          "nothing measured")
        res["complete"] = True
        return res

    def save() -> None:
        if on_update is not None:
            on_update({**res, "status": "partial", "complete": False})

    def got_system(name: str, rec: dict[str, Any]) -> None:
        res["systems"][name] = rec
        save()

    dev = torch.device(device)
    res["device_info"] = device_description(dev)
    names = list(systems) if systems else [*SYSTEMS, "cdreg"]
    unknown = [n for n in names if n not in SYSTEMS and n != "cdreg"]
    if unknown:
        raise ValueError(f"perf gpu --only: unknown system(s) {', '.join(unknown)} (known: {', '.join([*SYSTEMS, 'cdreg'])})")
    t0 = time.perf_counter()
    res["systems"] = {}
    res["systems"] = measure_systems(names, shape, dev, warmup, repeats, pose_size=pose_size, log=log, modes=modes,
                                     on_system=got_system)
    if loader:
        log("[perf gpu] data loader")
        res["loader"] = measure_loader(shape, dev)
        vxm = res["systems"].get("voxelmorph", {}).get("train", {})
        rates = {m: r.get("steps_per_s") for m, r in vxm.items() if r.get("steps_per_s")}
        best_loader = max((v.get("samples_per_s") or 0.0) for k, v in res["loader"].items() if k.startswith("workers_")) \
            if any(k.startswith("workers_") for k in res["loader"]) else None
        res["loader"]["voxelmorph_steps_per_s"] = rates
        if best_loader and rates:
            res["loader"]["keeps_up"] = {m: best_loader >= r for m, r in rates.items()}
        save()
    if ddp_procs is None:
        n = torch.cuda.device_count() if dev.type == "cuda" else 2
        ddp_procs = sorted({1, n}) if n > 1 else [1]
    log(f"[perf gpu] DDP scaling over {list(ddp_procs)} processes")
    res["ddp"] = measure_ddp(shape, dev.type, ddp_procs, warmup, repeats)
    res["status"] = "measured"
    res["seconds"] = time.perf_counter() - t0
    res["complete"] = True
    return res


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_perf_gpu(res: dict[str, Any]) -> str:
    """Plain-text table of :func:`perf_gpu`'s result."""
    if res.get("status") == "skipped":
        return f"regbench perf gpu: {res['message']}"
    info = res.get("device_info", {})
    lines = [f"perf gpu  device {info.get('device_name', res['device'])}  torch {res['torch_version']}  "
             f"size {'x'.join(map(str, res['shape']))}  median of {res['repeats']} after {res['warmup']} warm-up"]
    lines.append(f"{'system':11s} {'mode':9s} {'step s':>8s} {'steps/s':>8s} {'x fp32':>7s} {'1st s':>7s} {'peak MB':>9s}"
                 f" {'register s':>10s} {'reg MB':>8s}")
    for name, rec in res.get("systems", {}).items():
        if "error" in rec:
            lines.append(f"{name:11s} error: {rec['error']}")
            continue
        for mode in MODES:
            t = rec["train"].get(mode, {})
            r = rec["register"].get(mode, {})
            if "error" in t:
                lines.append(f"{name:11s} {mode:9s} error: {t['error']}")
                continue
            lines.append(f"{name:11s} {mode:9s} {_f(t.get('step_s'), '8.3f')} {_f(t.get('steps_per_s'), '8.2f')} "
                         f"{_f(t.get('speedup_vs_fp32'), '7.2f')} {_f(t.get('first_step_s'), '7.1f')} "
                         f"{_f(t.get('peak_mem_mb'), '9.0f')} {_f(r.get('register_s'), '10.3f')} {_f(r.get('peak_mem_mb'), '8.0f')}")
    ld = res.get("loader")
    if ld:
        parts = [f"{k.split('_')[1]} workers {_f(v.get('samples_per_s'), '.1f')}/s" for k, v in ld.items()
                 if k.startswith("workers_")]
        lines.append("loader (warm cache): " + ", ".join(parts) + (f"  error: {ld['error']}" if "error" in ld else ""))
        if ld.get("voxelmorph_steps_per_s"):
            lines.append("  VoxelMorph steps/s " + ", ".join(f"{m} {v:.2f}" for m, v in ld["voxelmorph_steps_per_s"].items())
                         + "; keeps up: " + ", ".join(f"{m} {'yes' if ok else 'NO'}" for m, ok in ld.get("keeps_up", {}).items()))
    dd = res.get("ddp")
    if dd:
        for n, r in dd["runs"].items():
            if "error" in r:
                lines.append(f"DDP {n} proc: error: {r['error']}")
            else:
                lines.append(f"DDP {n} proc: {r['steps_per_s']:.2f} steps/s per rank, {r['samples_per_s']:.2f} samples/s, "
                             f"efficiency {_f(r.get('efficiency'), '.2f')}")
    return "\n".join(lines)


def main_perf_gpu(args: Any) -> dict[str, Any]:
    """``regbench perf gpu``: run, print, write ``--out``; exit status 0 also without CUDA."""
    size = LUMIR_SHAPE
    if getattr(args, "size", None):
        size = tuple(int(s) for s in str(args.size).split(","))
        if len(size) != 3 or min(size) < 8:
            raise ValueError(f"--size must be three integers >= 8 (X,Y,Z), got {args.size!r}")
    device = getattr(args, "device", None) or "cuda"
    only = [s.strip() for s in args.only.split(",")] if getattr(args, "only", None) else None
    repeats = int(getattr(args, "repeats", 5) or 5)
    small = max(size) <= 64
    from benchmark.core.io import atomic_write_json

    out = getattr(args, "out", None)
    # the JSON is rewritten (atomically) after every part: nothing measured is lost to a crash
    res = perf_gpu(shape=size, device=device, systems=only, repeats=repeats, warmup=2,
                   pose_size=32 if (device == "cpu" and small) else None, loader=True,
                   on_update=(lambda partial: atomic_write_json(out, partial)) if out else None)
    print(format_perf_gpu(res))
    if out:
        atomic_write_json(out, res)
        print(f"wrote {out}")
    return res


if __name__ == "__main__":  # pragma: no cover - debugging entry
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--size")
    p.add_argument("--device")
    p.add_argument("--only")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    try:
        main_perf_gpu(p.parse_args())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(1)
