#!/usr/bin/env bash
# Installs what the tests need (a local venv with the pinned requirements; Chromium for the dashboard's
# browser test when running as root on Debian), checks the style (ruff check, ruff format --check) and
# that the generated train_*.py are current (python -m golf.bundle --check), then runs the whole suite
# on the CPU.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh requirements.txt requirements-dev.txt
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test: installing chromium for the dashboard browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "test: chromium could not be installed; the browser test will skip"
fi
echo "test: ruff check, ruff format --check, golf.bundle --check"
ruff check --quiet .
ruff format --check --quiet .
python -m golf.bundle --check
python -m pytest tests "$@"
