"""The README's commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^TEST_COMMAND='(.*)'$", ci, re.M).group(1)
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert command in blocks, "README's test command and .ci/run differ"
    assert 'pip install -q "torch==2.13.0" -e' in command  # torch in the same pip call: no CUDA wheels


def test_readme_main_command_runs_the_main_job():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert any(b.endswith("python jobs/attribute.py") and '"torch==2.13.0" -e .' in b for b in blocks)


def test_shipped_jobs_and_configs_named_in_the_readme_exist():
    readme = (ROOT / "README.md").read_text()
    for path in re.findall(r"`(jobs/[a-z_]+\.py)`", readme):
        assert (ROOT / path).exists(), path
