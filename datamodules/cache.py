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

Integrity (the cache is derived data: a damaged entry that is detected is dropped and recomputed)
    ``meta.json`` records, per array, the ``.npy`` file's byte size, the dtype, the shape
    and a CRC-32 (:func:`zlib.crc32`) of the raw array bytes.

    * Every load checks what costs no data read: each file exists, its size (one ``stat``),
      its ``.npy`` header (dtype, shape, C order). A memory-mapped load stays lazy.
    * The CRC-32 is checked once per file version: the first load after writing (in any
      process) reads the arrays, checks them and writes ``verified.json`` with the files'
      ``(size, mtime_ns, inode)``; later loads skip the CRC while those are unchanged, so a
      file rewritten or edited in place is checked again. Limit: damage that keeps a file's
      size and mtime (bit rot under a verified entry) is not seen.

    Why not the CRC on every load: on a 160x224x192 float32 image (27.5 MB, page cache) a
    memory-mapped ``np.load`` takes 0.11 ms, a full read 2.9 ms, a CRC-32 6.7 ms (BLAKE2b
    29 ms): 60x a memory-mapped load, and every page read. Measured on an image + affine
    entry: a memory-mapped load 0.25 -> 0.30 ms, a read 3.3 -> 3.5 ms; a store +7 ms and
    the first load +8 ms (the CRCs).

    A damaged entry (empty or truncated file, bad header, wrong size/dtype/shape, CRC
    mismatch, unreadable or missing ``meta.json``, missing array) gets one warning naming
    it and what is wrong, is moved aside with one rename and removed, and is recomputed; a
    fresh entry another process renamed into its place meanwhile is kept. An error that
    says nothing about the entry (permission, too many open files) drops nothing: the arrays
    are computed for this use only. Entries written before these records (no ``integrity``
    in ``meta.json``) are adopted: when they load cleanly, records computed from the files
    as found are added, and they are checked from then on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from benchmark.core.io import atomic_path, atomic_write_bytes, atomic_write_json

__all__ = ["ArrayCache", "file_digest", "default_cache_dir", "CACHE_FORMAT"]

#: Bumped whenever the preprocessing code changes what it produces for the same settings.
CACHE_FORMAT = 1

_CHUNK = 1 << 22
_memo: dict[tuple[str, int, int, int], str] = {}
_memo_lock = threading.Lock()
# entry folder -> file signatures whose CRC-32 this process has checked (also for a read-only cache)
_verified: dict[str, dict[str, list[int]]] = {}
_VERIFIED = "verified.json"
_RECORD_KEYS = frozenset({"file_size", "dtype", "shape", "crc32"})
# errors that say the entry's files are bad (not that the reader could not read them now)
_DAMAGE_ERRNOS = {errno.ENOENT, errno.EIO, errno.ENOTDIR, errno.EISDIR}


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


class _Damaged(Exception):
    """An entry whose files are not what was written (the message says which and how)."""


def _crc32(arr: np.ndarray) -> int:
    """CRC-32 of an array's raw bytes (C order, as ``.npy`` holds them)."""
    return zlib.crc32(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)) & 0xFFFFFFFF


