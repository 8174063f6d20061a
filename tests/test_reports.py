"""Comparison reports: Learn2Reg rank scores, Holm, significance markers, LaTeX, HTML, wandb.

Results folders are built on the fly (synthetic cases.csv / run.json / panel.npz); no
training runs here.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from benchmark.core.results import experiment_dir, write_cases_csv
from leaderboard import ranking
from leaderboard.stats import holm, paired_wilcoxon, worst_fraction_mean
from leaderboard.markdown import markdown
from leaderboard.table import build_report
from leaderboard.write import write_leaderboard

LABELS = [1, 2, 3, 4, 5]


def _deformable_panel(shape=(20, 18, 16), seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    vol = g.random(shape).astype(np.float32)
    out: dict[str, np.ndarray] = {"kind": np.array("deformable"), "case_id": np.array("c00")}
    for a in range(3):
        sl = [slice(None)] * 3
        sl[a] = shape[a] // 2
        img = vol[tuple(sl)]
        out[f"fixed_ax{a}"] = img
        out[f"moving_ax{a}"] = np.roll(img, 1, axis=0)
        out[f"warped_ax{a}"] = img + 0.05 * g.standard_normal(img.shape).astype(np.float32)
        out[f"disp_ax{a}"] = (0.8 * g.standard_normal((2, *img.shape))).astype(np.float32)
        out[f"jacdet_ax{a}"] = (1.0 + 0.4 * g.standard_normal(img.shape)).astype(np.float32)
    return out


def _pose_panel(seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:40]
    blob = np.exp(-((yy - 16) ** 2 + (xx - 20) ** 2) / 40.0).astype(np.float32)
    return {"kind": np.array("pose"), "case_id": np.array("p00"), "xray": blob + 0.05 * g.random(blob.shape).astype(np.float32),
            "drr_initial": np.roll(blob, 6, axis=1), "drr_final": np.roll(blob, 1, axis=1),
            "mtre_initial_mm": np.array(25.0), "mtre_final_mm": np.array(1.5)}


def _exp(root: Path, ds: str, method: str, seed: int, records: list[dict], status: str = "complete", panel: dict | None = None) -> None:
    d = experiment_dir(root, ds, method, seed)
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.json").write_text(json.dumps({"status": status, "dataset": ds, "method": method, "seed": seed}))
    if records:
        write_cases_csv(d / "cases.csv", records)
    if panel is not None:
        np.savez_compressed(d / "panel.npz", **panel)


def make_results(root: Path, n_cases: int = 10, seeds: tuple[int, ...] = (0, 1), panels: bool = True, pose: bool = True) -> Path:
    """A results folder: deformable dataset ``synth`` (initial, good, fair, flat) and 2D/3D ``spine``.

    ``good`` clearly beats ``fair`` on Dice; ``flat`` has no per-label Dice and no panel;
    one failed experiment is left out.
    """
    g = np.random.default_rng(7)
    base = {"initial": 0.45, "good": 0.82, "fair": 0.70, "flat": 0.69}
    for method, mu in base.items():
        for seed in (seeds[:1] if method == "initial" else seeds):
            recs = []
            for c in range(n_cases):
                per = {str(lab): float(np.clip(mu + 0.04 * g.standard_normal() - 0.02 * lab, 0, 1)) for lab in LABELS}
                rec = {"dataset": "synth", "method": method, "seed": seed, "case_id": f"c{c:02d}", "fixed_id": f"f{c}",
                       "moving_id": f"m{c}", "dice": float(np.mean(list(per.values()))), "hd95": float(8 - 6 * mu + g.random()),
                       "tre": float(6 - 5 * mu + g.random()), "fold_pct": float(0.0 if method == "initial" else abs(0.1 * g.standard_normal())),
                       "sdlogj": float(0.0 if method == "initial" else 0.05 + 0.01 * g.random()), "sdlogj_l2r": 0.01,
                       "ndv_pct": float(0.0 if method == "initial" else 0.01 * g.random()),
                       "runtime_s": float({"initial": 1e-4, "good": 0.05, "fair": 2.0, "flat": 0.5}[method] * (1 + 0.1 * g.random())),
                       "peak_mem_mb": 100.0}
                if method != "flat":
                    rec["dice_per_label"] = per
                recs.append(rec)
            panel = _deformable_panel(seed=len(method)) if panels and method != "flat" and seed == seeds[0] else None
            _exp(root, "synth", method, seed, recs, panel=panel)
    _exp(root, "synth", "broken", 0, [], status="failed")
    if pose:
        for method, scale in {"initial": 30.0, "cdreg": 1.5, "cmaes": 6.0}.items():
            recs = []
            for c in range(n_cases):
                m = float(scale * np.exp(0.5 * g.standard_normal()))
                recs.append({"dataset": "spine", "method": method, "seed": 0, "case_id": f"p{c:02d}", "fixed_id": f"x{c}",
                             "moving_id": "ct0", "mtre_mm": m, "ptre_mm": 0.8 * m, "rot_err_deg": m / 5, "trans_err_mm": m * 0.9,
                             "success_10mm": float(m < 10), "success_2mm": float(m < 2),
                             "runtime_s": {"initial": 1e-4, "cdreg": 0.3, "cmaes": 3.0}[method], "peak_mem_mb": 50.0,
                             "mtre_initial_mm": 30.0})
            _exp(root, "spine", method, 0, recs, panel=_pose_panel() if panels else None)
    return root


# ----------------------------------------------------------------------------- rank scores
def test_rank_scores_match_hand_computation_with_ties_and_missing_metric():
    # Metric 1 (Dice, higher better): A well above B and C; B and C the same distribution
    # (no significant difference) -> tie; D has no value -> 0.1 and placed lowest.
    a = np.linspace(0.80, 0.90, 12)
    b = np.linspace(0.50, 0.60, 12)
    c = b[::-1].copy()
    samples = {"A": a, "B": b, "C": c, "D": None}
    wins, better = ranking.pairwise_wins(samples, higher_is_better=True)
    assert wins == {"A": 2, "B": 0, "C": 0, "D": None}
    # independent check of one comparison: scipy's rank-sum z and p
    z, p = st.ranksums(a, b)
    assert z > 0 and p < 0.05 and better[0, 1] == 1
    s1 = ranking.rank_scores_from_wins(wins)
    # N = 4 -> scale 0.1, 0.4, 0.7, 1.0 ; order D(0) < B,C (positions 1,2 -> mean 0.55) < A (3)
    assert s1 == pytest.approx({"A": 1.0, "B": 0.55, "C": 0.55, "D": 0.1})
    # Metric 2 (HD95, lower better): D best, then A, then B, C worst.
    hd = {"A": np.linspace(3, 4, 12), "B": np.linspace(5, 6, 12), "C": np.linspace(7, 8, 12), "D": np.linspace(1, 2, 12)}
    s2 = ranking.rank_scores(hd, higher_is_better=False)
    assert s2 == pytest.approx({"D": 1.0, "A": 0.7, "B": 0.4, "C": 0.1})
    # Through rank_dataset: per-case dicts, geometric mean with and without runtime.
    cv = {"dice": {m: ({} if v is None else {f"c{i}": x for i, x in enumerate(v)}) for m, v in samples.items()},
          "hd95": {m: {f"c{i}": x for i, x in enumerate(v)} for m, v in hd.items()},
          "runtime_s": {m: {f"c{i}": t for i in range(12)} for m, t in {"A": 1.0, "B": 1.0, "C": 1.0, "D": 1.0}.items()}}
    res = ranking.rank_dataset(cv, ["dice", "hd95"], ["A", "B", "C", "D"], initial=None)
    expect = {"A": math.sqrt(1.0 * 0.7), "B": math.sqrt(0.55 * 0.4), "C": math.sqrt(0.55 * 0.1), "D": math.sqrt(0.1 * 1.0)}
    for m, v in expect.items():
        assert res[m]["rank_score"] == pytest.approx(v)
        # equal runtimes: nobody beats anybody -> all share the mean of the scale, 0.55
        assert res[m]["runtime_s"] == pytest.approx(0.55)
        assert res[m]["rank_score_rt"] == pytest.approx((res[m]["dice"] * res[m]["hd95"] * 0.55) ** (1 / 3))
    # A metric nobody has (TRE) is left out of the geometric mean.
    res2 = ranking.rank_dataset({**cv, "tre": {m: {} for m in "ABCD"}}, ["dice", "hd95", "tre"], list("ABCD"), initial=None)
    assert "tre" not in res2["A"] and res2["A"]["rank_score"] == pytest.approx(expect["A"])


def test_rank_scores_single_method_and_all_tied():
    assert ranking.rank_scores_from_wins({"X": 0}) == {"X": 1.0}
    same = ranking.rank_scores_from_wins({"a": 0, "b": 0, "c": 0})
    assert all(v == pytest.approx(0.55) for v in same.values())


def test_robust_dice_uses_hardest_initial_pairs():
    init = {"c0": {"1": 0.1, "2": 0.9}, "c1": {"1": 0.2, "2": 0.8}, "c2": {"1": 0.95, "2": 0.7}}
    m = {"c0": {"1": 0.5, "2": 0.99}, "c1": {"1": 0.6, "2": 0.98}, "c2": {"1": 0.97, "2": 0.96}}
    dice = {"initial": {"c0": 0.5, "c1": 0.5, "c2": 0.8}, "m": {"c0": 0.7, "c1": 0.8, "c2": 0.9}}
    out = ranking.robust_dice_samples(dice, {"initial": init, "m": m})
    # 6 pairs, 30 % -> 2 hardest before registration: (c0,1)=0.1 and (c1,1)=0.2
    assert out["m"].tolist() == [0.5, 0.6] and out["initial"].tolist() == [0.1, 0.2]
    # a method without per-label Dice: everyone on cases, 30 % of 3 -> the 1 hardest case (c0 or c1 at 0.5: c0)
    out = ranking.robust_dice_samples({**dice, "n": {"c0": 0.6, "c1": 0.6, "c2": 0.6}}, {"initial": init, "m": m})
    assert out["m"].tolist() == [0.7] and out["n"].tolist() == [0.6]
    # no initial row: each method's own worst 30 %
    out = ranking.robust_dice_samples({"m": dice["m"]}, {}, initial=None)
    assert out["m"].tolist() == [0.7]
    # the same case count as the tables' "worst 30 %": ceil(0.3 · 8) = 3, not round(2.4) = 2
    eight = {f"c{i}": v for i, v in enumerate([0.8, 0.3, 0.9, 0.1, 0.7, 0.2, 0.6, 0.5])}
    out = ranking.robust_dice_samples({"initial": eight, "m": eight}, {}, initial="initial")
    assert out["m"].tolist() == [0.1, 0.2, 0.3]
    assert ranking.robust_dice_samples({"m": eight}, {}, initial=None)["m"].mean() == pytest.approx(
        worst_fraction_mean(list(eight.values()), True))
    assert worst_fraction_mean([0.9, 0.1, 0.5, 0.3, 0.7, 0.8, 0.2, 0.6, 0.4, 1.0], True) == pytest.approx(0.2)
    assert worst_fraction_mean([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], False) == pytest.approx(9.0)


# ----------------------------------------------------------------------------- Holm
def test_holm_on_known_pvalues():
    p = [0.01, 0.04, 0.03, 0.005]
    # hand: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04
    # running max -> 0.02, 0.03, 0.06, 0.06 ; back to input order:
    assert holm(p).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1, NaN kept and not counted
    out = holm([0.5, math.nan, 0.4])
    assert out[0] == pytest.approx(0.8) and math.isnan(out[1]) and out[2] == pytest.approx(0.8)
    assert holm([0.3, 0.6]).tolist() == pytest.approx([0.6, 0.6])
    assert holm([]).size == 0
    sm = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(0)
    q = rng.random(9) ** 3
    assert holm(q) == pytest.approx(sm.multipletests(q, method="holm")[1])


def test_paired_wilcoxon_matches_scipy_and_edge_cases():
    rng = np.random.default_rng(3)
    a = rng.normal(0.8, 0.05, 15)
    b = a - rng.normal(0.03, 0.02, 15)
    p, n = paired_wilcoxon(a, b)
    assert n == 15 and p == pytest.approx(st.wilcoxon(a, b).pvalue)
    assert paired_wilcoxon(a, a) == (1.0, 15)
    assert math.isnan(paired_wilcoxon([1.0], [2.0])[0])
    a2 = a.copy()
    a2[0] = math.nan
    assert paired_wilcoxon(a2, b)[1] == 14


# ----------------------------------------------------------------------------- tables
def test_markers_bold_best_and_columns(tmp_path):
    root = make_results(tmp_path / "res")
    rep = build_report(root)
    synth = next(d for d in rep.datasets if d.name == "synth")
    assert synth.kind == "deformable" and [m.method for m in synth.methods][0] == "initial"
    assert synth.best["dice"] == "good"
    fair = synth.method("fair")
    # independent significance: Wilcoxon signed-rank on the seed-averaged cases, Holm over fair & flat
    def case_means(method):
        rows = [r for r in synth.rows if r["method"] == method]
        return {c: np.mean([r["dice"] for r in rows if r["case_id"] == c]) for c in sorted({r["case_id"] for r in rows})}
    g, f, fl = case_means("good"), case_means("fair"), case_means("flat")
    ids = sorted(g)
    p_f = st.wilcoxon([f[c] for c in ids], [g[c] for c in ids]).pvalue
    p_fl = st.wilcoxon([fl[c] for c in ids], [g[c] for c in ids]).pvalue
    m_ = sorted([p_f, p_fl])
    adj = {p_f: None, p_fl: None}
    adj_sorted = [min(1, 2 * m_[0]), min(1, max(2 * m_[0], m_[1]))]
    adj[m_[0]], adj[m_[1]] = adj_sorted
    assert fair.stats["dice"]["p_holm"] == pytest.approx(adj[p_f])
    assert fair.stats["dice"]["significant"] == 1.0
    md = markdown(rep)
    row = next(l for l in md.splitlines() if l.startswith("| good |"))
    assert "**" in row.split("|")[4]  # Dice cell of the best is bold
    fair_row = next(l for l in md.splitlines() if l.startswith("| fair |"))
    assert fair_row.split("|")[4].strip().endswith("*") and "**" not in fair_row.split("|")[4]
    assert "Per seed:" in md and "std of seed means" in md
    assert "synth/broken/seed0: failed" in md
    # ranking: good beats fair and flat on Dice and robust Dice
    assert good_beats(synth)
    spine = next(d for d in rep.datasets if d.name == "spine")
    assert spine.kind == "pose"
    assert "mTRE p50 mm" in md and "success <10 mm" in md
    spine_rows = [l for l in md.split("## spine")[1].splitlines() if l.startswith("| ")]
    assert spine_rows[2].startswith("| initial |")  # header, rule, then initial first
    assert spine.method("cdreg").ranks["rank_score"] > spine.method("cmaes").ranks["rank_score"]


def good_beats(ds) -> bool:
    g, f = ds.method("good").ranks, ds.method("fair").ranks
    return g["dice"] > f["dice"] and g["dice_robust30"] > f["dice_robust30"] and g["rank_score"] > f["rank_score"]


def test_csv_keeps_v1_columns_and_adds_ranks(tmp_path):
    root = make_results(tmp_path / "res", pose=True)
    write_leaderboard(root, formats="md,csv")
    rows = list(csv.DictReader(open(root / "leaderboard.csv")))
    cols = rows[0].keys()
    for m in ("dice", "hd95", "tre", "fold_pct", "sdlogj", "ndv_pct", "runtime_s"):
        for s in ("mean", "std", "median"):
            assert f"{m}_{s}" in cols
    for c in ("rank_score", "rank_score_rt", "dice_robust30", "dice_p_holm", "mtre_mm_p95", "kind"):
        assert any(c in k for k in cols), c
    good = next(r for r in rows if r["method"] == "good")
    assert int(good["n_seeds"]) == 2 and int(good["n_cases"]) == 20 and float(good["dice_seed_std"]) >= 0
    assert not (root / "leaderboard.html").exists()


# ----------------------------------------------------------------------------- LaTeX
def test_latex_booktabs_and_bold_best(tmp_path):
    from leaderboard.latex import escape, latex

    root = make_results(tmp_path / "res")
    tex = latex(build_report(root), standalone=True)
    assert "\\usepackage{booktabs}" in tex
    envs = re.findall(r"\\begin\{tabular\}\{([lr]+)\}(.*?)\\end\{tabular\}", tex, flags=re.S)
    assert len(envs) >= 3
    for spec, body in envs:
        lines = [l for l in body.strip().splitlines()]
        assert lines[0] == "\\toprule" and lines[2] == "\\midrule" and lines[-1] == "\\bottomrule"
        for l in [lines[1]] + lines[3:-1]:
            assert l.endswith("\\\\")
            assert l.count(" & ") == len(spec) - 1, l  # every row has every column
    assert tex.count("\\begin{table}") == tex.count("\\end{table}")
    assert tex.count("{") == tex.count("}") + tex.count("\\{") - tex.count("\\}")
    good_line = next(l for l in tex.splitlines() if l.startswith("good &"))
    assert "\\textbf{" in good_line.split(" & ")[3]
    assert "$^{*}$" in next(l for l in tex.splitlines() if l.startswith("fair &"))
    assert escape("a_b & 5% #1") == "a\\_b \\& 5\\% \\#1"


# ----------------------------------------------------------------------------- HTML
def test_html_has_every_section_and_no_external_url(tmp_path):
    from leaderboard.html import SECTIONS

    root = make_results(tmp_path / "res")
    write_leaderboard(root, formats=["md", "html", "tex"])
    page = (root / "leaderboard.html").read_text()
    for sid, _ in SECTIONS:
        assert f'<section id="{sid}">' in page
    # a dataset appears in the sections where it has data (synth: no mTRE; spine: no Dice,
    # HD95, TRE, per-label Dice or Dice vs fold)
    assert page.count('data-dataset="synth"') == len(SECTIONS) - 2  # left-out lists experiments, not datasets
    assert page.count('data-dataset="spine"') == len(SECTIONS) - 4  # and none in left-out
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, flags=re.I)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    imgs = re.findall(r'<img alt="([^"]*)" width="(\d+)" height="(\d+)" src="data:image/png;base64,', page)
    alts = [a for a, _, _ in imgs]
    for needed in ("synth: Dice box plots", "synth: Dice vs fold %", "synth: runtime", "synth: Dice per label",
                   "synth: qualitative panel", "spine: X-ray and DRRs", "spine: mTRE", "spine: runtime"):
        assert needed in alts, needed
    # absent parts are said in one line of the section, not as empty blocks
    assert "Not shown for: spine (no per-case Dice, HD95, TRE or EPE values)" in page
    assert "Not shown for: synth (not a 2D/3D dataset)" in page and "No panel.npz for: flat" in page
    assert (root / "leaderboard.tex").exists()


def test_html_when_nothing_is_complete(tmp_path):
    from leaderboard.html import SECTIONS

    root = tmp_path / "empty"
    _exp(root, "synth", "m", 0, [], status="failed")
    md = write_leaderboard(root, formats="md,csv,tex,html")
    page = (root / "leaderboard.html").read_text()
    # only the sections with something to say: the tables (saying there is nothing) and the left-out list
    assert [sid for sid, _ in SECTIONS if f'<section id="{sid}">' in page] == ["tables", "left-out"]
    assert "No complete experiment" in page and "synth/m/seed0: failed" in md.read_text()


def test_unlabelled_dataset_nan_dice(tmp_path):
    root = tmp_path / "res"
    for method in ("initial", "a", "b"):
        recs = [{"dataset": "lumir", "method": method, "seed": 0, "case_id": f"c{c}", "fixed_id": "f", "moving_id": "m",
                 "dice": math.nan, "hd95": math.nan, "tre": math.nan, "fold_pct": 0.1 * c, "sdlogj": 0.05 + 0.01 * c,
                 "ndv_pct": 0.0, "runtime_s": 0.1} for c in range(5)]
        _exp(root, "lumir", method, 0, recs)
    write_leaderboard(root, formats="md,csv,tex,html")
    page = (root / "leaderboard.html").read_text()
    # no Dice / HD95 / TRE and no panel: those sections are left out (sections only with data)
    assert '<section id="distributions">' not in page and '<section id="qualitative">' not in page
    assert '<section id="dice-vs-fold">' not in page and '<section id="runtime">' in page
    rep = build_report(root)
    assert rep.datasets[0].rank_metrics == ["sdlogj"]


# ----------------------------------------------------------------------------- CLI
def test_cli_leaderboard_formats(tmp_path, capsys):
    import argparse

    from leaderboard.cli import add_cli_commands

    root = make_results(tmp_path / "res", pose=False, panels=False)
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_cli_commands(sub)
    args = p.parse_args(["leaderboard", str(root), "--format", "md,tex", "--rank-metrics", "dice,hd95"])
    assert args.func(args) == 0
    assert (root / "leaderboard.tex").exists() and not (root / "leaderboard.html").exists()
    out = capsys.readouterr().out
    assert "# Leaderboard" in out and "Rank scores per metric (dice, hd95, runtime_s)" in out
    rep = build_report(root, {"deformable": ["dice", "hd95"]})
    assert rep.datasets[0].rank_metrics == ["dice", "hd95"]
    args = p.parse_args(["leaderboard", str(root), "--format", "pdf"])
    assert args.func(args) == 2
    # a folder with no experiments (a dataset folder inside the results, say): exit 2, and no
    # empty leaderboard written there
    inner = next(d for d in root.iterdir() if d.is_dir())
    capsys.readouterr()
    args = p.parse_args(["leaderboard", str(inner), "--format", "md"])
    assert args.func(args) == 2 and not (inner / "leaderboard.md").exists()
    assert "no experiments" in capsys.readouterr().err


# ----------------------------------------------------------------------------- wandb
def test_wandb_tables_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from leaderboard.wandb_tables import log_leaderboard_wandb, log_tables

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = make_results(tmp_path / "res", panels=False)
    exp = experiment_dir(root, "synth", "good", 0)
    import wandb

    logger = WandbLogger(project="regbench-test", offline=True, save_dir=str(tmp_path / "wb"), name="t")
    n = log_tables([CSVLogger(str(tmp_path / "csv")), logger], exp)
    assert n == 1
    wandb.finish()
    tables = list((tmp_path / "wb").rglob("cases_*.table.json"))
    assert tables, "no cases table in the offline run"
    t = json.loads(tables[0].read_text())
    assert "dice" in t["columns"] and len(t["data"]) == 10
    run_dir = log_leaderboard_wandb(root, {"project": "regbench-test", "save_dir": str(tmp_path / "wb2")})
    assert run_dir is not None
    lb = list((tmp_path / "wb2").rglob("leaderboard_*.table.json"))
    assert {p.name.split("_")[1] for p in lb} >= {"synth", "spine"}
    assert log_tables([CSVLogger(str(tmp_path / "csv2"))], exp) == 0


def test_ids_missing_from_cases_come_from_the_folder(tmp_path):
    root = tmp_path / "res"
    recs = [{"case_id": f"c{c}", "fixed_id": "f", "moving_id": "m", "dice": 0.5 + 0.01 * c, "runtime_s": 0.1} for c in range(4)]
    _exp(root, "ds", "m1", 3, recs)
    rep = build_report(root)
    assert rep.datasets[0].name == "ds"
    ms = rep.datasets[0].method("m1")
    assert ms.seeds == [3] and ms.n_cases == 4


def _shifted_results(root: Path, n_cases: int, shifts: dict[str, float]) -> np.ndarray:
    g = np.random.default_rng(3)
    init = 0.5 + 0.05 * g.standard_normal(n_cases)
    for method, shift in [("initial", None), *shifts.items()]:
        recs = []
        for c in range(n_cases):
            d = init[c] if shift is None else init[c] + shift + (0.01 * g.standard_normal() if shift else 0.0)
            recs.append({"dataset": "synth", "method": method, "seed": 0, "case_id": f"c{c:02d}", "fixed_id": f"f{c}",
                         "moving_id": f"m{c}", "dice": float(d), "hd95": 5.0, "tre": 3.0, "fold_pct": 0.0, "sdlogj": 0.05,
                         "sdlogj_l2r": 0.01, "ndv_pct": 0.0, "runtime_s": 0.1, "peak_mem_mb": 100.0})
        _exp(root, "synth", method, 0, recs)
    return init


def test_too_few_cases_for_the_paired_test_is_said_not_read_as_no_change(tmp_path):
    """5 pairs, 2 ranked methods: the smallest Holm p is 2 · 2/2⁵ = 0.125, so even a method
    better on every case cannot be significant; the tables say so."""
    _shifted_results(tmp_path / "res", 5, {"better": 0.05, "same": 0.0})
    rep = build_report(tmp_path / "res")
    st_ = rep.datasets[0].method("better").stats["dice"]
    assert st_["init_p_min"] == pytest.approx(0.125) and st_["init_p_holm"] >= 0.125
    md = markdown(rep)
    table = md.split("Change from no registration")[1].split("\n\n")[1]
    assert "too few cases to test" in table.splitlines()[2] and "improves" not in table


def test_change_from_initial_is_paired_holm_and_says_when_no_change_is_shown(tmp_path):
    """The "vs initial" table: Wilcoxon on seed-averaged cases against ``initial`` (scipy),
    Holm over the ranked methods, a signed difference; a method equal to initial is not
    reported as an improvement."""
    root = tmp_path / "res"
    shifts = {"better": 0.05, "same": 0.0, "worse": -0.04}
    _shifted_results(root, 10, shifts)
    rep = build_report(root)
    synth = rep.datasets[0]
    dice = {m: [r["dice"] for r in sorted(synth.rows, key=lambda r: r["case_id"]) if r["method"] == m]
            for m in ("initial", *shifts)}
    raw = {m: st.wilcoxon(dice[m], dice["initial"]).pvalue if m != "same" else 1.0 for m in ("better", "worse")}
    adj = dict(zip(raw, holm(list(raw.values()) + [1.0])[:2]))
    for m in ("better", "worse"):
        s = synth.method(m).stats["dice"]
        assert s["init_p_holm"] == pytest.approx(adj[m])
        assert s["init_diff"] == pytest.approx(np.mean(np.subtract(dice[m], dice["initial"])))
        assert s["init_diff_lo"] < s["init_diff"] < s["init_diff_hi"]
    md = markdown(rep)
    table = md.split("Change from no registration")[1].split("\n\n")[1]
    rows = {l.split("|")[1].strip(): l.split("|")[2] for l in table.splitlines()[2:]}
    assert "improves" in rows["better"] and "worsens" in rows["worse"]
    assert "no change shown" in rows["same"] and "initial" not in rows


def test_too_few_cases_counts_only_the_pairs_the_test_ranks():
    """10 shared case ids but only 3 finite values (TRE missing elsewhere) and one tie: the
    test ranks 2 pairs, whose smallest two-sided p is 2/2² = 0.5, so the verdict is "too few
    cases to test", not "not distinguishable"."""
    from leaderboard.table import _diff_cell, _paired_against

    ref = {f"c{i}": 1.0 for i in range(10)}
    m = {f"c{i}": (2.0 + i if i < 2 else 1.0 if i == 2 else math.nan) for i in range(10)}
    st_ = _paired_against({"best": ref, "m": m}, "best", ["m"])["m"]
    assert st_["p_min"] == pytest.approx(0.5)
    assert _diff_cell(st_, "tre", "", ("better", "worse", "not distinguishable")).endswith("too few cases to test")
    same = _paired_against({"best": ref, "m": dict(ref)}, "best", ["m"])["m"]  # identical: nothing too few
    assert same["p_min"] == pytest.approx(2.0 ** -9)


