"""The ground floor: numerical and IO modules (warps, losses, metrics, SE(3), DRR, timing, result files).

Nothing here imports from datamodules, systems, sweeps, leaderboard or the upper benchmark modules
(runner, cli, evaluate, perf, ...); see docs/design.md, "Layout".
"""
