#!/usr/bin/env bash
# Quick start, main job: set up the environment if needed, then `python -m llmprune "$@"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m llmprune "$@"
