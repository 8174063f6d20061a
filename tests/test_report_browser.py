"""The HTML report opens in headless Chromium and its plots render.

Chromium loads the page from disk (no network), a probe script injected into a copy of the
page writes each image's decoded size and on-screen box, and each table's box, its last
column's right edge and its scroll width into the DOM (``--dump-dom``), and a screenshot
(``--screenshot``, ``--window-size``) is checked with Pillow: the right size, not blank,
and every image's area on screen not uniform. At 1,280 px every column of every table is
inside the window (no table wider than the viewport or its box), and the provenance block
lists every experiment with its config hash, revision, device and threads from run.json.

Needs a Chromium binary (Debian: ``apt-get install chromium``; CI runs ``.ci/chromium.sh``);
``REGBENCH_CHROMIUM`` may name one. Set ``REGBENCH_REPORT_DIR`` to also check the report of a
real results folder (e.g. the quickstart's).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from leaderboard.write import write_leaderboard

PIL = pytest.importorskip("PIL.Image", reason="Pillow is needed to check the screenshot")

WIDTH = 1280


def _chromium() -> str | None:
    env = os.environ.get("REGBENCH_CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell"):
        p = shutil.which(name)
        if p:
            return p
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary found (install Debian's `chromium`, "
                                                          "see .ci/chromium.sh, or set REGBENCH_CHROMIUM)")

PROBE = """<script>
window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('img').forEach(function (im) {
    var r = im.getBoundingClientRect();
    out.push({alt: im.alt, complete: im.complete, nw: im.naturalWidth, nh: im.naturalHeight,
              x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height});
  });
  var pre = document.createElement('pre');
  pre.id = 'probe';
  var tables = [];
  document.querySelectorAll('table').forEach(function (t) {
    var r = t.getBoundingClientRect(), cells = t.rows[0].cells, last = cells[cells.length - 1].getBoundingClientRect();
    tables.push({head: t.rows[0].innerText.slice(0, 60), right: r.right, lastRight: last.right, scrollW: t.scrollWidth,
                 boxW: t.parentElement.clientWidth, rows: t.rows.length, prov: !!t.closest('.provenance')});
  });
  pre.textContent = JSON.stringify({images: out, tables: tables, viewport: document.documentElement.clientWidth,
                                    height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", "--force-device-scale-factor=1", f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _check_page(page: Path, tmp: Path, n_experiments: int | None = None) -> None:
    html = page.read_text()
    expected = []
    for alt, b64 in re.findall(r'<img alt="([^"]*)" width="\d+" height="\d+" src="data:image/png;base64,([^"]+)"', html):
        im = PIL.open(io.BytesIO(base64.b64decode(b64)))
        expected.append((alt, im.size))
    assert expected, "the page has no embedded plot"

    probed = tmp / "probed.html"
    probed.write_text(html.replace("</body>", PROBE + "</body>"))
    res = _run([f"--window-size={WIDTH},2000", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()], tmp)
    m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, flags=re.S)
    assert m, f"probe did not run: {res.stderr[-1500:]}"
    probe = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    imgs = probe["images"]
    assert [i["alt"] for i in imgs] == [a for a, _ in expected]
    # every column of every table inside the 1,280-px window, no table wider than its box
    assert probe["viewport"] == WIDTH and probe["tables"]
    for t in probe["tables"]:
        assert t["right"] <= WIDTH and t["lastRight"] <= WIDTH, t
        assert t["scrollW"] <= t["boxW"] + 1, t  # no horizontal scrolling needed
    # the provenance block: one row per experiment (plus the header)
    prov = [t for t in probe["tables"] if t["prov"]]
    assert prov, "no provenance block"
    if n_experiments is not None:
        assert sum(t["rows"] - 1 for t in prov) == n_experiments
    for info, (alt, (w, h)) in zip(imgs, expected):
        assert info["complete"] and (info["nw"], info["nh"]) == (w, h), (alt, info, (w, h))  # decoded, right size
        assert info["w"] > 0.5 * min(w, WIDTH - 100) and abs(info["h"] / info["w"] - h / w) < 0.02, (alt, info)

    height = int(min(probe["height"], 16000))
    shot = tmp / "shot.png"
    res = _run([f"--window-size={WIDTH},{height}", f"--screenshot={shot}", page.as_uri()], tmp)
    assert shot.exists(), res.stderr[-1500:]
    im = np.asarray(PIL.open(shot).convert("RGB"), dtype=np.float32)
    assert im.shape[:2] == (height, WIDTH)
    assert im.std() > 5.0, "blank screenshot"
    seen = 0
    for info in imgs:
        x0, y0 = int(info["x"]) + 1, int(info["y"]) + 1
        x1, y1 = int(info["x"] + info["w"]) - 1, int(info["y"] + info["h"]) - 1
        if y1 > height:
            continue
        crop = im[y0:y1, x0:x1]
        assert crop.size and crop.std() > 3.0, f"{info['alt']}: image area is blank on screen"
        # not a flat white box: some pixels well away from the background
        assert (np.abs(crop - 255.0).max(axis=-1) > 60).mean() > 0.005, info["alt"]
        seen += 1
    assert seen >= min(4, len(imgs))


def test_synthetic_report_renders_in_chromium(tmp_path):
    from test_reports import make_results

    root = make_results(tmp_path / "res")
    write_leaderboard(root, formats="md,html")
    complete = [p for p in root.rglob("run.json") if json.loads(p.read_text()).get("status") == "complete"]
    _check_page(root / "leaderboard.html", tmp_path, n_experiments=len(complete))  # the left-out one has none


def _small_quickstart_overrides(config: Path) -> list[str]:
    """--set overrides that make the quickstart's dataset small (whichever built-in brain
    data module it uses) so the test takes seconds."""
    import yaml

    raw = yaml.safe_load(config.read_text())
    name, blk = next(iter(raw["datasets"].items()))
    ds = f"datasets.{name}.init_args"
    out = [f"{ds}.n_train=2", f"{ds}.n_val=2", f"{ds}.n_test=3", f"{ds}.test_pairs=3"]
    if "Anatomy" in blk["class_path"]:
        out.append(f"{ds}.spacing=8.0")
    elif "size" in (blk.get("init_args") or {}) or "SyntheticBrain" in blk["class_path"]:
        out.append(f"{ds}.size=32")
    # ten training steps, wherever the config sets the training length
    vxm = raw["methods"]["voxelmorph"]
    if vxm.get("budget"):
        out.append("methods.voxelmorph.budget.max_steps=10")
    elif raw.get("budget"):
        out.append("budget.max_steps=10")
    else:
        out.append("methods.voxelmorph.trainer.max_steps=10")
    return out


def test_quickstart_report_renders_in_chromium(tmp_path):
    """The report of the quickstart config (made smaller with --set-style overrides so the
    test takes seconds), or of the folder named by ``REGBENCH_REPORT_DIR``."""
    from benchmark.runner import run_grid

    src = os.environ.get("REGBENCH_REPORT_DIR")
    if src:
        root = tmp_path / "copy"
        shutil.copytree(src, root, ignore=shutil.ignore_patterns("ckpt", "*.ckpt", "logs", "fields", "wandb"))
    else:
        root = tmp_path / "qs"
        config = Path(__file__).resolve().parents[1] / "benchmark" / "configs" / "quickstart.yaml"
        statuses = run_grid(
            config,
            output=str(root),
            overrides=[*_small_quickstart_overrides(config), "methods.syn.init_args.preset=fast",
                       "methods.syn.init_args.scales=[4,2]", "methods.syn.init_args.iterations=[10,5]",
                       "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"],
            leaderboard=False,
            log=lambda *_: None,
        )
        assert set(statuses.values()) == {"complete"}, statuses
    write_leaderboard(root, formats="md,html")
    html = (root / "leaderboard.html").read_text()
    for method in ("initial", "voxelmorph", "syn"):
        assert method in html
    runs = [json.loads(p.read_text()) for p in sorted(root.rglob("run.json"))]
    prov = html[html.index('<section id="provenance">'):]
    prov = prov[:prov.index("</section>")]
    for run in runs:  # every experiment's provenance, as run.json has it
        assert run["config_hash"] in prov and run["git_revision"][:10] in prov
    assert f"{runs[0]['torch_threads']} of {runs[0]['cpu_count']} cores" in prov
    assert "torch " + runs[0]["packages"]["torch"] in prov
    # the panel carries the label slices the contours are drawn from
    with np.load(next(root.rglob("panel.npz"))) as panel:
        assert "fixed_seg_ax2" in panel.files and "warped_seg_ax2" in panel.files
    _check_page(root / "leaderboard.html", tmp_path, n_experiments=len(runs))
