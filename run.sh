#!/usr/bin/env bash
# Set the project up (once) and run one of its jobs:
#   ./run.sh quick   set up, fetch the data, run the quick profile (minutes)
#   ./run.sh full    set up, fetch the data, run the full recipe (dvc repro)
#   ./run.sh test    set up and run the test suite
# DATA_SOURCE names a local copy of the dataset; without one the data is
# downloaded from its public repository.
set -euo pipefail
cd "$(dirname "$0")"
DATA_SOURCE=${DATA_SOURCE:-../shared/data/clothing-dataset-small}
PYTHON=${PYTHON:-python3.11}

setup() {
  command -v "$PYTHON" >/dev/null || PYTHON=python3
  if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
  fi
  if ! cmp -s requirements.lock .venv/installed.lock; then
    echo "setup: installing the pinned packages of requirements.lock"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements.lock
    cp requirements.lock .venv/installed.lock
  fi
  export PATH="$PWD/.venv/bin:$PATH"
  if [ ! -d .git ]; then
    echo "setup: DVC experiments need a git repository; run this in a git clone" >&2
    exit 1
  fi
}

fetch() {
  if [ -d "$DATA_SOURCE" ]; then
    python -m stages.fetch --from "$DATA_SOURCE"
  else
    python -m stages.fetch
  fi
}

case "${1:-}" in
  quick) setup; fetch; python -m stages.profile quick ;;
  full) setup; fetch; dvc repro ;;
  test) setup; shift; python -m pytest "$@" ;;
  *) sed -n '2,7p' "$0" >&2; exit 2 ;;
esac
