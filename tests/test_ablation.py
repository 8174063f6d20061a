"""Variants in grid configs and the ablation tables.

Independent truths: ``scipy.stats.wilcoxon`` for the paired tests, Holm's step-down
correction written out by hand for two hypotheses, ``scipy.stats.bootstrap`` (percentile) for
the effect size's CI, and the hand-computed mean paired difference of a constructed example.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as st

from benchmark.core.results import read_cases_csv, write_cases_csv
from benchmark.runner import ConfigError, config_hash, load_grid_config, run_grid
from benchmark.variants import expand_variants
from leaderboard.ablation import ablation_tables, bootstrap_mean_ci
from leaderboard.html import ablation_sections
from leaderboard.markdown import markdown_sections
from leaderboard.table import build_report
from leaderboard.write import write_leaderboard

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SMALL_DATA = {"class_path": "datamodules.SyntheticBrainDataModule",
              "init_args": {"size": 16, "n_train": 2, "n_val": 2, "n_test": 3, "seed": 3}}
TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "num_sanity_val_steps": 0}


def _cfg(methods: dict) -> dict:
    return {"suite": "abl", "seeds": [0], "trainer": dict(TRAINER), "datasets": {"synth": SMALL_DATA}, "methods": methods}


def _write(tmp_path: Path, cfg: dict, name: str = "grid.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("REGBENCH_KILL_AFTER", None)
    return env


def _regbench(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmark.cli", *args], env=env or _env(), capture_output=True, text=True,
                          timeout=300, cwd=str(ROOT))


# ----------------------------------------------------------------------------- expansion
VM = {"class_path": "systems.VoxelMorph", "init_args": {"lambda_": 1.0, "int_steps": 7}, "trainer": {"max_steps": 3}}


def test_variants_expand_with_names_overrides_and_distinct_hashes(tmp_path):
    methods = {"vm": {**VM, "variants": {"smooth": {"init_args": {"lambda_": 5.0}},
                                          "noint": {"init_args": {"int_steps": 0}, "trainer": {"max_steps": 5}}}}}
    cfg = load_grid_config(_write(tmp_path, _cfg(methods)))
    assert list(cfg.methods) == ["vm", "vm-smooth", "vm-noint"]
    base, smooth, noint = (cfg.methods[k] for k in ("vm", "vm-smooth", "vm-noint"))
    assert base.variant_of is None and (smooth.variant_of, smooth.variant) == ("vm", "smooth")
    assert smooth.init_args == {"lambda_": 5.0, "int_steps": 7} and smooth.trainer == {"max_steps": 3}
    assert noint.init_args == {"lambda_": 1.0, "int_steps": 0} and noint.trainer == {"max_steps": 5}
    assert base.init_args == VM["init_args"]  # the base (full method) is untouched
    assert noint.build().hparams.int_steps == 0
    from benchmark.runner import Experiment, experiment_config

    hashes = {n: config_hash(experiment_config(cfg, Experiment(cfg.datasets["synth"], b, n, 0))[0])
              for n, b in cfg.methods.items()}
    assert len(set(hashes.values())) == 3
    # a base without variants keeps the hash it had before variants existed
    plain = load_grid_config(_write(tmp_path, _cfg({"vm": VM}), "plain.yaml"))
    blk = plain.methods["vm"]
    assert config_hash(experiment_config(plain, Experiment(plain.datasets["synth"], blk, "vm", 0))[0]) == hashes["vm"]


@pytest.mark.parametrize("variants, key", [
    ({"bad-name": {}}, "methods.vm.variants.bad-name"),
    ({"v": {"init_args": {"lamda": 1}}}, "methods.vm.variants.v.init_args.lamda"),
    ({"v": {"initargs": {}}}, "methods.vm.variants.v.initargs"),
    ({"v": {"trainer": {"max_stepz": 1}}}, "methods.vm.variants.v.trainer.max_stepz"),
    ({"v": ["x"]}, "methods.vm.variants.v"),
    ({"x": {}}, "methods.vm.variants.x"),  # collides with the method vm-x
])
def test_bad_variants_name_the_key(tmp_path, variants, key):
    methods = {"vm": {**VM, "variants": variants}, "vm-x": VM}
    with pytest.raises(ConfigError) as exc:
        load_grid_config(_write(tmp_path, _cfg(methods)))
    assert key in str(exc.value)


def test_expand_variants_leaves_the_input_alone():
    raw = {"a": {"class_path": "x.Y", "init_args": {"k": [1, 2]}, "variants": {"v": {"init_args": {"k": [3]}}}}}
    before = json.dumps(raw, sort_keys=True)
    out, origin = expand_variants(raw)
    assert json.dumps(raw, sort_keys=True) == before
    assert out["a-v"]["init_args"] == {"k": [3]} and "variants" not in out["a"] and origin == {"a-v": ("a", "v")}


@pytest.mark.slow
def test_each_variant_resumes_on_its_own(tmp_path):
    """Killed inside the second variant: a re-run skips the base and the finished variant,
    keeps the killed variant's finished cases, and a changed override redoes only that variant."""
    killer = {"class_path": "regbench_test_helpers.KillAfter", "init_args": {"shift": 0.0},
              "variants": {"half": {"init_args": {"shift": 0.5}}, "one": {"init_args": {"shift": 1.0}}}}
    out = tmp_path / "out"
    path = _write(tmp_path, _cfg({"k": killer}))
    env = _env()
    env["REGBENCH_KILL_AFTER"] = "15"  # 6 cases per experiment: killed after 3 cases of k-one
    first = _regbench(["run", str(path), "--output", str(out)], env=env)
    assert first.returncode == -9, first.stderr[-2000:]
    runs = {m: json.loads((out / "synth" / m / "seed0" / "run.json").read_text()) for m in ("k", "k-half", "k-one")}
    assert [runs[m]["status"] for m in ("k", "k-half", "k-one")] == ["complete", "complete", "running"]
    assert runs["k-half"]["config"]["method"]["variant_of"] == "k"
    assert len({r["config_hash"] for r in runs.values()}) == 3
    log: list[str] = []
    statuses = run_grid(path, output=str(out), log=log.append)  # in process: the kill is over
    assert set(statuses.values()) == {"complete"}
    assert sum("[skip]" in ln for ln in log) == 3  # initial, k, k-half
    run = json.loads((out / "synth" / "k-one" / "seed0" / "run.json").read_text())
    assert run["status"] == "complete" and run["attempts"][-1]["cases_resumed"] == 3
    # variants differ in what they compute (shift 0, 0.5, 1 voxel: Dice falls)
    dice = {m: np.mean([r["dice"] for r in read_cases_csv(out / "synth" / m / "seed0" / "cases.csv")]) for m in ("k", "k-half", "k-one")}
    assert dice["k"] > dice["k-half"] > dice["k-one"]
    # the report holds the ablation table of k
    md = (out / "leaderboard.md").read_text()
    assert "## Ablations" in md and "### synth: k" in md and "| k-half |" in md and "| k-one |" in md
    assert 'id="ablations"' in (out / "leaderboard.html").read_text()
    # one changed override: only that variant is recomputed
    killer["variants"]["half"]["init_args"]["shift"] = 0.25
    path = _write(tmp_path, _cfg({"k": killer}))
    log.clear()
    run_grid(path, output=str(out), log=log.append, leaderboard=False)
    assert sum("[skip]" in ln for ln in log) == 3
    assert [ln for ln in log if "[redo]" in ln] and all("k-half" in ln for ln in log if "[redo]" in ln)


