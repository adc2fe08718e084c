#!/usr/bin/env bash
# Installs everything into .venv, starts Redis/PostgreSQL if they are down, then runs the
# linters and the whole test suite (slow, service-backed and end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/services.sh
# The dashboard's browser tests drive Debian's Chromium through Playwright (Playwright's own
# browser download needs the network): install it when missing and we may (CI runs as root).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "warning: could not install chromium: the browser tests will be skipped" >&2
fi
.venv/bin/ruff check core worker scheduler tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
