"""The quick-start scripts do what the README says, and the documentation's links lead somewhere.

The scripts are run for real, from a copy of the repository's scripts/ and .ci/ folders in which
setup.sh is replaced by a stub that puts a fake ``python`` first on PATH: the fake records its
arguments and working directory, so no environment is created and nothing is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "cwd=$(pwd)" >> "$RECORD"
echo "args=$*" >> "$RECORD"
"""


@pytest.fixture
def stub_repo(tmp_path):
    """A copy of scripts/ and .ci/ whose setup.sh only puts a recording fake python on PATH."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    shutil.copytree(ROOT / ".ci", repo / ".ci")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    (repo / "scripts" / "setup.sh").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return repo


def run_script(repo: Path, tmp_path: Path, *command: str, cwd: Path) -> list[str]:
    record = tmp_path / "record.txt"
    record.unlink(missing_ok=True)
    env = {**os.environ, "RECORD": str(record)}
    subprocess.run(["bash", *command], cwd=cwd, env=env, check=True, timeout=60)
    return record.read_text().splitlines()


def readme_quick_start() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_quick_start_is_the_two_scripts():
    assert readme_quick_start() == ["bash scripts/llmprune.sh --model llama", "bash scripts/test.sh"]


def test_main_job_script_passes_its_arguments_to_the_cli(stub_repo, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    recorded = run_script(stub_repo, tmp_path, str(stub_repo / "scripts" / "llmprune.sh"), "--model", "llama",
                          "--sparsity", "0.6", cwd=elsewhere)
    assert recorded == [f"cwd={elsewhere}", "args=-m llmprune --model llama --sparsity 0.6"]


def test_test_script_runs_pytest_from_the_repository_root(stub_repo, tmp_path):
    recorded = run_script(stub_repo, tmp_path, str(stub_repo / "scripts" / "test.sh"), "-k", "cli", cwd=tmp_path)
    assert recorded == [f"cwd={stub_repo}", "args=-m pytest -q -k cli"]


def test_ci_runs_the_readme_test_command(stub_repo, tmp_path):
    recorded = run_script(stub_repo, tmp_path, str(stub_repo / ".ci" / "run"), cwd=tmp_path)
    assert recorded == [f"cwd={stub_repo}", "args=-m pytest -q"]  # the whole suite, no marker filter


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
        anchors.add(text.replace(" ", "-"))
    return anchors


def relative_links(markdown: str) -> list[str]:
    without_code = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", without_code)
            if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", DOCS, ids=[p.relative_to(ROOT).as_posix() for p in DOCS])
def test_documentation_links_resolve(page):
    links = relative_links(page.read_text())
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} -> missing {target}"
        if anchor:
            assert anchor in heading_anchors(target.read_text()), f"{page.name}: {link}: no such heading"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in relative_links((ROOT / "README.md").read_text())}
    assert {page.resolve() for page in DOCS[1:]} <= linked
