"""`regbench run` and `regbench leaderboard` on damaged result folders (runner review): a
truncated ``cases.csv``, a missing or corrupt ``run.json``, a redo swap cut between its two
renames, a panel left by another config, a malformed ``run.json`` in the leaderboard. Each
test builds the damaged state on disk directly (as a kill or a bad copy leaves it) and
failed before the fix: the damage was ranked, reused under another config hash, recomputed
from scratch, or crashed with a traceback."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmark.core.results import PartialCaseLog, check_cases_csv, read_cases_csv
from benchmark.runner import config_hash, experiment_config, experiments, load_grid_config, run_grid
from test_reliability import _run_json, _write, finished  # noqa: F401  (the finished fixture, shared)

EXP = Path("synth") / "zero" / "seed0"


def _copy(finished: Path, tmp_path: Path) -> tuple[Path, Path]:  # noqa: F811
    """``(config, results folder)``: a private copy of the finished one-experiment result."""
    cfg = Path(shutil.copy(finished / "g.yaml", tmp_path / "g.yaml"))
    return cfg, Path(shutil.copytree(finished / "out", tmp_path / "out"))


def _run(cfg: Path, out: Path, logs: list[str] | None = None) -> dict[str, str]:
    return run_grid(cfg, output=str(out), log=logs.append if logs is not None else (lambda *_: None), leaderboard=False)


def _other_config(cfg: Path, tmp_path: Path) -> tuple[Path, str]:
    """Config B (another shift of the zero method) and its experiment's config hash."""
    raw = yaml.safe_load(cfg.read_text())
    raw["methods"]["zero"]["init_args"]["shift"] = 0.5
    path = _write(tmp_path / "b.yaml", raw)
    grid = load_grid_config(path)
    (exp,) = [e for e in experiments(grid) if e.method_name == "zero"]
    return path, config_hash(experiment_config(grid, exp)[0])


# ------------------------------------------------------------------------- 1. truncated cases.csv
def test_read_cases_csv_reads_a_row_cut_short_as_missing(tmp_path):
    """A row cut short has no cells past the cut (csv gives None): missing, not a TypeError."""
    path = tmp_path / "cases.csv"
    path.write_text("dataset,method,seed,case_id,dice,runtime_s\nsynth,zero,0,a,0.5,0.1\nsynth,zero")
    rows = read_cases_csv(path)
    assert rows[0]["dice"] == 0.5 and rows[1]["seed"] is None and math.isnan(rows[1]["dice"])


@pytest.mark.parametrize("cut", ["whole_rows", "mid_row"])
def test_truncated_cases_csv_is_resumed_not_skipped(finished, tmp_path, cut):  # noqa: F811
    """A complete run.json beside a cut cases.csv is no result: the whole rows are kept and only
    the missing cases are computed (it used to be skipped, and ranked with 2 of 6 cases)."""
    cfg, out = _copy(finished, tmp_path)
    cases = out / EXP / "cases.csv"
    good = read_cases_csv(cases)
    lines = cases.read_text().splitlines(keepends=True)
    if cut == "whole_rows":  # `head -n 3`: the header and two whole rows
        cases.write_text("".join(lines[:3]))
    else:  # two whole rows, then half of the third
        cases.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    logs: list[str] = []
    assert _run(cfg, out, logs)[str(out / EXP)] == "complete"
    assert not any(m.startswith("[skip]") for m in logs), logs
    assert any(m.startswith("[resume]") and str(cases) in m for m in logs), logs
    attempt = _run_json(out / EXP)["attempts"][-1]
    assert (attempt["cases_resumed"], attempt["cases_computed"]) == (2, 4)
    assert check_cases_csv(cases, expected_rows=6) == []
    rows = read_cases_csv(cases)
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in good]
    for new, old in zip(rows[:2], good[:2]):  # the kept rows as they were (not recomputed)
        assert new["runtime_s"] == old["runtime_s"] and new["dice_per_label"] == old["dice_per_label"]
    assert [r["dice"] for r in rows] == [r["dice"] for r in good]
    assert not (out / EXP / "partial").exists()


