#!/usr/bin/env bash
# Installs what the tests need (a local venv with the pinned requirements; Chromium for the dashboard's
# browser test when running as root on Debian) and runs the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh requirements.txt requirements-dev.txt
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test: installing chromium for the dashboard browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "test: chromium could not be installed; the browser test will skip"
fi
python -m pytest tests "$@"
