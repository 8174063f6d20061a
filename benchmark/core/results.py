"""The results store: one folder per experiment, one row per test case, atomic writes.

Layout::

    <root>/<dataset>/<method>/seed<k>/
        cases.csv          one row per case (columns: CASE_COLUMNS, then extras)
        run.json           resolved config, hash, git revision, versions, device, times, status
        partial/           per-rank JSON-lines of finished cases while the test runs
                           (merged into cases.csv at the end; what a resumed run keeps)

A ``partial/`` or ``ckpt/`` is reused only when a readable ``run.json`` of the same config hash
vouches for it, and a ``complete`` experiment is skipped only when its ``cases.csv`` passes
:func:`check_cases_csv` (else its whole rows are kept, :func:`read_whole_case_rows`, and the
rest is recomputed); see ``docs/reliability.md``.

A case row carries every metric under the same name as ``regbench evaluate``'s JSON; the
metric columns of each task come from the metric registry (:mod:`benchmark.core.registry`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from benchmark.core import registry
from benchmark.core.io import DataError, atomic_write_text, plain

__all__ = [
    "ID_COLUMNS",
    "METRIC_COLUMNS",
    "CASE_COLUMNS",
    "POSE_METRIC_COLUMNS",
    "POSE_CASE_COLUMNS",
    "POSE_ESTIMATE_COLUMNS",
    "case_columns",
    "experiment_dir",
    "PartialCaseLog",
    "read_partial_records",
    "write_cases_csv",
    "read_cases_csv",
    "read_whole_case_rows",
    "check_cases_csv",
    "read_run_json",
]

ID_COLUMNS = ["dataset", "method", "seed", "case_id", "fixed_id", "moving_id"]
#: The estimated pose of each 2D/3D case (rotation vector in rad, translation in mm, the
#: parameters of :func:`benchmark.core.drr.pose_transform`), so a result can be re-rendered or re-scored.
POSE_ESTIMATE_COLUMNS = ["est_rx_rad", "est_ry_rad", "est_rz_rad", "est_tx_mm", "est_ty_mm", "est_tz_mm"]
#: Fixed columns of a task after its metrics (before the extra keys, sorted).
_TASK_TAIL = {"deformable": [], "pose": POSE_ESTIMATE_COLUMNS}


def case_columns(task: str) -> list[str]:
    """The leading ``cases.csv`` columns of a task: ids, the registry's metric columns of the
    task (runtime and memory last), then, for 2D/3D, the estimated pose."""
    return ID_COLUMNS + registry.metric_columns(task) + _TASK_TAIL[task]


#: The columns of the built-in metrics at import (the registry may grow later; writers ask
#: :func:`case_columns`). Deformable: named like `regbench evaluate`'s JSON keys, then
#: runtime and memory.
METRIC_COLUMNS = registry.metric_columns("deformable")
CASE_COLUMNS = case_columns("deformable")
#: 2D/3D (pose) cases: mean target registration error (mm, 3D landmarks, true vs estimated
#: pose), projected error on the detector (mm), rotation (degrees) and translation (mm)
#: errors, success flags (mTRE < 10 mm, < 2 mm), runtime and memory.
POSE_METRIC_COLUMNS = registry.metric_columns("pose")
POSE_CASE_COLUMNS = case_columns("pose")


def experiment_dir(root: str | os.PathLike, dataset: str, method: str, seed: int) -> Path:
    """``<root>/<dataset>/<method>/seed<k>``."""
    return Path(root) / dataset / method / f"seed{int(seed)}"


class PartialCaseLog:
    """Append-only JSON-lines log of finished cases for one rank.

    Each record is written and fsynced as soon as its case is done, so a crash or a kill
    loses at most the case in flight.
    """

    def __init__(self, exp_dir: str | os.PathLike, rank: int = 0) -> None:
        self.path = Path(exp_dir) / "partial" / f"cases.rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as one line, fsynced.

        A record always starts on a fresh line: when the file does not end with a newline
        (a kill inside an earlier write left a torn line), a newline is written first, so
        the torn fragment stays a line of its own (skipped by :func:`read_partial_records`)
        and this record is not glued onto it.
        """
        self.extend([record])

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        """Append several records, one line each (as :meth:`append`), with one fsync."""
        lines = b"".join(json.dumps(plain(r), allow_nan=True).encode() + b"\n" for r in records)
        if not lines:
            return
        with open(self.path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    lines = b"\n" + lines
            fh.seek(0, os.SEEK_END)
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())


