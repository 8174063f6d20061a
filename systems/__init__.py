"""regbench: systems."""
