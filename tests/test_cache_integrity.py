"""Preprocessing cache integrity: a damaged entry (empty, truncated or edited ``.npy``, bad
``meta.json``) is named in one warning, dropped and recomputed; a healthy one is never
dropped; the CRC-32 is checked once per file version; entries from before the records are
adopted."""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import datamodules.cache as cache_mod
from datamodules.cache import ArrayCache


def _forget_checks() -> None:
    """As a new process would: no CRC-32 checked in this one yet."""
    getattr(cache_mod, "_verified", {}).clear()


def _image() -> np.ndarray:
    return np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, np.ndarray]:
        self.calls += 1
        return {"image": _image(), "affine": np.eye(4)}


@pytest.fixture
def entry(tmp_path: Path):
    """A cache with one stored entry: ``(cache, files, compute, entry folder)``."""
    _forget_checks()
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 100)
    c = ArrayCache(tmp_path / "c")
    compute = _Counter()
    c.get_or_compute([src], {"s": 1}, compute)
    assert compute.calls == 1
    return c, [src], compute, c.entry_dir(c.key([src], {"s": 1}))


def _flip_last_float(path: Path, value: float = np.inf) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size - 4)
        fh.write(np.float32(value).tobytes())


def _get_warning(c: ArrayCache, files, compute) -> tuple[dict[str, np.ndarray], list[str]]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = c.get_or_compute(files, {"s": 1}, compute)
    return out, [str(w.message) for w in seen]


def _damage(d: Path, how: str) -> None:
    img = d / "image.npy"
    if how == "empty":
        img.write_bytes(b"")
    elif how == "truncated":
        img.write_bytes(img.read_bytes()[:-8])
    elif how == "header":
        raw = bytearray(img.read_bytes())
        raw[:6] = b"garbag"
        img.write_bytes(bytes(raw))
    elif how == "inf":
        _flip_last_float(img)
    elif how == "no_meta":
        (d / "meta.json").unlink()
    elif how == "bad_meta":
        (d / "meta.json").write_text("{not json")
    elif how == "no_array":
        img.unlink()
    elif how == "bad_records":
        meta = json.loads((d / "meta.json").read_text())
        del meta["integrity"]["image"]["crc32"]
        (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("how,says", [
    ("empty", "image.npy: 0 bytes, .* written"), ("truncated", "image.npy: .* bytes"), ("header", "image.npy: ValueError"),
    ("inf", "image.npy: CRC-32"), ("no_meta", "meta.json is missing"), ("bad_meta", "meta.json is unreadable"),
    ("no_array", "image.npy: No such file"), ("bad_records", "integrity records are incomplete"),
])
def test_damaged_entry_is_named_dropped_and_recomputed(entry, how, says):
    c, files, compute, d = entry
    _damage(d, how)
    out, msgs = _get_warning(c, files, compute)
    assert compute.calls == 2 and np.array_equal(out["image"], _image())
    assert len(msgs) == 1 and str(d) in msgs[0] and "damaged" in msgs[0], msgs
    assert re.search(says, msgs[0]), msgs[0]
    # the recomputed entry is stored again and served without a warning
    out, msgs = _get_warning(c, files, compute)
    assert compute.calls == 2 and not msgs and np.array_equal(out["image"], _image())
    assert not [p for p in d.parent.iterdir() if p.name.startswith((".bad_", ".tmp_"))]


@pytest.mark.parametrize("mmap", [True, False])
def test_crc_is_checked_once_per_file_version(tmp_path, monkeypatch, mmap):
    _forget_checks()
    c = ArrayCache(tmp_path / "c", mmap=mmap)
    src = tmp_path / "a.bin"
    src.write_bytes(b"y")
    compute = _Counter()
    c.get_or_compute([src], {"s": 1}, compute)
    d = c.entry_dir(c.key([src], {"s": 1}))
    crcs = []
    real = getattr(cache_mod, "_crc32", None)
    monkeypatch.setattr(cache_mod, "_crc32", lambda a: crcs.append(1) or real(a), raising=False)
    c.get_or_compute([src], {"s": 1}, compute)  # first load: checked, marker written
    assert len(crcs) == 2 and (d / "verified.json").exists()
    _forget_checks()  # as a new process: the marker spares the CRC
    out = c.get_or_compute([src], {"s": 1}, compute)
    assert len(crcs) == 2 and compute.calls == 1 and isinstance(out["image"], np.memmap) == mmap
    # a file edited after the check (new mtime) is checked again
    time.sleep(0.05)  # past the file system's timestamp granularity
    _flip_last_float(d / "image.npy")
    out, msgs = _get_warning(c, [src], compute)
    assert compute.calls == 2 and np.isfinite(out["image"]).all() and "CRC-32" in msgs[0]


def test_a_read_error_keeps_a_healthy_entry(entry, monkeypatch):
    c, files, compute, d = entry

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache_mod.np, "load", denied)
    out, msgs = _get_warning(c, files, compute)
    assert compute.calls == 2 and np.array_equal(out["image"], _image())
    assert len(msgs) == 1 and "not read" in msgs[0] and (d / "meta.json").exists()
    monkeypatch.undo()
    c.get_or_compute(files, {"s": 1}, compute)
    assert compute.calls == 2