def read_partial_records(exp_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All finished-case records in ``exp_dir/partial`` (every rank, earlier attempts too).

    A torn last line (killed mid-write) is ignored. Duplicates by ``case_id`` keep the first.
    """
    folder = Path(exp_dir) / "partial"
    out: dict[str, dict] = {}
    if not folder.is_dir():
        return []
    for f in sorted(folder.glob("cases.rank*.jsonl")):
        with open(f) as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                out.setdefault(str(rec.get("case_id")), rec)
    return list(out.values())


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def write_cases_csv(path: str | os.PathLike, records: Sequence[dict[str, Any]], sort_by: str = "case_id",
                    task: str | None = None) -> Path:
    """Write case records atomically; columns: :func:`case_columns` of ``task`` (the data
    module's declared ``task``; ``None``: :func:`benchmark.core.registry.legacy_task` of the
    records), then any extra keys sorted.

    Missing values (None, NaN) are written as empty cells.
    """
    recs = sorted((plain(r) for r in records), key=lambda r: str(r.get(sort_by, "")))
    base = case_columns(task or registry.legacy_task(recs))
    extra = sorted({k for r in recs for k in r} - set(base))
    cols = base + extra
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in recs:
        w.writerow([_cell(r.get(c)) for c in cols])
    return atomic_write_text(path, buf.getvalue())


_ID_TEXT = ("dataset", "method", "case_id", "fixed_id", "moving_id")


def _parse_cell(key: str, v: str | None) -> Any:
    """One ``cases.csv`` cell as :func:`read_cases_csv` returns it: a missing cell (``None``,
    a row cut short) or an empty one is missing (``NaN``; ``None`` for ids and the seed)."""
    if key in _ID_TEXT:
        return v
    if key == "seed":
        try:
            return int(v) if v not in (None, "") else None
        except ValueError:
            return None
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except ValueError:
        return v


def read_cases_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``cases.csv``; numeric cells as float (empty or missing → NaN), ids as str, seed
    int. A row cut short (a truncated file) gets NaN for its missing cells and cells beyond the
    header are dropped: :func:`check_cases_csv` is what refuses such a file."""
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            rows.append({k: _parse_cell(k, v) for k, v in r.items() if k is not None})
    return rows


def read_whole_case_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a (possibly damaged) ``cases.csv`` that are whole, as case records.

    What a resumed run keeps of a ``cases.csv`` that :func:`check_cases_csv` refuses, so that
    only the other cases are recomputed. A row is dropped when it has another number of cells
    than the header, a metric cell that is not a number, no ``case_id``, or when it is the last
    line of a file that does not end with a newline (a cut inside its last cell can leave a
    shorter number that still parses). JSON cells (``{…}``, ``[…]``) are decoded back.
    Unreadable or undecodable file: no rows.
    """
    try:
        text = Path(path).read_bytes().decode()
    except (OSError, UnicodeDecodeError):
        return []
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    if body and not text.endswith("\n"):
        body = body[:-1]
    numeric = {k for task in registry.TASKS for k in registry.metric_columns(task)}
    out: list[dict[str, Any]] = []
    for cells in body:
        if len(cells) != len(header):
            continue
        rec = {k: _parse_cell(k, v) for k, v in zip(header, cells)}
        if not rec.get("case_id") or any(k in numeric and isinstance(rec[k], str) for k in header):
            continue
        for k, v in rec.items():
            if isinstance(v, str) and k not in _ID_TEXT and v[:1] in ("{", "["):
                try:
                    rec[k] = json.loads(v)
                except ValueError:
                    pass
        out.append(rec)
    return out


def check_cases_csv(path: str | os.PathLike, expected_rows: int | None = None) -> list[str]:
    """Problems that make a ``cases.csv`` unfit for ranking, one line each (empty: fine).

    Checks: the file ends with a newline (a truncated copy usually does not), every row has
    the header's number of cells, every cell of a metric column (the registry's columns of
    every task) is empty or a number, and, when ``expected_rows`` is given
    (``cases_total`` of the experiment's ``run.json``), the row count matches.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        return [f"{p}: cannot read ({exc.strerror or exc})"]
    problems: list[str] = []
    if not raw:
        return [f"{p}: empty file (no header)"]
    if not raw.endswith(b"\n"):
        problems.append(f"{p}: does not end with a newline (truncated?)")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return [f"{p}: not a text CSV file"]
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], [r for r in rows[1:] if r]
    numeric = {k for task in registry.TASKS for k in registry.metric_columns(task)}
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            problems.append(f"{p}: line {i} has {len(r)} cells, the header has {len(header)} (truncated?)")
            continue
        for col, v in zip(header, r):
            if col in numeric and v != "":
                try:
                    float(v)
                except ValueError:
                    problems.append(f"{p}: line {i}, column {col}: {v!r} is not a number")
    if expected_rows is not None and len(body) != int(expected_rows):
        problems.append(f"{p}: {len(body)} case rows, its run.json says cases_total {int(expected_rows)}")
    return problems


def read_run_json(exp_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``run.json`` of an experiment; None when there is none.

    Raises:
        DataError: naming the file, when it exists but cannot be read or is not a JSON
            object (truncated, not UTF-8, a bare string or list): an unreadable ``run.json``
            vouches for nothing, and must not pass for a missing one.
    """
    p = Path(exp_dir) / "run.json"
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataError(p, f"unreadable run.json ({exc.strerror or exc})") from None
    try:
        run = json.loads(raw.decode())
    except UnicodeDecodeError:
        raise DataError(p, "corrupt run.json: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(p, f"corrupt run.json: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(run, dict):
        raise DataError(p, f"corrupt run.json: a JSON {type(run).__name__}, not an object")
    return run


def records_complete(records: Iterable[dict[str, Any]], case_ids: Iterable[str]) -> bool:
    """True when every expected case id has a record."""
    have = {str(r.get("case_id")) for r in records}
    return set(map(str, case_ids)) <= have
