"""regbench: benchmark."""

from benchmark._omp import apply_omp_wait_policy as _apply_omp_wait_policy

_apply_omp_wait_policy()  # before torch loads OpenMP (benchmark._omp says why)