def _record(arr: np.ndarray, file_size: int) -> dict[str, Any]:
    """What ``meta.json`` keeps to check an array's file: size, dtype, shape, CRC-32."""
    return {"file_size": int(file_size), "dtype": arr.dtype.str, "shape": list(arr.shape), "crc32": _crc32(arr)}


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
        """The arrays of an entry, or ``None`` when it is absent, or damaged (it is then
        dropped, with one warning) or unreadable now (it is kept). See the module docstring."""
        d = self.entry_dir(key)
        try:
            dir_ino = d.stat().st_ino
        except FileNotFoundError:
            return None
        try:
            return self._load(d)
        except _Damaged as exc:
            self._drop(d, dir_ino, str(exc))
        except OSError as exc:  # says nothing about the entry: keep it
            warnings.warn(f"preprocessing cache entry {d} not read ({exc.strerror or exc}); "
                          "computing its arrays again for this use", stacklevel=3)
        return None

    def _load(self, d: Path) -> dict[str, np.ndarray] | None:
        try:
            meta = json.loads((d / "meta.json").read_text())
            names = list(meta["arrays"])
            records = meta.get("integrity")
            if records is not None and not (isinstance(records, dict) and all(
                    isinstance(records.get(n), dict) and set(records[n]) >= _RECORD_KEYS for n in names)):
                raise _Damaged("meta.json: its integrity records are incomplete")
        except FileNotFoundError:
            if not d.exists():
                return None  # dropped by another process meanwhile
            raise _Damaged("meta.json is missing") from None
        except OSError as exc:
            if exc.errno in _DAMAGE_ERRNOS:
                raise _Damaged(f"meta.json: {exc.strerror or exc}") from None
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _Damaged(f"meta.json is unreadable ({type(exc).__name__}: {exc})") from None
        out: dict[str, np.ndarray] = {}
        sigs: dict[str, list[int]] = {}
        for name in names:
            f = d / f"{name}.npy"
            try:
                st = f.stat()
                rec = records[name] if records is not None else None
                if rec is not None and st.st_size != rec["file_size"]:
                    raise _Damaged(f"{name}.npy: {st.st_size} bytes, {rec['file_size']} were written")
                arr = np.load(f, mmap_mode="c" if self.mmap else None, allow_pickle=False)
            except _Damaged:
                raise
            except OSError as exc:
                if exc.errno in _DAMAGE_ERRNOS:
                    raise _Damaged(f"{name}.npy: {exc.strerror or exc}") from None
                raise
            except (EOFError, ValueError, SyntaxError, KeyError, TypeError) as exc:
                raise _Damaged(f"{name}.npy: {type(exc).__name__}: {exc}") from None
            if not arr.flags.c_contiguous:
                raise _Damaged(f"{name}.npy: not in C order as written")
            if rec is not None and (arr.dtype.str != rec["dtype"] or list(arr.shape) != list(rec["shape"])):
                raise _Damaged(f"{name}.npy: {arr.dtype.str} {list(arr.shape)}, {rec['dtype']} {list(rec['shape'])} "
                               "were written")
            out[name] = arr
            sigs[name] = [int(st.st_size), int(st.st_mtime_ns), int(st.st_ino)]
        if records is None:
            if _verified.get(str(d)) != sigs:
                self._adopt(d, meta, out, sigs)
        elif not self._is_verified(d, sigs):
            for name, arr in out.items():
                if _crc32(arr) != records[name].get("crc32"):
                    raise _Damaged(f"{name}.npy: CRC-32 of its data differs from the one written")
            self._mark_verified(d, sigs)
        return out

    def _is_verified(self, d: Path, sigs: dict[str, list[int]]) -> bool:
        if _verified.get(str(d)) == sigs:
            return True
        try:
            if json.loads((d / _VERIFIED).read_text()).get("files") == sigs:
                _verified[str(d)] = sigs
                return True
        except (OSError, ValueError, AttributeError):
            pass
        return False

    def _mark_verified(self, d: Path, sigs: dict[str, list[int]]) -> None:
        _verified[str(d)] = sigs
        try:
            atomic_write_json(d / _VERIFIED, {"files": sigs})
        except OSError:
            pass  # a read-only cache: checked again by the next process

    def _adopt(self, d: Path, meta: dict[str, Any], arrays: Mapping[str, np.ndarray], sigs: dict[str, list[int]]) -> None:
        """Add the integrity records of an entry written before them (as its files are now)."""
        meta = {**meta, "integrity": {n: _record(a, sigs[n][0]) for n, a in arrays.items()}}
        try:
            atomic_write_json(d / "meta.json", meta)
        except OSError:
            _verified[str(d)] = sigs  # a read-only cache: adopted again by the next process
            return
        self._mark_verified(d, sigs)

    def _drop(self, d: Path, dir_ino: int, reason: str) -> None:
        """Move a damaged entry aside (one atomic rename) and remove it. A concurrent process
        may have dropped it and renamed a fresh entry into place since we read it: a folder
        that is not the one read is put back (or, when yet another fresh copy is there, removed
        as a duplicate)."""
        warnings.warn(f"preprocessing cache: damaged entry {d} ({reason}); dropped, its arrays are computed again",
                      stacklevel=4)
        _verified.pop(str(d), None)
        aside = d.parent / f".bad_{d.name[:8]}_{uuid.uuid4().hex[:8]}"
        try:
            os.rename(d, aside)
        except FileNotFoundError:
            return  # dropped by another process
        except OSError as exc:
            warnings.warn(f"preprocessing cache: damaged entry {d} could not be removed ({exc.strerror or exc})",
                          stacklevel=4)
            return
        try:
            if aside.stat().st_ino != dir_ino:
                os.rename(aside, d)
                return
        except OSError:
            pass
        shutil.rmtree(aside, ignore_errors=True)

    def store(self, key: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> None:
        """Write an entry atomically (temporary folder + one rename); a concurrent identical
        write is harmless. ``meta.json`` gets each array's integrity record."""
        final = self.entry_dir(key)
        if (final / "meta.json").exists():
            return
        # exist_ok: a concurrent identical write that renamed first is a lost race, not a failure
        with atomic_path(final, prefix=f".tmp_{key[:8]}_", folder=True, exist_ok=True) as tmp:
            records = {}
            for name, arr in arrays.items():
                if not name.isidentifier():
                    raise ValueError(f"array name {name!r} must be an identifier")
                a = np.ascontiguousarray(arr)
                np.save(tmp / f"{name}.npy", a, allow_pickle=False)
                records[name] = _record(a, (tmp / f"{name}.npy").stat().st_size)
            info = {"arrays": list(arrays), **dict(meta or {}), "integrity": records}
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