# ------------------------------------------------------------------------- 2. run.json that vouches for nothing
@pytest.mark.parametrize("damage", ["missing", "truncated", "not_an_object", "no_config_hash"])
def test_state_without_a_readable_run_json_of_this_config_is_set_aside(finished, tmp_path, damage):  # noqa: F811
    """Case records and checkpoints are reused only when a readable run.json of the same config
    hash vouches for them; otherwise they are moved aside (kept) and the experiment starts afresh.
    A planted record (dice 123) used to end up in the new cases.csv."""
    cfg, out = _copy(finished, tmp_path)
    exp = out / EXP
    planted = {**read_cases_csv(exp / "cases.csv")[0], "dice": 123.0}
    (exp / "cases.csv").unlink()
    PartialCaseLog(exp).append(planted)
    (exp / "ckpt").mkdir()
    (exp / "ckpt" / "last.ckpt").write_bytes(b"another model")
    partial = (exp / "partial" / "cases.rank0.jsonl").read_bytes()
    run_json = exp / "run.json"
    if damage == "missing":
        run_json.unlink()
    elif damage == "truncated":
        run_json.write_text(run_json.read_text()[:200])
    elif damage == "not_an_object":
        run_json.write_text("[]")
    else:
        run = _run_json(exp)
        del run["config_hash"]
        run["status"] = "running"
        run_json.write_text(json.dumps(run))
    logs: list[str] = []
    assert _run(cfg, out, logs)[str(exp)] == "complete"
    rows = read_cases_csv(exp / "cases.csv")
    assert len(rows) == 6 and 123.0 not in [r["dice"] for r in rows]
    (aside,) = [p for p in exp.parent.iterdir() if p.name.startswith(".seed0.unverified-")]
    assert (aside / "partial" / "cases.rank0.jsonl").read_bytes() == partial  # kept, never deleted
    assert (aside / "ckpt" / "last.ckpt").read_bytes() == b"another model"
    said = [m for m in logs if m.startswith("[unverified]")]
    assert len(said) == 1 and aside.name in said[0], logs
    if damage in ("truncated", "not_an_object"):
        assert f"{run_json}: corrupt run.json" in said[0], said


# ------------------------------------------------------------------------- 3. a redo swap cut by a crash
@pytest.mark.parametrize("state,run_config", [
    ("cut_between_renames", "new"),  # the complete redo of the running config goes into place
    ("cut_between_renames", "old"),  # the running config is the old one: its backup goes back
    ("swap_never_ran", "new"),  # a complete redo whose swap never started is swapped in
])
def test_redo_swap_cut_by_a_crash_is_finished_or_undone(finished, tmp_path, state, run_config):  # noqa: F811
    """After ``os.replace(final, backup)`` the result folder is missing; the next start finishes
    the swap (or undoes it) instead of recomputing from scratch and leaving the dot folders."""
    cfg_a, out = _copy(finished, tmp_path)
    exp = out / EXP
    before, hash_a = (exp / "cases.csv").read_bytes(), _run_json(exp)["config_hash"]
    cfg_b, hash_b = _other_config(cfg_a, tmp_path)
    redo = exp.parent / f".seed0.redo-{hash_b}"  # a complete redo of config B, as the runner leaves it
    shutil.copytree(exp, redo)
    run = _run_json(redo)
    run.update(config_hash=hash_b, replaces_config_hash=hash_a)
    (redo / "run.json").write_text(json.dumps(run))
    if state == "cut_between_renames":
        os.replace(exp, exp.parent / f".seed0.old-{hash_a}")  # the swap's first rename, then the crash
    logs: list[str] = []
    assert _run(cfg_b if run_config == "new" else cfg_a, out, logs)[str(exp)] == "complete"
    assert any(m.startswith("[skip]") for m in logs), logs  # nothing recomputed
    left = sorted(p.name for p in exp.parent.iterdir())
    if run_config == "new":
        assert _run_json(exp)["config_hash"] == hash_b
        assert left == ["seed0"]  # the backup was provably redundant: removed
    else:
        assert _run_json(exp)["config_hash"] == hash_a and (exp / "cases.csv").read_bytes() == before
        assert left == [redo.name, "seed0"]  # another config's complete redo is not ours to delete