def test_a_verdict_needs_the_test_and_the_interval_to_agree():
    """B is higher on 11 of 12 cases by 0.01 and lower on one by 0.5: the signed-rank test is
    significant (for B), the mean difference is negative and its CI spans 0. That is no claim
    either way (the cell said "worse"). No finite pair: "no data" (it said "too few cases")."""
    from scipy.stats import wilcoxon

    from leaderboard.table import _diff_cell, _paired_against

    a = {f"c{i}": 0.70 + 0.01 * i for i in range(12)}
    b = {c: v + (0.01 if i else -0.5) for i, (c, v) in enumerate(a.items())}
    assert wilcoxon(list(b.values()), list(a.values())).pvalue < 0.05  # the independent test
    st_ = _paired_against({"A": a, "B": b}, "A", ["B"])["B"]
    assert st_["diff"] < 0 < st_["diff_hi"] and st_["significant"] == 0.0 and st_["disagree"] == 1.0
    cell = _diff_cell(st_, "dice", "", ("better", "worse", "not distinguishable"))
    assert cell.endswith(", n=12: test and CI disagree"), cell
    clear = _paired_against({"A": a, "B": {c: v + 0.01 for c, v in a.items()}}, "A", ["B"])["B"]
    assert _diff_cell(clear, "dice", "", ("better", "worse", "not distinguishable")).endswith("n=12: better")
    assert _diff_cell(clear, "hd95", "", ("better", "worse", "not distinguishable")).endswith("n=12: worse")
    none = _paired_against({"A": a, "B": {c: math.nan for c in a}}, "A", ["B"])["B"]
    assert _diff_cell(none, "hd95", "", ("better", "worse", "not distinguishable")) == "no data"


def test_label_heatmap_writes_one_for_a_dice_that_rounds_to_one(monkeypatch):
    """0.997 printed as ".00" (the leading digit of "1.00" was dropped as if it were a 0)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from leaderboard import plots

    texts: list[str] = []
    real = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **k: (texts.append(s), real(self, x, y, s, *a, **k))[1])

    class Method:
        method = "A"

    class DS:
        name = "d"
        per_label = {"A": {"1": 0.997, "2": 0.62}}
        methods = [Method()]

    assert plots.label_heatmap(DS()) is not None
    assert "1.00" in texts and ".62" in texts and ".00" not in texts
