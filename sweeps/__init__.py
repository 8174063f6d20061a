"""regbench: sweeps."""
