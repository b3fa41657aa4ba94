"""The README's set-up and test commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for line in blocks[0].splitlines() + blocks[1].splitlines() if line.strip()]


def test_ci_runs_the_readme_commands():
    install, demo, test = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.startswith("pip install") and f"python -m {install}" in ci
    assert demo == "leo-rt demo" and "leo-rt demo" in ci
    assert test in ci
