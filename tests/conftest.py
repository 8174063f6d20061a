"""Shared test fixtures: seeded randomness and smooth random fields (kept small on purpose)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded numpy generator."""
    return np.random.default_rng(1234)


def make_smooth_field(
    shape: Sequence[int],
    channels: int,
    amplitude: float,
    sigma: float,
    seed: int = 0,
    batch: int = 1,
) -> torch.Tensor:
    """Gaussian-smoothed white noise scaled to ``max |value| = amplitude``.

    Returns:
        ``(batch, channels, *shape)`` float64 tensor (a displacement in voxels when
        ``channels == len(shape)``, or a smooth image).
    """
    g = np.random.default_rng(seed)
    noise = g.standard_normal((batch, channels, *shape))
    sm = np.stack([[ndi.gaussian_filter(noise[b, c], sigma, mode="nearest") for c in range(channels)]
                   for b in range(batch)])
    sm *= amplitude / np.abs(sm).max()
    return torch.from_numpy(sm)


@pytest.fixture
def smooth_field() -> Callable[..., torch.Tensor]:
    """Factory ``smooth_field(shape, channels, amplitude, sigma, seed=0, batch=1)``; see
    :func:`make_smooth_field`."""
    return make_smooth_field


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one torch thread for the module (on a shared machine OpenMP threads
    spinning at barriers made small-volume tests up to 40x slower); the count is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
