#!/usr/bin/env bash
# The README's two commands. Sets up what it needs on a machine with only Python 3.11+:
# uv (installed with pip if missing) and the locked environment (`uv sync --locked`).
#   ./run.sh deploy 4pnihc40q-yj [--release V] [--set K=V]   a complete release
#   ./run.sh test [pytest args]                               the whole test suite
#   ./run.sh <any project command>                            e.g. ./run.sh release status 4pnihc40q-yj
#
# Safe to run many at once, and while a release runs: .venv is synced only when uv.lock,
# pyproject.toml or the interpreter changed (a stamp in .venv records what it was synced
# from), under an exclusive lock that waits until no other ./run.sh command is using .venv;
# every command then holds a shared lock on it for its whole life.
# Exit codes: setup problems exit 2 with what to install; the command's own codes otherwise.
set -euo pipefail
cd "$(dirname "$0")"

die() {
  echo "run.sh: $*" >&2
  exit 2
}

command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH: install Python 3.11 or newer"
# The real interpreter, not a pyenv/asdf shim: uv recreates .venv when the path it is given is
# not the one .venv was made from, and a shim's path never is. Inside a virtual environment
# (a ./run.sh started by a command of another one, with .venv/bin first on PATH) its base.
# One python3 start (a pyenv shim takes ~0.3 s each) gives the interpreter, its version check
# and what the environment must be synced from (a digest of the interpreter, uv.lock and
# pyproject.toml, compared with a stamp in .venv).
SETUP="$(python3 - <<'EOF'
import hashlib, os, sys
py = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
if sys.version_info < (3, 11):
    print(f"{py} is Python {'.'.join(map(str, sys.version_info[:3]))}: install Python 3.11 or newer")
    sys.exit(3)
# "bytecode": the sync compiles site-packages (a change of sync flags re-syncs once).
digest = hashlib.sha256(py.encode() + b"\0bytecode")
for name in ("uv.lock", "pyproject.toml"):
    try:
        with open(name, "rb") as f:
            digest.update(b"\0" + f.read())
    except OSError:
        print(f"cannot read {name} in {os.getcwd()}")
        sys.exit(4)
print(py)
print(digest.hexdigest())
EOF
)" || die "${SETUP:-python3 does not start: install Python 3.11 or newer}"
PY="${SETUP%%$'\n'*}"
WANT="${SETUP##*$'\n'}"

if ! command -v uv >/dev/null 2>&1; then
  export PATH="$HOME/.local/bin:$PATH"
  if ! command -v uv >/dev/null 2>&1; then
    # pip --user first; where the system Python is externally managed (PEP 668), a private
    # bootstrap venv under the state directory instead.
    if ! python3 -m pip install --quiet --user uv 2>/dev/null; then
      { python3 -m venv .release/uv-bootstrap && .release/uv-bootstrap/bin/pip install --quiet uv; } ||
        die "could not install uv with pip: install uv (https://docs.astral.sh/uv/, e.g. 'pipx install uv') or the python3-venv package, then retry"
      export PATH="$PWD/.release/uv-bootstrap/bin:$PATH"
    fi
  fi
fi
UV="$(command -v uv)" || die "uv not found after installing it: add ~/.local/bin to PATH"
command -v flock >/dev/null 2>&1 || die "flock not found: install util-linux (it provides flock)"

mkdir -p .release 2>/dev/null || die "cannot create $PWD/.release: make the project directory writable"
exec 9>>.release/run-sh.lock || die "cannot open $PWD/.release/run-sh.lock: make .release writable"

STAMP=.venv/.run-sh-stamp

fresh() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && .venv/bin/python -c '' 2>/dev/null
}

if ! fresh; then
  # A ./run.sh started by a command of another one: the parent holds .venv (shared lock) for
  # its whole life, so waiting for it would never end.
  [ -z "${RUN_SH_ACTIVE:-}" ] ||
    die ".venv needs a sync, but this ./run.sh runs inside another one that is using it: run it on its own"
  if ! flock -x -n 9; then
    echo "run.sh: .venv needs a sync; waiting for the other ./run.sh commands using it to finish..." >&2
    flock -x -w 1800 9 || die "still in use after 30 minutes: stop the other ./run.sh commands (or run them later) so .venv can be synced"
  fi
  if ! fresh; then # another ./run.sh may have synced it while this one waited
    rm -f "$STAMP"
    # --compile-bytecode: every start then reads cached bytecode instead of compiling dagster,
    # Great Expectations and their dependencies from source (measured: `import dagster` 1.0 s
    # instead of 3 s, `import great_expectations` 3.5 s instead of 9.5 s), also where
    # PYTHONDONTWRITEBYTECODE keeps Python from caching it on its own.
    UV_PYTHON_DOWNLOADS=never "$UV" sync --locked --quiet --compile-bytecode --python "$PY" ||
      die "'uv sync --locked' failed (see above): if uv.lock is out of date with pyproject.toml run 'uv lock'; otherwise check the network or the package index"
    echo "$WANT" >"$STAMP"
  fi
fi
# Shared for the command's lifetime (fd 9 stays open across exec): a sync waits for it.
flock -s 9

export RUN_SH_ACTIVE=1
# The project's own modules (dagster_project, assets, checks, the tests) and the processes a
# release starts cache their bytecode under __pycache__ (git-ignored) even where the shell sets
# PYTHONDONTWRITEBYTECODE: compiling them again on every start costs each command ~0.5 s.
unset PYTHONDONTWRITEBYTECODE
export VIRTUAL_ENV="$PWD/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  test) exec pytest "$@" ;;
  "") die "usage: ./run.sh deploy PRODUCT [...] | test [...] | release ..." ;;
  *)
    command -v "$cmd" >/dev/null 2>&1 || die "unknown command '${cmd:0:80}': use deploy, release, test, or a program in .venv/bin"
    exec "$cmd" "$@"
    ;;
esac
