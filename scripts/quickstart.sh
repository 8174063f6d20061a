#!/usr/bin/env bash
# The README's first command as a script: a virtual environment (Debian / Ubuntu's python
# refuses `pip install` outside one: PEP 668, "externally-managed-environment"), the
# install, then the quickstart benchmark.
#
#   scripts/quickstart.sh                 # .venv, pinned CPU torch + regbench[dev], quickstart
#   scripts/quickstart.sh --no-run        # install only
#   scripts/quickstart.sh --venv DIR      # another place for the environment
#   scripts/quickstart.sh --offline       # no download: the venv sees the packages already
#                                         # installed for this python (--system-site-packages)
#                                         # and regbench is installed with --no-deps
# Environment: PYTHON (default python3), TORCH_SPEC (default "torch==2.13.0"; empty to keep
# a torch you installed first, e.g. a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv RUN=1 OFFLINE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) VENV="$2"; shift 2 ;;
        --no-run) RUN=0; shift ;;
        --offline) OFFLINE=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "quickstart.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
if ! "$PY" -c "import venv, ensurepip" 2>/dev/null; then
    echo "quickstart.sh: $PY cannot make virtual environments (Debian / Ubuntu: apt-get install python3-venv)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    # offline: pip and setuptools come from the packages already installed for $PY
    if [ "$OFFLINE" = 1 ]; then "$PY" -m venv --system-site-packages --without-pip "$VENV"; else "$PY" -m venv "$VENV"; fi
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$OFFLINE" = 1 ]; then
    "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
else
    TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
    # shellcheck disable=SC2086  # TORCH_SPEC may be empty
    "$VENV/bin/python" -m pip install --quiet $TORCH_SPEC -e ".[dev]"
fi
echo "installed regbench into $VENV (activate it with: . $VENV/bin/activate)"
if [ "$RUN" = 1 ]; then
    "$VENV/bin/regbench" run benchmark/configs/quickstart.yaml
fi