# ------------------------------------------------------------------------- 4. panel of another config
def test_config_change_of_a_half_done_run_replaces_its_panel_and_fields(finished, tmp_path):  # noqa: F811
    """A half-done run of config A then config B: the panel and fields must come from B (the
    panel was kept because panel.npz existed, showing A's 0.25 shift under B's label)."""
    cfg_a, out = _copy(finished, tmp_path)
    exp = out / EXP
    run = _run_json(exp)
    run["status"] = "interrupted"
    (exp / "run.json").write_text(json.dumps(run))
    (exp / "cases.csv").unlink()
    (exp / "fields").mkdir()
    (exp / "fields" / "disp_a_b.nii.gz").write_bytes(b"config A's field")
    cfg_b, hash_b = _other_config(cfg_a, tmp_path)
    assert _run(cfg_b, out)[str(exp)] == "complete"
    assert _run_json(exp)["config_hash"] == hash_b
    with np.load(exp / "panel.npz") as z:
        assert np.allclose(z["disp_ax0"], 0.5)
    assert not (exp / "fields").exists()



# ------------------------------------------------------------------------- 5. malformed run.json, leaderboard
@pytest.mark.parametrize("content,why", [
    (b'"complete"', "a JSON str, not an object"),
    (b"[]", "a JSON list, not an object"),
    (b'{"status": "compl\xff\xfe', "not UTF-8"),
    (b'{"status": "complete", "cases_to', "not valid JSON"),
])
def test_leaderboard_names_an_experiment_with_a_malformed_run_json(finished, tmp_path, capsys, content, why):  # noqa: F811
    """One line naming the experiment left out and why; no traceback, and not "no run.json"
    (a string or list crashed cli.py and table.collect, non-UTF-8 bytes results.py, and a
    truncated file was listed as "no run.json" with exit code 0 and nothing said)."""
    from benchmark.cli import main
    from leaderboard.cli import check_results_folder, unreadable_runs
    from leaderboard.table import collect

    out = Path(shutil.copytree(finished / "out", tmp_path / "out"))
    run_json = out / EXP / "run.json"
    run_json.write_bytes(content)
    assert check_results_folder(out) == []
    (said,) = unreadable_runs(out)
    assert said.startswith(f"left out {EXP}: {run_json}: corrupt run.json") and why in said, said
    rows, skipped = collect(out)
    assert rows == [] and [s["experiment"] for s in skipped] == [str(EXP)]
    assert skipped[0]["status"].startswith("corrupt run.json") and why in skipped[0]["status"], skipped
    assert main(["leaderboard", str(out), "--format", "md", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if "left out" in line] == [
        f"regbench leaderboard: {said}"], err
    md = (out / "leaderboard.md").read_text()
    assert f"{EXP}: corrupt run.json" in md and "no run.json" not in md, md


def test_the_runs_leaderboard_is_not_written_over_a_damaged_experiment(finished, tmp_path):  # noqa: F811
    """An experiment outside this run (another method's folder) with a cut cases.csv: the
    run's own leaderboard would have ranked it (`regbench leaderboard` refuses it); it is not
    written, and one line says which file and what to do."""
    cfg, out = _copy(finished, tmp_path)
    other = out / "synth" / "other" / "seed0"
    shutil.copytree(out / EXP, other)
    lines = (other / "cases.csv").read_text().splitlines(keepends=True)
    (other / "cases.csv").write_text("".join(lines[:3]))
    logs: list[str] = []
    statuses = run_grid(cfg, output=str(out), log=logs.append, leaderboard=True)
    assert statuses[str(out / EXP)] == "complete"
    assert not (out / "leaderboard.md").exists()
    line = next(m for m in logs if m.startswith("[leaderboard]"))
    assert line.startswith("[leaderboard] not written: ") and str(other / "cases.csv") in line
    (other / "cases.csv").write_text("".join(lines))  # repaired: the same run writes it
    run_grid(cfg, output=str(out), log=logs.append, leaderboard=True)
    assert (out / "leaderboard.md").exists()
