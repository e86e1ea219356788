#!/usr/bin/env bash
# Quick start, tests: set up the environment if needed, then run the whole suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python -m pytest -q "$@"
