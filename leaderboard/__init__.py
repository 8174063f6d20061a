"""regbench: leaderboard."""
