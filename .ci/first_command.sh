#!/usr/bin/env bash
# CI step: the README's first command, exactly as written, on Debian's own python (PEP 668:
# it refuses `pip install` outside a virtual environment), in a clean copy of the tree.
# It downloads the pinned torch and the dependencies (a few minutes) and runs the
# quickstart (a few minutes on 2 cores). Usage: sh .ci/first_command.sh [PYTHON_DIR]
# PYTHON_DIR (default /usr/bin) is put first on PATH so `python3` is that python.
set -eu
cd "$(dirname "$0")/.."
SRC="$(pwd)"
PYDIR="${1:-/usr/bin}"
# The first line of the first ```bash block of the README.
CMD="$(awk '/^```bash$/{inb=1; next} inb && /^```/{exit} inb{print; exit}' README.md)"
[ -n "$CMD" ] || { echo "first_command.sh: no \`\`\`bash block in README.md" >&2; exit 1; }
case "$CMD" in
    *venv*) ;;
    *) echo "first_command.sh: the README's first command makes no virtual environment: $CMD" >&2; exit 1 ;;
esac
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
git -C "$SRC" archive --format=tar HEAD | tar -x -C "$WORK"
cd "$WORK"
echo "first_command.sh: running in $WORK with $(PATH="$PYDIR:$PATH" python3 --version): $CMD"
# A clean environment, except the machine's pip settings (where it finds wheels, its
# certificates): they are part of the machine a newcomer has, not of this checkout.
PIPVARS="$(env | grep '^PIP_' || true)"
# shellcheck disable=SC2086  # one VAR=value word per line of PIPVARS
env -i HOME="$WORK" PATH="$PYDIR:/usr/local/bin:/usr/bin:/bin" LANG=C.UTF-8 WANDB_MODE=offline \
    PIP_DISABLE_PIP_VERSION_CHECK=1 $PIPVARS bash -euc "$CMD"
test -f results/quickstart/leaderboard.md
echo "first_command.sh: ok (results/quickstart/leaderboard.md written)"
