"""regbench: benchmark."""
