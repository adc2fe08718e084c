#!/usr/bin/env bash
# Installs everything into .venv, starts Redis/PostgreSQL if they are down, then runs the
# linters and the whole test suite (slow, service-backed and end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/services.sh
.venv/bin/ruff check core worker scheduler tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
