"""regbench: datamodules."""
