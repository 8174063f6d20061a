"""``regbench perf <target>``: one subcommand per target of the harness, each with its own
options and ``--help`` (``regbench perf systems --help``).

Declaring the options imports no target module (they import torch): ``regbench perf --help``
and ``regbench perf <target> --help`` stay cheap; the target's module is imported when it
runs. The defaults here are the targets' own (each module's docstring states them; a test
checks that the two agree).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any, Callable

__all__ = ["TARGETS", "add_cli_commands", "parse_size", "parse_sizes"]


def parse_size(text: str) -> str:
    """``"160,224,192"`` or ``"160x224x192"`` → ``"160,224,192"`` (three integers >= 1)."""
    parts = [v.strip() for v in str(text).replace("x", ",").split(",") if v.strip()]
    if len(parts) != 3 or not all(v.isdigit() and int(v) >= 1 for v in parts):
        raise argparse.ArgumentTypeError(f"expected three integers X,Y,Z, got {text!r}")
    return ",".join(parts)


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"64,128,192"`` → ``(64, 128, 192)`` (cube sides)."""
    try:
        sides = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        sides = ()
    if not sides or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return sides


def _shapes(text: str) -> list[tuple[int, ...]]:
    """``"96x96x96,160x192x144"`` → ``[(96, 96, 96), (160, 192, 144)]``."""
    shapes = []
    for item in (s.strip() for s in str(text).split(",")):
        parts = item.split("x")
        if item and (len(parts) != 3 or not all(v.isdigit() and int(v) >= 1 for v in parts)):
            raise argparse.ArgumentTypeError(f"expected sizes like 96x96x96,160x192x144, got {text!r}")
        if item:
            shapes.append(tuple(int(v) for v in parts))
    if not shapes:
        raise argparse.ArgumentTypeError(f"expected sizes like 96x96x96,160x192x144, got {text!r}")
    return shapes


def _out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")


def _threads(p: argparse.ArgumentParser, default: int | None) -> None:
    p.add_argument("--threads", type=int, default=default,
                   help="torch threads (default: torch's own)" if default is None else f"torch threads (default: {default})")


def _repeats(p: argparse.ArgumentParser, default: int, what: str = "repeats; medians are reported") -> None:
    p.add_argument("--repeats", type=int, default=default, help=f"{what} (default: {default})")


def _peer(p: argparse.ArgumentParser, what: str, env: str, venv: str) -> None:
    p.add_argument("--peer-python", default=None, help=f"python of a venv with {what} (default: ${env}, else "
                   f"../{venv}/bin/python beside the project; an absent peer is skipped with a message)")


def _lazy(module: str, function: str) -> Callable[[Any], Any]:
    """``module.function(args)``, the module imported when the target runs (it imports torch)."""

    def run(args: Any) -> Any:
        return getattr(importlib.import_module(module), function)(args)
    return run


# ----------------------------------------------------------------------------- targets
def _metrics(p: argparse.ArgumentParser) -> Callable[[Any], Any]:
    _out(p)
    _repeats(p, 5)
    _threads(p, None)

    def run(args: Any) -> Any:
        from benchmark.perf.metrics import main_perf_metrics

        return main_perf_metrics(out=args.out, repeats=args.repeats, threads=args.threads)
    return run


def _systems(p: argparse.ArgumentParser) -> Callable[[Any], Any]:
    _out(p)
    p.add_argument("--only", default="syn", help="comma-separated subset of: syn (SyN vs FireANTs/ANTs on the real pair), "
                   "msff (MSFF vs VoxelMorph training step and inference; minutes at 160x224x192) (default: syn)")
    p.add_argument("--pair-dir", default=None, help="real brain pair folder, image_A/B(.nii.gz, _seg) (syn; default "
                   "../shared/data/oasis_pair beside the project)")
    _peer(p, "fireants (syn)", "REGBENCH_PEER_PYTHON", "peers_venv")
    _threads(p, 2)
    _repeats(p, 3, "timed steps per system (msff)")
    p.add_argument("--size", type=parse_size, default="160,224,192", help="volume size X,Y,Z (msff; default: 160,224,192)")
    p.add_argument("--device", default="cpu", help="torch device (msff; default: cpu)")
    return _lazy("benchmark.perf.systems", "main_perf_systems")


