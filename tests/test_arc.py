"""``regbench arc``: curve points are ordinary runner experiments (resumable, equal to separate
runs at the same weight), ``arc.csv`` holds their means, the report draws and summarises them.

Independent truths: the per-point ``cases.csv`` written by the runner (means recomputed
here), separate ``run_grid`` runs of plain configs at the same weight, and the ordering of a
field family whose irregularity grows as the weight falls (``arc_helpers.SineWarp``).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmark.arc import arc_points, run_arc
from benchmark.core.results import read_cases_csv
from benchmark.runner import ConfigError, run_grid
from leaderboard.ablation import arc_summary, read_arc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SMALL_DATA = {"class_path": "datamodules.SyntheticBrainDataModule",
              "init_args": {"size": 16, "n_train": 2, "n_val": 2, "n_test": 3, "seed": 3}}
TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "num_sanity_val_steps": 0}
SINE = {"class_path": "arc_helpers.SineWarp", "init_args": {"smooth": 0.3}}


def _cfg(methods: dict, **extra) -> dict:
    return {"suite": "arc", "seeds": [0], "trainer": dict(TRAINER), "datasets": {"synth": SMALL_DATA}, "methods": methods, **extra}


def _write(tmp_path: Path, cfg: dict, name: str = "arc.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_points_are_log_spaced_with_the_default_added():
    pts = arc_points(_cfg({"s": SINE}), k=3)["s"]
    assert [p["value"] for p in pts] == pytest.approx([0.1, 0.3, 10 ** -0.5, 1.0])
    assert [p["is_default"] for p in pts] == [False, True, False, False]
    assert [p["experiment"] for p in pts] == ["s-smooth0.1", "s", "s-smooth0.3162", "s-smooth1"]
    # a default on the grid is not repeated; the range may come from the config
    pts = arc_points(_cfg({"s": {**SINE, "init_args": {"smooth": 1.0}}}, arc={"k": 5, "methods": {"s": {"low": 0.01, "high": 100}}}))["s"]
    assert [p["value"] for p in pts] == pytest.approx([0.01, 0.1, 1.0, 10.0, 100.0]) and pts[2]["experiment"] == "s"


@pytest.mark.parametrize("cfg, key", [
    (_cfg({"n": {"class_path": "arc_helpers.NoWeight"}}), "methods.n"),
    (_cfg({"s": SINE}, arc={"methods": {"t": {}}}), "arc.methods.t"),
    (_cfg({"s": SINE}, arc={"methods": {"s": {"low": 2.0, "high": 1.0}}}), "arc.methods.s"),
    (_cfg({"s": SINE}, arc={"methods": {"s": {"lo": 2.0}}}), "arc.methods.s.lo"),
    (_cfg({"s": SINE}, arc={"kk": 3}), "arc.kk"),
    (_cfg({"s": {**SINE, "init_args": {"smooth": 0.0}}}), "methods.s.init_args.smooth"),
])
def test_bad_arc_configs_name_the_key(cfg, key):
    with pytest.raises(ConfigError) as exc:
        arc_points(cfg)
    assert key in str(exc.value)


@pytest.mark.slow
def test_cli_bad_config_is_one_line_and_exit_2(tmp_path):
    path = _write(tmp_path, _cfg({"n": {"class_path": "arc_helpers.NoWeight"}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "benchmark.cli", "arc", str(path), "--output", str(tmp_path / "o")],
                         env=env, capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "methods.n" in res.stderr


def test_print_config_shows_the_grid_it_would_run_and_runs_nothing(tmp_path, capsys):
    """``regbench arc CONFIG --print_config``: the resolved grid of every curve point (the one
    ``arc`` writes and runs: same experiments and config hashes), exit 0, nothing written."""
    from benchmark.arc import build_arc_config
    from benchmark.cli import main
    from benchmark.runner import check_grid_config, config_hash, experiment_config, experiments

    out = tmp_path / "out"
    path = _write(tmp_path, _cfg({"s": SINE}, arc={"k": 3, "sdlogj_bound": 0.2}))
    rc = main(["arc", str(path), "--print_config", "--output", str(out), "--set", "seeds=[0, 1]"])
    printed_text = capsys.readouterr().out
    assert rc == 0 and not out.exists()
    assert "# curve s: smooth = 0.1, 0.3 (default), 0.3162, 1" in printed_text
    assert "# Class defaults not set above" in printed_text
    printed = yaml.safe_load(printed_text)
    assert list(printed["methods"]) == ["s-smooth0.1", "s", "s-smooth0.3162", "s-smooth1"]
    assert printed["output"] == str(out) and printed["seeds"] == [0, 1] and "arc" not in printed

    def hashes(p: Path) -> dict:
        _, cfg = check_grid_config(p)
        return {(e.method_name, e.seed): config_hash(experiment_config(cfg, e)[0]) for e in experiments(cfg)}

    raw = {**yaml.safe_load(path.read_text()), "seeds": [0, 1]}
    ran = build_arc_config(raw, arc_points(raw), "arc", out)  # what run_arc writes to arc_config.yaml
    assert hashes(_write(tmp_path, printed, "printed.yaml")) == hashes(_write(tmp_path, ran, "ran.yaml"))
    # a bad config: the one-line error names the user's file, exit 2, nothing printed
    bad = _write(tmp_path, _cfg({"s": SINE}, trainer={"max_steps": -5}), "bad.yaml")
    assert main(["arc", str(bad), "--print_config", "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"{bad} (arc grid): trainer.max_steps" in captured.err and not out.exists()


def _means(exp: Path) -> dict[str, float]:
    rows = read_cases_csv(exp / "cases.csv")
    return {k: float(np.mean([r[k] for r in rows])) for k in ("dice", "sdlogj", "ndv_pct", "fold_pct")}


@pytest.mark.slow
def test_arc_csv_report_and_resume_per_point(tmp_path):
    out = tmp_path / "out"
    path = _write(tmp_path, _cfg({"s": SINE}, arc={"k": 3, "sdlogj_bound": 0.2}))
    log: list[str] = []
    statuses = run_arc(path, output=str(out), log=log.append)
    assert set(statuses.values()) == {"complete"} and len(statuses) == 5  # initial + 4 points
    gen = yaml.safe_load((out / "arc_config.yaml").read_text())
    assert gen["methods"]["s-smooth0.1"]["init_args"] == {"smooth": 0.1} and gen["methods"]["s"] == SINE
    rows = read_arc(out)
    assert [r["experiment"] for r in rows] == ["s-smooth0.1", "s", "s-smooth0.3162", "s-smooth1"]
    for r in rows:
        m = _means(out / "synth" / r["experiment"] / "seed0")
        for k in m:
            assert r[k] == pytest.approx(m[k], rel=1e-9, abs=1e-12)
        assert r["status"] == "complete" and r["n_cases"] == 6 and math.isnan(r["epe_mm"])
    # less smoothing, a larger sine: SDlogJ and NDV fall monotonically as the weight grows
    sd = [r["sdlogj"] for r in rows]
    assert all(a > b for a, b in zip(sd, sd[1:])) and sd[0] > 0.2 > sd[-1]
    summary = arc_summary(rows)[0]
    ok = [r for r in rows if r["sdlogj"] <= 0.2]
    best = max(ok, key=lambda r: r["dice"])
    assert summary["best_dice"] == best["dice"] and summary["best_value"] == best["value"]
    assert summary["default_value"] == pytest.approx(0.3) and summary["points"] == 4
    md = (out / "leaderboard.md").read_text()
    assert "## Accuracy–regularity curves" in md and "best Dice at SDlogJ ≤ bound" in md
    page = (out / "leaderboard.html").read_text()
    arc_part = page[page.index('<section id="arc">'):]
    assert '<img alt="synth: accuracy-regularity curves"' in arc_part
    # resume: nothing to do; then one point lost is the only one recomputed
    log.clear()
    run_arc(path, output=str(out), log=log.append)
    assert sum("[skip]" in ln for ln in log) == 5
    shutil.rmtree(out / "synth" / "s-smooth1")
    log.clear()
    run_arc(path, output=str(out), log=log.append)
    assert sum("[skip]" in ln for ln in log) == 4 and any("[run]" in ln and "s-smooth1" in ln for ln in log)
    assert read_arc(out)[-1]["sdlogj"] == pytest.approx(rows[-1]["sdlogj"])
    # a curve run for another method later keeps this one's rows
    two = _cfg({"s": SINE, "t": SINE}, arc={"k": 2})
    run_arc(_write(tmp_path, two, "two.yaml"), output=str(out), methods=["t"], log=lambda m: None)
    assert {r["method"] for r in read_arc(out)} == {"s", "t"} and len(read_arc(out)) == 4 + 3


@pytest.mark.slow
def test_learned_points_equal_separate_runs_at_the_same_weight(tmp_path):
    vm = {"class_path": "systems.VoxelMorph", "init_args": {"lambda_": 1.0, "lr": 1e-3}, "trainer": {"max_steps": 3}}
    path = _write(tmp_path, _cfg({"vm": vm}, include_initial=False, arc={"k": 2, "methods": {"vm": {"low": 0.1, "high": 10.0}}}))
    run_arc(path, output=str(tmp_path / "arc"), log=lambda m: None)
    rows = {r["experiment"]: r for r in read_arc(tmp_path / "arc")}
    assert set(rows) == {"vm-lambda_0.1", "vm", "vm-lambda_10"}
    for name, lam in (("vm-lambda_0.1", 0.1), ("vm", 1.0)):
        sep = _write(tmp_path, _cfg({"vm": {**vm, "init_args": {"lambda_": lam, "lr": 1e-3}}}, include_initial=False), f"sep{lam}.yaml")
        run_grid(sep, output=str(tmp_path / f"sep{lam}"), leaderboard=False, log=lambda m: None)
        a = {r["case_id"]: r for r in read_cases_csv(tmp_path / "arc" / "synth" / name / "seed0" / "cases.csv")}
        b = {r["case_id"]: r for r in read_cases_csv(tmp_path / f"sep{lam}" / "synth" / "vm" / "seed0" / "cases.csv")}
        assert set(a) == set(b) and len(a) == 6
        for c in a:
            for k in ("dice", "sdlogj", "fold_pct", "ndv_pct", "tre"):
                assert a[c][k] == pytest.approx(b[c][k], rel=1e-6, abs=1e-9), (name, c, k)
    # different weights did train different networks
    assert rows["vm-lambda_0.1"]["sdlogj"] != rows["vm-lambda_10"]["sdlogj"]


def test_shipped_arc_config_has_five_points_per_method_and_loads(tmp_path):
    from benchmark.arc import build_arc_config

    raw = yaml.safe_load((ROOT / "benchmark" / "configs" / "arc_brain.yaml").read_text())
    pts = arc_points(raw)
    assert {"syn", "voxelmorph", "msff", "patchmorph"} <= set(pts)
    for name, p in pts.items():
        assert len(p) >= 5 and sum(q["is_default"] for q in p) == 1
        vals = [q["value"] for q in p if not q["is_default"]] + [q["value"] for q in p if q["is_default"]]
        assert len(set(vals)) == len(vals)
    gen = build_arc_config(raw, pts, "arc_brain", tmp_path / "out")  # (the config itself loads in test_configs)
    assert len(gen["methods"]) == sum(len(p) for p in pts.values()) and "arc" not in gen
    first = pts["syn"][0]
    assert first["value"] == pytest.approx(raw["arc"]["methods"]["syn"]["low"])
    assert gen["methods"][first["experiment"]]["init_args"]["smooth_warp_sigma"] == pytest.approx(first["value"])
