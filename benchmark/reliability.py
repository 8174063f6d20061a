"""What keeps a grid run from losing, repeating or silently corrupting work.

* :class:`ExperimentLock`: one ``regbench run`` per experiment at a time. An advisory
  ``flock`` on ``<output>/.locks/<dataset>/<method>/seed<k>.lock`` holding the holder's host,
  pid and start time. The kernel drops the lock when its process ends in any way (exit,
  crash, ``kill -9``), so a stale lock cannot outlive its holder on the same machine; on a
  shared file system (NFS v4) the server does the same when the client goes away.
* :class:`ResumableLoaderMixin` / :func:`make_resumable`: the training dataloader tells
  Lightning (``state_dict`` / ``load_state_dict``, saved in every checkpoint) how many
  batches of the current epoch were consumed; a resumed fit skips exactly those index
  batches (without loading their data) and so sees the same batches in the same order as
  the uninterrupted fit. The sampler's epoch is restored by Lightning (``set_epoch``).
* :class:`FitStateCallback`: saves the global RNG states (python, numpy, torch, CUDA) and
  the training seconds so far in every checkpoint; on resume the RNG states are put back
  at the first training-epoch start and the seconds are carried on.
* :func:`install_signal_handlers` / :func:`critical`: SIGTERM and SIGINT raise
  :class:`RunInterrupted` (abandoning the case in flight) except inside a critical write,
  where the raise waits until the write is done.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = [
    "ExperimentLock",
    "LockHeld",
    "RunInterrupted",
    "install_signal_handlers",
    "critical",
    "ResumableLoaderMixin",
    "make_resumable",
    "FitStateCallback",
    "one_line_error",
]


# --------------------------------------------------------------------------------------
# locks


class LockHeld(RuntimeError):
    """The experiment is held by another live process; ``holder`` is its lock record."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"{path}: held by {describe_holder(holder)}")


def describe_holder(holder: dict[str, Any]) -> str:
    """``regbench run pid 1234 on host H since 2026-…`` from a lock record."""
    if not holder:
        return "another process (no holder record yet)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')} ({holder.get('command', 'regbench')})"


