"""scripts/install runs pip only when what it installs changed, so later starts need no network.

The script runs for real in a copy of the repository's install inputs, with a stand-in
`.venv/bin/python` that records each call instead of running pip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../../calls.log"
[ -e "$(dirname "$0")/../../pip-fails" ] && exit 1
exit 0
"""


@pytest.fixture
def repo(tmp_path):
    for name in ("scripts/install", "requirements.txt", "requirements-test.txt", "pyproject.toml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def install(repo: Path, *args: str) -> list[str]:
    """Runs scripts/install; returns the pip calls it made."""
    log = repo / "calls.log"
    log.unlink(missing_ok=True)
    proc = subprocess.run(["bash", str(repo / "scripts" / "install"), *args],
                          capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, "scripts/install", proc.stdout, proc.stderr)
    return calls


def test_installs_once_then_only_when_the_inputs_change(repo):
    calls = install(repo)
    assert calls[0].startswith("-m pip install") and calls[0].endswith("-r requirements.txt")
    assert calls[-1].endswith("--no-deps --no-build-isolation -e .")  # no build backend from an index
    assert install(repo) == []  # a restart: no pip, hence no network

    tests = install(repo, "--test")  # the test set was not installed yet
    assert tests[0].endswith("-r requirements-test.txt")
    assert install(repo, "--test") == [] and install(repo) == []  # the test set covers the service

    with open(repo / "requirements.txt", "a") as f:
        f.write("einops==0.8.2\n")
    assert install(repo)[0].endswith("-r requirements.txt")
    assert install(repo) == []
    assert install(repo, "--test") != []  # the service stamp does not stand for the test set

    (repo / "pyproject.toml").write_text((repo / "pyproject.toml").read_text() + "\n# changed\n")
    assert install(repo, "--test") != []


def test_a_failed_install_is_retried(repo):
    (repo / "pip-fails").touch()
    with pytest.raises(subprocess.CalledProcessError):
        install(repo)
    assert not (repo / ".venv" / ".install-stamp").exists()
    (repo / "pip-fails").unlink()
    assert len(install(repo)) == 2
    assert install(repo) == []
