"""`regbench perf drr`'s agreement check with a peer DRR: compared at the geometry's own
orientation, so a mirrored (flipped or transposed) image is a failure, not a match."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from benchmark.core.drr import CArmGeometry, hu_to_mu, pose_transform, project_points, reference_transform, render_pose
from benchmark.perf.drr import image_agreement, make_perf_ct, peer_volume

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


def _render(n_samples: int, marker: bool = True) -> tuple[np.ndarray, np.ndarray, CArmGeometry, np.ndarray]:
    hu, affine = make_perf_ct(SIZE, marker=marker)
    px = 0.798 * 256 / SIZE
    geom = CArmGeometry(sdd=1020.0, sid=510.0, height=SIZE, width=SIZE, dely=px, delx=px)
    mu = hu_to_mu(torch.from_numpy(hu))[None, None]
    base = reference_transform(torch.zeros(3, dtype=torch.float64))[None]
    img = render_pose(mu, torch.from_numpy(affine), torch.zeros(1, 6, dtype=torch.float64), base, geom, n_samples)
    return img[0, 0].double().numpy(), hu, geom, affine


def test_flipped_peer_image_fails_and_own_orientation_agrees():
    ours, hu, geom, affine = _render(96)
    # A "peer" of the same geometry: another sample count and a slight blur (another renderer's
    # discretisation). It agrees as returned.
    peer = ndi.gaussian_filter(_render(40)[0], 0.5)
    ok = image_agreement(ours, peer)
    assert ok["agrees"] and ok["ncc"] > 0.99 and ok["reason"] is None
    # The same image under a mirrored detector convention: every flip and transpose fails,
    # although such images would have scored as a match under "best NCC over the flips".
    for name, bad in (("rows", peer[::-1]), ("cols", peer[:, ::-1]), ("transpose", peer.T), ("both", peer[::-1, ::-1])):
        res = image_agreement(ours, np.ascontiguousarray(bad))
        assert not res["agrees"], name
        assert "mirrored" in res["reason"] or "below" in res["reason"]
        assert max(res["ncc_mirrored"].values()) > 0.99  # the best-flip search would have passed it


def test_marker_shadow_lies_where_the_geometry_projects_it():
    """The bead that breaks the phantom's symmetry shows where `project_points` (same C-arm)
    puts its centre, so 'own orientation' is the geometry's, not an accident of the phantom."""
    with_marker, hu, geom, affine = _render(96)
    without = _render(96, marker=False)[0]
    shadow = with_marker - without
    peak = np.array(ndi.center_of_mass(np.clip(shadow, 0, None)))
    vox = np.argwhere(hu == 3000.0).mean(0)
    world = torch.from_numpy(vox @ affine[:3, :3].T + affine[:3, 3])[None, None]
    t = pose_transform(torch.zeros(1, 6, dtype=torch.float64), reference_transform(torch.zeros(3, dtype=torch.float64))[None])
    expect = project_points(world, t, geom)[0, 0].numpy()
    assert np.linalg.norm(peak - expect) < 1.0
    centre = (np.asarray(with_marker.shape) - 1) / 2
    assert (np.abs(expect - centre) > 0.5).all()  # off the centre along both detector axes


def _diffdrr_density(volume: np.ndarray) -> np.ndarray:
    """DiffDRR 0.6.1's ``transform_hu_to_density`` as its source states it (bone multiplier 1):
    values <= -800 become the smallest value above -800, then shift to 0 and scale to 1."""
    v = volume.astype(np.float64).copy()
    soft = (v > -800) & (v <= 350)
    v[v <= -800] = v[soft].min()
    v -= v.min()
    return v / v.max()


def test_peer_volume_makes_diffdrr_integrate_our_attenuation():
    """Fed HU, DiffDRR's density is not proportional to our μ (an offset in every non-air voxel);
    fed :func:`peer_volume`, it is exactly μ / max μ."""
    hu, _ = make_perf_ct(SIZE)
    mu = hu_to_mu(torch.from_numpy(hu)).double().numpy()
    from_hu = _diffdrr_density(hu)
    attenuating = mu > 0
    ratio = from_hu[attenuating] / mu[attenuating]
    assert ratio.max() / ratio.min() > 1.5  # not one scale: the renderers would integrate different volumes
    np.testing.assert_allclose(_diffdrr_density(peer_volume(mu.astype(np.float32))), mu / mu.max(), atol=2e-6)
