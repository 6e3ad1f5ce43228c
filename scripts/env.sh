# Sourced by run.sh and test.sh: a local virtualenv (.venv) with the pinned requirements, installed once
# and again only when a requirements file changes. Nothing outside the checkout is touched.
# Usage: source scripts/env.sh requirements.txt [requirements-dev.txt]
VENV="${VENV:-.venv}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "env: creating $VENV with $("$PYTHON_BIN" --version 2>&1)"
  "$PYTHON_BIN" -m venv "$VENV" || { echo "error: could not create a virtualenv with $PYTHON_BIN (install python3-venv)" >&2; return 1; }
fi
stamp="$VENV/.requirements.$(cat "$@" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "env: installing $* into $VENV"
  args=()
  for f in "$@"; do args+=(-r "$f"); done
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${args[@]}" || { echo "error: pip install failed" >&2; return 1; }
  rm -f "$VENV"/.requirements.* && touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