class ExperimentLock:
    """Advisory exclusive lock of one experiment (``fcntl.flock`` on a lock file).

    Args:
        path: the lock file (created with its folders; never deleted, so that two processes
            always lock the same inode).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def holder(self) -> dict[str, Any]:
        """The record written by the current (or last) holder; ``{}`` when unreadable."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, blocking: bool = False) -> bool:
        """Take the lock; ``False`` when another process holds it (``blocking=False``)."""
        import fcntl

        if self._fd is not None:
            return True
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        record = {"host": platform.node(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "command": " ".join(["regbench", *sys.argv[1:3]])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return True

    def release(self) -> None:
        """Drop the lock (the file stays)."""
        import fcntl

        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


# --------------------------------------------------------------------------------------
# signals


class RunInterrupted(BaseException):
    """SIGTERM / SIGINT arrived: stop the grid (a BaseException so that the per-experiment
    ``except Exception`` does not record it as a failure). ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")


_SIG = {"pending": None, "critical": 0, "installed": False}


def _handler(signum: int, frame: Any) -> None:
    # Later signals of either kind fall back to the default (a second Ctrl+C / TERM kills).
    for s in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(s, signal.SIG_DFL)
    if _SIG["critical"] > 0:
        _SIG["pending"] = signum
        return
    raise RunInterrupted(signum)


def install_signal_handlers() -> Callable[[], None]:
    """SIGTERM and SIGINT raise :class:`RunInterrupted` in the main thread; returns a function
    that restores the previous handlers. A no-op outside the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, _handler)
    _SIG["pending"] = None
    _SIG["installed"] = True

    def restore() -> None:
        for s, h in old.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(s, h if h is not None else signal.SIG_DFL)
        _SIG["installed"] = False

    return restore


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A write that a signal must not cut: the interrupt is raised when the block ends."""
    _SIG["critical"] += 1
    try:
        yield
    finally:
        _SIG["critical"] -= 1
        if _SIG["critical"] == 0 and _SIG["pending"] is not None:
            signum, _SIG["pending"] = _SIG["pending"], None
            raise RunInterrupted(signum)


# --------------------------------------------------------------------------------------
# exact resume of the training data stream


class _SkipFirst:
    """A batch sampler whose first iteration skips ``skip`` index batches (one-shot);
    ``len`` stays the full epoch, as Lightning counts the skipped batches as done."""

    def __init__(self, inner: Any, skip: int) -> None:
        self.inner = inner
        self.skip = int(skip)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        it = iter(self.inner)
        for _ in range(skip):
            if next(it, StopIteration) is StopIteration:
                return
        yield from it


class _CountingIter:
    """Iterator over a DataLoader that counts the batches handed out in this epoch."""

    def __init__(self, it: Any, loader: Any) -> None:
        self._it = it
        self._loader = loader

    def __iter__(self) -> "_CountingIter":
        return self

    def __next__(self) -> Any:
        batch = next(self._it)
        self._loader._rb_consumed += 1
        return batch

    def __len__(self) -> int:
        return len(self._it)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._it, name)


class ResumableLoaderMixin:
    """Adds Lightning's loader state protocol to a map-style ``DataLoader``.

    ``state_dict()`` = ``{"consumed": batches handed out in the current epoch, "length":
    batches per epoch}``. After ``load_state_dict`` the next iteration skips the consumed
    index batches; a state taken at the end of an epoch (consumed == length) skips nothing.
    Counting happens where batches leave the loader, so prefetching workers do not inflate it.

    The methods are copied into a one-base subclass of the loader's own class (see
    :func:`make_resumable`), so that ``__class__`` can be swapped on a live loader; they reach
    the loader's own behaviour through ``super(type(self), self)``.
    """

    __slots__ = ()

    @property
    def _index_sampler(self):  # type: ignore[override]
        base = super(type(self), self)._index_sampler  # type: ignore[misc]
        skip = getattr(self, "_rb_skip", 0)
        return _SkipFirst(base, skip) if skip else base

    def __iter__(self):  # type: ignore[override]
        skip = int(getattr(self, "_rb_skip", 0))
        it = super(type(self), self).__iter__()  # type: ignore[misc]
        self._rb_skip = 0
        self._rb_consumed = skip
        return _CountingIter(it, self)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": int(getattr(self, "_rb_consumed", 0)), "length": int(len(self))}  # type: ignore[arg-type]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        consumed = int(state.get("consumed", 0))
        length = int(state.get("length", 0))
        self._rb_skip = consumed if 0 < consumed < length else 0


_RESUMABLE: dict[type, type] = {}
_MIXIN_NAMES = ("_index_sampler", "__iter__", "state_dict", "load_state_dict")


def make_resumable(loader: Any) -> Any:
    """Give a map-style ``DataLoader`` (any subclass) the resumable state protocol, in place.

    Iterable-style datasets and objects that already have ``state_dict`` are returned as
    they are.
    """
    from torch.utils.data import DataLoader, IterableDataset

    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    if callable(getattr(loader, "state_dict", None)):
        return loader
    cls = type(loader)
    if cls not in _RESUMABLE:
        ns = {name: ResumableLoaderMixin.__dict__[name] for name in _MIXIN_NAMES}
        ns["__slots__"] = ()
        ns["__doc__"] = ResumableLoaderMixin.__doc__
        _RESUMABLE[cls] = type(f"Resumable{cls.__name__}", (cls,), ns)
    loader.__class__ = _RESUMABLE[cls]
    return loader


def _lightning_callback():
    from lightning.pytorch.callbacks import Callback

    return Callback


class FitStateCallback(_lightning_callback()):  # type: ignore[misc]
    """Keeps what a checkpoint needs beyond Lightning's own state for an exact resume.

    Saved under ``checkpoint["regbench"]``: the RNG states of python, numpy, torch (and CUDA)
    at the save, ``fit_seconds`` and ``fit_cpu_seconds`` of training so far. On load, the
    RNG states are restored at the first ``on_train_epoch_start`` that follows (after the
    dataloader iterator was made, as in the uninterrupted fit), and the time counters carry on.
    ``resumed_from_step`` is the global step of the checkpoint, ``None`` for a fresh fit.
    """

    def __init__(self) -> None:
        super().__init__()
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()
        self.prior_seconds = 0.0
        self.prior_cpu_seconds = 0.0
        self.resumed_from_step: int | None = None
        self._pending_rng: dict[str, Any] | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()

    @property
    def seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self._t0

    @property
    def cpu_seconds(self) -> float:
        return self.prior_cpu_seconds + time.process_time() - self._c0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        import numpy as np
        import torch

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # plain ints and tensors only: the checkpoint stays loadable with weights_only=True
        rng = {"python": random.getstate(), "numpy": [str(kind), keys.tolist(), int(pos), int(has_gauss), float(cached)],
               "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["regbench"] = {"rng": rng, "fit_seconds": self.seconds, "fit_cpu_seconds": self.cpu_seconds}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("regbench") or {}
        self.prior_seconds = float(state.get("fit_seconds", 0.0))
        self.prior_cpu_seconds = float(state.get("fit_cpu_seconds", 0.0))
        self.resumed_from_step = int(checkpoint.get("global_step", 0))
        self._pending_rng = state.get("rng")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._pending_rng is None:
            return
        import numpy as np
        import torch

        rng, self._pending_rng = self._pending_rng, None
        random.setstate(rng["python"])
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


# --------------------------------------------------------------------------------------
# messages


def one_line_error(exc: BaseException) -> str:
    """``Type: message`` on one line. An exception re-raised from a DataLoader worker carries
    the worker's whole traceback in its message; its last line (the original error) is kept."""
    import re

    msg = str(exc)
    if "Original Traceback" in msg:
        lines = msg.split("Original Traceback", 1)[1].splitlines()
        # the original "module.Type: message" is the last unindented line after the frames;
        # its message may run over several lines
        starts = [i for i, ln in enumerate(lines) if re.match(r"^[A-Za-z_][\w.]*(: |$)", ln)]
        if starts:
            head, _, text = lines[starts[-1]].partition(": ")
            text = " ".join([text.strip(), *(ln.strip() for ln in lines[starts[-1] + 1:])]).strip()
            return f"{head.rsplit('.', 1)[-1]}: {text}" if text else head.rsplit(".", 1)[-1]
    text = " ".join(ln.strip() for ln in msg.strip().splitlines() if ln.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