def _training(p: argparse.ArgumentParser) -> Callable[[Any], Any]:
    _out(p)
    _repeats(p, 3)
    _threads(p, 2)
    _peer(p, "voxelmorph 0.3 and MONAI", "REGBENCH_VXM_PEER_PYTHON", "peers_vxm_venv")
    p.add_argument("--loss", default="mse", choices=["mse", "ncc"], help="similarity used side by side with the peers (default: mse)")
    p.add_argument("--sizes", type=_shapes, default=[(96, 96, 96), (160, 192, 144)],
                   help="comma-separated sizes, e.g. 96x96x96,160x192x144 (the default)")
    p.add_argument("--tools", default=None,
                   help="comma-separated subset of ours, ours_ncc, vxm, vxm02, monai (default: all)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="every tool runs with glibc keeping freed memory for reuse (no page faults per step)")

    def run(args: Any) -> Any:
        from benchmark.perf.training import TOOLS, main_perf_training

        tools = TOOLS if not args.tools else [t.strip() for t in args.tools.split(",") if t.strip()]
        unknown = [t for t in tools if t not in TOOLS]
        if unknown:
            raise SystemExit(f"--tools: unknown tool(s) {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
        return main_perf_training(out=args.out, sizes=args.sizes, repeats=args.repeats, threads=args.threads,
                                  peer_python=args.peer_python, loss=args.loss, tools=tools,
                                  keep_freed_memory=args.keep_freed_memory)
    return run


def _data(p: argparse.ArgumentParser) -> Callable[[Any], Any]:
    _out(p)
    _repeats(p, 5, "warm-cache repeats (the anatomy preprocessing: at most 3)")
    _threads(p, None)

    def run(args: Any) -> Any:
        from benchmark.perf.data import main_perf_data

        res = main_perf_data(args)
        if args.out:  # perf_data writes it without saying so
            print(f"wrote {args.out}")
        return res
    return run


def _drr(p: argparse.ArgumentParser) -> Callable[[Any], Any]:
    _out(p)
    _repeats(p, 5)
    _threads(p, 2)
    _peer(p, "diffdrr", "REGBENCH_DRR_PEER_PYTHON", "peers_drr_venv")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--n-samples", type=int, default=256, help="samples per ray (default: 256)")
    return _lazy("benchmark.perf.drr", "main_perf_drr")


def _patchmorph(p: argparse.ArgumentParser) -> Callable[[Any], Any]:
    _out(p)
    _repeats(p, 3, "processes per configuration; medians are reported")
    _threads(p, 2)
    p.add_argument("--sizes", type=parse_sizes, default=(64, 128, 192), help="cube sides of the training-memory figures "
                   "(default: 64,128,192)")
    return _lazy("benchmark.perf.patchmorph", "main_perf_patchmorph")


def _gpu(p: argparse.ArgumentParser) -> Callable[[Any], Any]:
    _out(p)
    _repeats(p, 5, "timed steps per mode")
    p.add_argument("--only", default=None, help="comma-separated subset of: voxelmorph, msff, diffop, patchmorph, cdreg "
                   "(default: all)")
    p.add_argument("--size", type=parse_size, default="160,224,192", help="volume size X,Y,Z (default: 160,224,192)")
    p.add_argument("--device", default="cuda", help="torch device (default: cuda; cpu checks the harness)")
    return _lazy("benchmark.perf.gpu", "main_perf_gpu")


#: target → (one-line help, declares its options on a parser and returns the function that runs it)
TARGETS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Callable[[Any], Any]]]] = {
    "metrics": ("core ops and metrics at 160x224x192 (warp, NCC, integration, Dice, HD95, Jacobian, NDV)", _metrics),
    "systems": ("SyN vs FireANTs/ANTs on the real pair; MSFF vs VoxelMorph training step (--only msff)", _systems),
    "training": ("VoxelMorph training step vs the voxelmorph and MONAI packages", _training),
    "data": ("loading a 160x224x192 pair cold and with a warm cache; anatomy preprocessing", _data),
    "drr": ("DRR rendering, forward and forward+backward, beside DiffDRR", _drr),
    "patchmorph": ("PatchMorph training memory at 64/128/192 cubed beside VoxelMorph; inference time vs patches", _patchmorph),
    "gpu": ("every learned system's training step (fp32/bf16/fp16/compiled), registration, loader rate and DDP scaling "
            "on CUDA (without CUDA it says so and exits 0)", _gpu),
}


def add_cli_commands(sub: Any) -> None:
    """Register ``perf`` and its targets on the ``regbench`` sub-parsers."""
    pf = sub.add_parser("perf", help="performance harness (JSON out)",
                        description="Performance harness: one target per subcommand, each prints a table and writes "
                        "JSON with --out. `regbench perf TARGET --help` for a target's options.")
    targets = pf.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, (help_, declare) in TARGETS.items():
        t = targets.add_parser(name, help=help_, description=help_)
        t.set_defaults(func=_exit_zero(declare(t)))


def _exit_zero(run: Callable[[Any], Any]) -> Callable[[Any], int]:
    """A target's function as a subcommand: it prints and writes; the exit status is 0."""

    def cmd(args: Any) -> int:
        run(args)
        return 0
    return cmd
