"""On-disk cache of preprocessed arrays, so a second epoch or run never decodes NIfTI again.

Key
    An entry's key is the SHA-256 of (a format version, the **content hash of every input
    file** — image, labels, landmarks — and the preprocessing settings). The content hash is
    the SHA-256 of the file's bytes. Hashing a file costs a read of it, so each hash is
    remembered per file version: in memory for the process, and on disk under
    ``<root>/hashes/`` keyed by the file's absolute path; a remembered hash is reused only
    while the file's signature ``(size, mtime_ns, inode)`` is unchanged — the usual
    size + mtime fast path, used only to decide whether to re-hash, never as the key itself.
    ``hash_mode="stat"`` keys on ``(absolute path, size, mtime_ns)`` instead of the content
    (no read at all; a file rewritten within the same nanosecond with the same size would
    be missed).

Layout
    ``<root>/entries/<key[:2]>/<key>/`` holds one ``<name>.npy`` per array and ``meta.json``.
    Arrays are plain ``.npy`` so they can be memory-mapped (``mmap=True``, copy-on-write:
    writable arrays, pages read lazily).

Race-free writes (several processes, DDP ranks or nodes on a shared file system)
    An entry is written in full into a temporary folder next to its final place, then moved
    there with one atomic rename (:func:`benchmark.core.io.atomic_path`). A reader sees a whole entry or none.
    When two writers race, the first rename wins; the loser's rename fails because the
    folder exists and is not empty, and its temporary folder is removed. Both wrote the same
    arrays, so nothing is lost. Hash notes are single files written the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from benchmark.core.io import atomic_path, atomic_write_bytes

__all__ = ["ArrayCache", "file_digest", "default_cache_dir", "CACHE_FORMAT"]

#: Bumped whenever the preprocessing code changes what it produces for the same settings.
CACHE_FORMAT = 1

_CHUNK = 1 << 22
_memo: dict[tuple[str, int, int, int], str] = {}
_memo_lock = threading.Lock()


def default_cache_dir() -> Path:
    """``$REGBENCH_CACHE_DIR`` or ``~/.cache/regbench/preprocessed``."""
    env = os.environ.get("REGBENCH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "regbench" / "preprocessed"


def _signature(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), int(st.st_size), int(st.st_mtime_ns), int(st.st_ino))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | os.PathLike, mode: str = "content", notes_dir: str | os.PathLike | None = None) -> str:
    """Hash of a file for cache keys.

    Args:
        path: the file.
        mode: ``"content"`` (SHA-256 of the bytes, remembered per file signature) or
            ``"stat"`` (hash of absolute path, size and mtime_ns; no read).
        notes_dir: folder where content hashes are remembered across processes (optional).

    Returns:
        A hex digest.
    """
    p = Path(path)
    sig = _signature(p)
    if mode == "stat":
        return hashlib.sha256(f"stat:{sig[0]}:{sig[1]}:{sig[2]}".encode()).hexdigest()
    if mode != "content":
        raise ValueError(f"hash mode must be 'content' or 'stat', got {mode!r}")
    with _memo_lock:
        hit = _memo.get(sig)
    if hit is not None:
        return hit
    note = None
    if notes_dir is not None:
        note = Path(notes_dir) / (hashlib.sha256(sig[0].encode()).hexdigest() + ".json")
        try:
            rec = json.loads(note.read_text())
            if (rec.get("size"), rec.get("mtime_ns"), rec.get("ino")) == sig[1:]:
                with _memo_lock:
                    _memo[sig] = rec["sha256"]
                return str(rec["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    digest = _sha256_file(p)
    with _memo_lock:
        _memo[sig] = digest
    if note is not None:
        try:
            atomic_write_bytes(note, json.dumps({"path": sig[0], "size": sig[1], "mtime_ns": sig[2], "ino": sig[3],
                                                  "sha256": digest}).encode())
        except OSError:
            pass  # a read-only cache still works, it just re-hashes next time
    return digest


class ArrayCache:
    """Cache of named arrays per entry (see the module docstring).

    Args:
        root: cache folder (created on first write); ``None`` = :func:`default_cache_dir`.
        hash_mode: ``"content"`` (default) or ``"stat"``.
        mmap: load arrays memory-mapped (copy-on-write) instead of reading them.
    """

    def __init__(self, root: str | os.PathLike | None = None, hash_mode: str = "content", mmap: bool = True) -> None:
        if hash_mode not in ("content", "stat"):
            raise ValueError(f"hash_mode must be 'content' or 'stat', got {hash_mode!r}")
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hash_mode = hash_mode
        self.mmap = bool(mmap)

    def __repr__(self) -> str:
        return f"ArrayCache({str(self.root)!r}, hash_mode={self.hash_mode!r})"

    # ------------------------------------------------------------------ keys
    def key(self, files: Sequence[str | os.PathLike | None], settings: Mapping[str, Any]) -> str:
        """Entry key of input ``files`` (``None`` entries allowed) under ``settings`` (JSON-able)."""
        digests = [None if f is None else file_digest(f, self.hash_mode, self.root / "hashes") for f in files]
        blob = json.dumps({"format": CACHE_FORMAT, "files": digests, "settings": settings}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def entry_dir(self, key: str) -> Path:
        """Folder of an entry."""
        return self.root / "entries" / key[:2] / key

    # ------------------------------------------------------------------ read / write
    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays of an entry, or ``None`` when it is absent (or unreadable: it is then dropped)."""
        d = self.entry_dir(key)
        meta_path = d / "meta.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            out = {}
            for name in meta["arrays"]:
                out[name] = np.load(d / f"{name}.npy", mmap_mode="c" if self.mmap else None, allow_pickle=False)
            return out
        except (OSError, ValueError, KeyError):
            # A damaged entry (disk full, manual deletion): recompute rather than fail.
            shutil.rmtree(d, ignore_errors=True)
            return None

    def store(self, key: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> None:
        """Write an entry atomically (temporary folder + one rename); a concurrent identical write is harmless."""
        final = self.entry_dir(key)
        if (final / "meta.json").exists():
            return
        # exist_ok: a concurrent identical write that renamed first is a lost race, not a failure
        with atomic_path(final, prefix=f".tmp_{key[:8]}_", folder=True, exist_ok=True) as tmp:
            for name, arr in arrays.items():
                if not name.isidentifier():
                    raise ValueError(f"array name {name!r} must be an identifier")
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
            info = {"arrays": list(arrays), **dict(meta or {})}
            (tmp / "meta.json").write_text(json.dumps(info, default=str))

    def get_or_compute(
        self,
        files: Sequence[str | os.PathLike | None],
        settings: Mapping[str, Any],
        compute: Callable[[], Mapping[str, np.ndarray]],
    ) -> dict[str, np.ndarray]:
        """Arrays of ``files`` under ``settings``: from the cache, or ``compute()``d and stored."""
        key = self.key(files, settings)
        hit = self.load(key)
        if hit is not None:
            return hit
        arrays = dict(compute())
        try:
            self.store(key, arrays, {"files": [None if f is None else str(f) for f in files], "settings": settings})
        except OSError as exc:  # read-only or full disk: serve the computed arrays anyway
            warnings.warn(f"preprocessing cache {self.root} not written ({exc}); data will be decoded again next time",
                          stacklevel=2)
        return arrays
