"""The performance harness (``regbench perf <target>``): one module per target.

``metrics`` (core ops and metrics), ``systems`` (SyN vs FireANTs/ANTs; learned systems'
training step), ``training`` (VoxelMorph step vs the peer packages), ``data`` (+ ``anatomy``:
loading and preprocessing), ``drr`` (DRR rendering vs DiffDRR), ``patchmorph`` (memory flat in
image size), ``gpu`` (CUDA figures). Every measurement in a fresh process goes through
:mod:`benchmark.perf.child`; ``peers/`` holds the scripts run in the peers' own venvs.
"""
