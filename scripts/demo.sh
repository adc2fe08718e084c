#!/usr/bin/env bash
# Installs mriq into .venv, then runs the main job on the embedded default (SQLite + a
# filesystem broker, nothing to start): synthetic data -> train -> evaluate -> promote ->
# bulk-classify -> results table, plots and a CSV.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/mriq demo "$@"