# ----------------------------------------------------------------------------- statistics
def _write_exp(root: Path, dataset: str, method: str, seed: int, rows: list[dict], variant_of: str | None = None) -> None:
    exp = root / dataset / method / f"seed{seed}"
    exp.mkdir(parents=True)
    m = {"name": method, "class_path": "x.Y"}
    if variant_of:
        m.update({"variant_of": variant_of, "variant": method.split("-", 1)[1]})
    (exp / "run.json").write_text(json.dumps({"status": "complete", "config": {"method": m}}))
    write_cases_csv(exp / "cases.csv", [{"dataset": dataset, "method": method, "seed": seed, **r} for r in rows])


def _example(tmp_path: Path) -> tuple[Path, dict]:
    """Full method ``m``; ``m-a`` loses about 0.05 Dice and gains EPE; ``m-b`` differs by noise.

    Two seeds per experiment: the paired value of a case is its mean over the seeds.
    """
    g = np.random.default_rng(7)
    n = 12
    cases = [f"c{i:02d}" for i in range(n)]
    full = 0.70 + 0.05 * g.standard_normal((2, n))
    val = {"m": full, "m-a": full - 0.05 + 0.01 * g.standard_normal((2, n)), "m-b": full + 0.02 * g.standard_normal((2, n))}
    epe = {"m": 1.0 + 0.2 * g.random((2, n))}
    epe["m-a"] = epe["m"] + 0.3 + 0.05 * g.standard_normal((2, n))
    epe["m-b"] = epe["m"] + 0.05 * g.standard_normal((2, n))
    for m in val:
        for s in (0, 1):
            rows = [{"case_id": c, "dice": float(val[m][s, i]), "epe_mm": float(epe[m][s, i]), "fold_pct": 0.0}
                    for i, c in enumerate(cases)]
            _write_exp(tmp_path, "d", m, s, rows, variant_of="m" if m != "m" else None)
    _write_exp(tmp_path, "d", "initial", 0, [{"case_id": c, "dice": 0.5, "epe_mm": 2.0, "fold_pct": 0.0} for c in cases])
    means = {k: {m: v.mean(axis=0) for m, v in d.items()} for k, d in (("dice", val), ("epe_mm", epe))}
    return tmp_path, means


