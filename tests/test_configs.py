"""Every shipped config loads and passes the runner's checks (keys, classes, arguments,
dataset folders), with the real-data roots pointed at small fake copies of each layout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmark.runner import ConfigError, load_grid_config

HERE = Path(__file__).resolve().parent
CONFIGS = sorted((HERE.parent / "benchmark" / "configs").glob("*.yaml"))
sys.path.insert(0, str(HERE))


def _fake_spine_folder(root: Path) -> Path:
    """One small CT in HU (air, soft tissue, a column of five bone blocks) with vertebra labels."""
    import nibabel as nib
    import numpy as np

    root.mkdir(parents=True)
    ct = np.full((24, 24, 40), -1000, np.int16)
    ct[4:20, 4:20, :] = 40
    lab = np.zeros(ct.shape, np.int16)
    for k in range(5):
        z0 = 3 + 7 * k
        ct[9:15, 9:15, z0 : z0 + 5] = 700
        lab[9:15, 9:15, z0 : z0 + 5] = 20 + k
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(ct, aff), str(root / "fake_ct.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), str(root / "fake_ct_vertebrae.nii.gz"))
    return root


@pytest.fixture(scope="module")
def fake_roots(tmp_path_factory):
    from fake_layouts import build_lumir, build_mindboggle, build_nifti_folder

    base = tmp_path_factory.mktemp("roots")
    return {
        "SPINE_CT_ROOT": str(_fake_spine_folder(base / "spine")),
        "MINDBOGGLE_ROOT": str(build_mindboggle(base / "mb", stray=False)),
        "LUMIR_ROOT": str(build_lumir(base / "lumir")),
        "OASIS_PAIR_ROOT": str(build_nifti_folder(base / "pair", n=2, landmarks=False)),
    }


def test_there_are_configs():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "mindboggle", "lumir", "oasis_pair", "msff_quickstart", "diffop_quickstart",
            "patchmorph_quickstart", "spine_quickstart", "spine_full"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads(path, fake_roots, monkeypatch, tmp_path):
    for k, v in fake_roots.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("REGBENCH_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_grid_config(path, output=str(tmp_path / "out"))
    assert cfg.methods and cfg.datasets
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", [p for p in CONFIGS if "${" in p.read_text()], ids=lambda p: p.stem)
def test_real_data_config_names_its_missing_variable(path, monkeypatch):
    for k in ("MINDBOGGLE_ROOT", "LUMIR_ROOT", "OASIS_PAIR_ROOT", "SPINE_CT_ROOT"):
        monkeypatch.delenv(k, raising=False)
    text = path.read_text()
    if ":-" in text.split("${", 1)[1].split("}", 1)[0]:
        pytest.skip("this config has a default for its folder")
    with pytest.raises(ConfigError, match="is not set"):
        load_grid_config(path)
