"""regbench: benchmark."""

from benchmark.core._omp import apply_omp_wait_policy as _apply_omp_wait_policy

_apply_omp_wait_policy()  # before torch loads OpenMP (benchmark.core._omp says why)