def _old_format_entry(tmp_path):
    """A cache, its source file and the (created, empty) folder of that source's entry."""
    _forget_checks()
    c = ArrayCache(tmp_path / "c")
    src = tmp_path / "a.bin"
    src.write_bytes(b"z")
    d = c.entry_dir(c.key([src], {"s": 1}))
    d.mkdir(parents=True)
    return c, src, d


def test_entry_without_records_is_adopted_then_checked(tmp_path):
    c, src, d = _old_format_entry(tmp_path)
    np.save(d / "image.npy", _image())
    (d / "meta.json").write_text(json.dumps({"arrays": ["image"], "files": [str(src)]}))  # the old format
    compute = _Counter()
    out, msgs = _get_warning(c, [src], compute)
    assert compute.calls == 0 and not msgs and np.array_equal(out["image"], _image())
    meta = json.loads((d / "meta.json").read_text())
    assert meta["files"] == [str(src)] and set(meta["integrity"]["image"]) == {"file_size", "dtype", "shape", "crc32"}
    time.sleep(0.05)
    _flip_last_float(d / "image.npy")
    out, msgs = _get_warning(c, [src], compute)
    assert compute.calls == 1 and np.isfinite(out["image"]).all() and "CRC-32" in msgs[0]


def test_empty_file_of_an_old_entry_is_dropped(tmp_path):
    """The reported failure: ``np.load`` of an empty file raises ``EOFError``, which was not
    caught, so every later run failed without naming the file."""
    c, src, d = _old_format_entry(tmp_path)
    (d / "image.npy").write_bytes(b"")
    (d / "meta.json").write_text(json.dumps({"arrays": ["image"]}))
    compute = _Counter()
    out, msgs = _get_warning(c, [src], compute)
    assert compute.calls == 1 and np.array_equal(out["image"], _image())
    assert len(msgs) == 1 and f"{d} (image.npy: EOFError" in msgs[0]
    c.get_or_compute([src], {"s": 1}, compute)
    assert compute.calls == 1


def test_drop_keeps_a_fresh_entry_another_process_renamed_in(entry):
    c, files, compute, d = entry
    old_ino = d.stat().st_ino
    os.rename(d, d.parent / "gone")  # another process dropped the damaged entry ...
    c.store(c.key(files, {"s": 1}), compute())  # ... and stored a fresh one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c._drop(d, old_ino, "stale reader")  # a slower reader that saw the damaged one
    assert np.array_equal(c.load(c.key(files, {"s": 1}))["image"], _image())