def test_ablation_table_statistics_match_scipy_and_hand_holm(tmp_path):
    root, means = _example(tmp_path)
    tables = ablation_tables(build_report(root), n_boot=4000)
    assert len(tables) == 1
    t = tables[0]
    assert (t.dataset, t.method, t.variants, t.metrics) == ("d", "m", ["m-a", "m-b"], ["dice", "epe_mm"])
    for key in ("dice", "epe_mm"):
        full = means[key]["m"]
        raw = [st.wilcoxon(means[key][v], full).pvalue for v in ("m-a", "m-b")]
        lo, hi = sorted(range(2), key=lambda i: raw[i])
        holm = [0.0, 0.0]
        holm[lo] = min(1.0, 2 * raw[lo])
        holm[hi] = min(1.0, max(holm[lo], raw[hi]))
        for i, v in enumerate(("m-a", "m-b")):
            r = t.rows[key][i]
            d = means[key][v] - full
            assert r.n == 12 and r.diff == pytest.approx(d.mean(), abs=1e-12)
            assert r.full_mean == pytest.approx(full.mean()) and r.variant_mean == pytest.approx(means[key][v].mean())
            assert r.p_raw == pytest.approx(raw[i], rel=1e-9) and r.p_holm == pytest.approx(holm[i], rel=1e-9)
            ref = st.bootstrap((d,), np.mean, method="percentile", n_resamples=20000, random_state=1).confidence_interval
            width = ref.high - ref.low
            assert r.ci[0] == pytest.approx(ref.low, abs=0.08 * width) and r.ci[1] == pytest.approx(ref.high, abs=0.08 * width)
            assert r.ci[0] < r.diff < r.ci[1]
        a, b = t.rows[key]
        assert a.significant and not b.significant  # 12 cases all one way: exact p = 2/4096, x2 by Holm
    md = "\n".join(markdown_sections(build_report(root)))
    assert "### d: m" in md and "no significant effect: m-b" in md and "significant: a (Dice Δ -0.05" in md
    page = ablation_sections(build_report(root))
    assert 'data-method="m"' in page and "<sup>*</sup>" in page


