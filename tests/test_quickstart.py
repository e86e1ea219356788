"""The README's quick start and CI stay in step."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_and_the_main_job_is_the_cli():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["bash scripts/llmprune.sh --model llama", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert 'exec python -m llmprune "$@"' in (ROOT / "scripts" / "llmprune.sh").read_text()
    for script in ("llmprune.sh", "test.sh"):
        assert "setup.sh" in (ROOT / "scripts" / script).read_text()  # each does its own setup
