#!/usr/bin/env bash
# ansible-test sanity for the steep.repl collection (no docker).
# ansible-test needs the collection at .../ansible_collections/steep/repl: the tree (minus .venv, .lab,
# .collections, .git and caches) is copied to a temporary one and tested there.
#   bash scripts/sanity.sh [extra ansible-test arguments, e.g. --test validate-modules]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${STEEP_VENV_BIN:-$ROOT/.venv/bin}"
PYVER="${STEEP_SANITY_PYTHON:-3.11}"
WORK="$(mktemp -d /tmp/steep-sanity.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
DEST="$WORK/ansible_collections/steep/repl"
mkdir -p "$DEST"
tar -C "$ROOT" \
    --exclude=./.venv --exclude=./.ansible --exclude=./.lab --exclude=./.collections --exclude=./.git \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=./tests/output --exclude=./bench/results --exclude='*.pyc' \
    -cf - . | tar -C "$DEST" -xf -
cd "$DEST"
export PATH="$BIN:$PATH"

# ansible-test bootstraps pip in its per-test virtualenvs with a get-pip script it normally downloads;
# this machine only reaches the package registries, so we place ansible-test's documented cache file
# ourselves: the interpreter's own ensurepip, then the configured package index.
PIPVER="$(sed -n "s/^ *pip='\([0-9.]*\)',\$/\1/p" "$("$BIN/python" -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')/_internal/python_requirements.py" | head -1)"
PIPVER="${PIPVER:-24.2}"
CACHE="$HOME/.ansible/test/cache/get_pip_${PIPVER//./_}.py"
mkdir -p "$(dirname "$CACHE")"
cat >"$CACHE" <<'PY'
# Offline stand-in for get-pip.py written by steep.repl scripts/sanity.sh: ensurepip, then pip install "$@".
# ensurepip runs in a child process: in-process it disables the pip configuration (index, certificates).
import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"], stdout=subprocess.DEVNULL)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
if "--no-setuptools" in sys.argv:
    subprocess.call([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "setuptools"])
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install"] + args))
PY
# Tests whose tool is missing (shellcheck) are skipped by ansible-test with a warning.
"$BIN/ansible-test" sanity --python "$PYVER" --local --color no "$@"
