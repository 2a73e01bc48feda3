#!/bin/sh
# Install this checkout into ./.venv (editable, with the test extras). Idempotent; needs no root.
set -eu
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "install.sh: fatal: $PY not found; install Python 3.11 or newer (Debian: apt-get install python3 python3-venv)" >&2
    exit 111
fi
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "install.sh: fatal: $("$PY" -V 2>&1) is too old; Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
    exit 111
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        echo "install.sh: fatal: '$PY -m venv' does not work; on Debian: apt-get install python3-venv" >&2
        exit 111
    fi
fi
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    .venv/bin/python -m ensurepip --upgrade >/dev/null 2>&1 || {
        echo "install.sh: fatal: the virtual environment has no pip; on Debian: apt-get install python3-venv python3-pip" >&2
        exit 111
    }
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
echo "install.sh: installed into $(pwd)/.venv"
