#!/usr/bin/env bash
# The README's two commands. Sets up what it needs on a machine with only Python 3.11+:
# uv (installed with pip if missing) and the locked environment (`uv sync --locked`).
#   ./run.sh deploy 4pnihc40q-yj [--release V] [--set K=V]   a complete release
#   ./run.sh test [pytest args]                               the whole test suite
#   ./run.sh <any project command>                            e.g. ./run.sh release status 4pnihc40q-yj
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v uv >/dev/null 2>&1; then
  export PATH="$HOME/.local/bin:$PATH"
  if ! command -v uv >/dev/null 2>&1; then
    # pip --user first; where the system Python is externally managed (PEP 668), a private
    # bootstrap venv under the state directory instead.
    if ! python3 -m pip install --quiet --user uv 2>/dev/null; then
      python3 -m venv .release/uv-bootstrap
      .release/uv-bootstrap/bin/pip install --quiet uv
      export PATH="$PWD/.release/uv-bootstrap/bin:$PATH"
    fi
  fi
fi
UV="$(command -v uv)"

# uv must not download a Python: use the system one (3.11+).
PY="$(command -v python3)"
$UV sync --locked --quiet --python "$PY"

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  test) exec $UV run --locked --python "$PY" pytest "$@" ;;
  "")   echo "usage: ./run.sh deploy PRODUCT [...] | test [...] | release ..." >&2; exit 2 ;;
  *)    exec $UV run --locked --python "$PY" "$cmd" "$@" ;;
esac