def test_bootstrap_ci_edge_cases():
    assert bootstrap_mean_ci([0.3] * 6) == (pytest.approx(0.3), pytest.approx(0.3))
    assert all(math.isnan(x) for x in bootstrap_mean_ci([1.0]))
    lo, hi = bootstrap_mean_ci(np.arange(10.0))
    assert lo < 4.5 < hi and bootstrap_mean_ci(np.arange(10.0)) == (lo, hi)  # seeded: reproducible


def test_variant_without_its_full_method_is_left_out(tmp_path):
    _write_exp(tmp_path, "d", "m-a", 0, [{"case_id": "c0", "dice": 0.5}], variant_of="m")
    _write_exp(tmp_path, "d", "n", 0, [{"case_id": "c0", "dice": 0.6}])
    assert ablation_tables(build_report(tmp_path)) == []
    md = write_leaderboard(tmp_path).read_text()
    assert "Ablations" not in md


# ----------------------------------------------------------------------------- divergence
def _diverged_example(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """``m`` (seeds 0, 1) fine; ``m-a`` blows up in seed 1 only (Dice NaN on one case, EPE
    1e5 mm on the others); ``m-b`` blows up in both seeds; case ``c11`` has no labels (every
    Dice NaN, the initial's too), which is not divergence; ``m-c`` has EPE 45 mm on one case
    (< 10 × max(2, 5) mm: poor, not diverged)."""
    g = np.random.default_rng(3)
    n = 12
    cases = [f"c{i:02d}" for i in range(n)]
    dice = {m: 0.7 + 0.05 * g.standard_normal((2, n)) for m in ("m", "m-a", "m-b", "m-c")}
    epe = {m: 1.0 + 0.2 * g.random((2, n)) for m in dice}
    for d in dice.values():
        d[:, -1] = np.nan
    dice["m-a"][0] += 0.2  # its surviving seed has the highest Dice of all
    dice["m-a"][1, 0] = np.nan
    epe["m-a"][1, 1:] = 1e5
    epe["m-b"][:, 3] = 800.0
    epe["m-c"][0, 4] = 45.0
    for m in dice:
        for s in (0, 1):
            rows = [{"case_id": c, "dice": float(dice[m][s, i]), "epe_mm": float(epe[m][s, i]), "sdlogj": 0.1}
                    for i, c in enumerate(cases)]
            _write_exp(tmp_path, "d", m, s, rows, variant_of="m" if m != "m" else None)
    _write_exp(tmp_path, "d", "initial", 0, [{"case_id": c, "dice": 0.5 if c != "c11" else math.nan, "epe_mm": 2.0,
                                              "sdlogj": 0.0} for c in cases])
    return tmp_path, {"dice": dice, "epe": epe}


def test_diverged_runs_are_found_listed_and_left_out_of_every_statistic(tmp_path):
    from leaderboard.table import collect, diverged_runs

    root, v = _diverged_example(tmp_path)
    rows, _ = collect(root)
    bad = diverged_runs(rows)
    assert set(bad) == {("m-a", 1), ("m-b", 0), ("m-b", 1)}
    assert bad[("m-a", 1)] == "Dice not finite on case c00"
    assert bad[("m-b", 0)] == "EPE mm 800 mm > 50 mm on case c03"
    ds = build_report(root).datasets[0]
    assert [d.method for d in ds.diverged] == ["m-a", "m-b"]
    assert ds.diverged[0].seeds == [1] and ds.diverged[0].n_seeds == 2 and "1 of 2 seeds" in ds.diverged[0].text()
    assert "every seed diverged" in ds.diverged[1].text()
    assert ds.method("m-b") is None  # nothing left to summarise
    ma = ds.method("m-a")
    assert ma.seeds == [0] and ma.stats["dice"]["mean"] == pytest.approx(np.nanmean(v["dice"]["m-a"][0]))
    assert ma.stats["epe_mm"]["mean"] == pytest.approx(v["epe"]["m-a"][0].mean())
    assert ds.method("m-c").seeds == [0, 1]  # a poor case is a result, not divergence
    from leaderboard.table import summary_cells

    assert ma.stats["dice"]["mean"] > max(ds.method(m).stats["dice"]["mean"] for m in ("m", "m-c"))
    assert ds.best["dice"] != "m-a"  # survivors' statistics are never the reference
    cells = {r[0]: r for r in summary_cells(ds)[1]}
    assert cells["m-a"][2] == "1 (+1 diverged)" and cells["m-c"][2] == "2"
    # its comparisons say they stand on the surviving seed, and its rank score is never bold
    from leaderboard.table import initial_cells, paired_cells

    paired = {r[0]: r for r in paired_cells(ds)[1]}
    assert all(c.endswith(" (on 1 of 2 seeds)") for c in paired["m-a"][1:] if c != "best")
    assert not any(c.endswith("seeds)") for r in paired.values() if r[0] != "m-a" for c in r[1:])
    assert all(c.endswith(" (on 1 of 2 seeds)") for r in initial_cells(ds)[1] if r[0] == "m-a" for c in r[1:] if c)
    assert "**" not in cells["m-a"][-1] and "**" not in cells["m-a"][-2]
    # ablation: m-a against m on seed 0 alone (the seed both finished); m-b has no cases and no verdict of "no effect"
    t = ablation_tables(build_report(root))[0]
    a, b, c = t.rows["dice"]
    assert t.seeds == {"m-a": [0], "m-b": [], "m-c": [0, 1]}
    d = (v["dice"]["m-a"][0] - v["dice"]["m"][0])[:-1]
    assert a.n == 11 and a.diff == pytest.approx(d.mean()) and b.n == 0 and c.n == 11
    text = markdown_sections(build_report(root))
    verdict_line = next(ln for ln in text if ln.startswith("m: "))
    assert "m-b: every seed diverged" in verdict_line and "no significant effect" in verdict_line
    assert "m-b" not in verdict_line.split("no significant effect: ")[1].split(";")[0].split(", ")
    md = write_leaderboard(root, formats=("md", "html")).read_text()
    assert "Diverged runs" in md and "- m-a: 1 of 2 seeds diverged (seed 1; seed 1: Dice not finite on case c00)" in md
    assert 'class="diverged"' in (root / "leaderboard.html").read_text()
    tex = write_leaderboard(root, formats=("tex",)).with_suffix(".tex").read_text()
    assert "Diverged: m-a: 1 of 2 seeds diverged" in tex


def test_arc_point_with_a_diverged_seed_is_marked_and_not_best(tmp_path):
    from benchmark.arc import ArcPoint, write_arc_csv
    from leaderboard.ablation import arc_summary, read_arc

    cases = [f"c{i}" for i in range(4)]
    _write_exp(tmp_path, "d", "initial", 0, [{"case_id": c, "dice": 0.5, "epe_mm": 2.0, "sdlogj": 0.0} for c in cases])
    for name, dice, epe in (("s-w0.1", 0.9, 1e4), ("s", 0.7, 1.0)):
        _write_exp(tmp_path, "d", name, 0, [{"case_id": c, "dice": dice, "epe_mm": epe, "sdlogj": 0.1} for c in cases])
    pts = {"s": [ArcPoint(method="s", experiment="s-w0.1", param="w", value=0.1, is_default=False),
                 ArcPoint(method="s", experiment="s", param="w", value=1.0, is_default=True)]}
    write_arc_csv(tmp_path, ["d"], [0], pts, bound=1.0)
    rows = read_arc(tmp_path)
    assert [r["status"] for r in rows] == ["diverged", "complete"]
    assert arc_summary(rows)[0]["best_dice"] == pytest.approx(0.7)  # the blown-up point's 0.9 is not eligible
