"""scripts/serve's choices, run against stand-ins for scripts/install, the venv's python (the CUDA
check) and the pulid-flux command, which record how they were called."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def checkout(tmp_path):
    """A copy of scripts/serve with recording stand-ins; ``run(*args, cuda=, download_ok=)``."""
    shutil.copy(REPO / "scripts" / "serve", tmp_path / "serve")
    (tmp_path / "scripts").mkdir()
    shutil.move(tmp_path / "serve", tmp_path / "scripts" / "serve")
    log = tmp_path / "calls.log"
    _executable(tmp_path / "scripts" / "install", "exit 0\n")
    _executable(tmp_path / ".venv" / "bin" / "python", '[[ "$FAKE_CUDA" == 1 ]]\n')
    _executable(tmp_path / ".venv" / "bin" / "pulid-flux",
                f'echo "$*" >> {log}\nif [[ "$1" == download ]]; then [[ "$FAKE_DOWNLOAD_OK" == 1 ]]; fi\n')

    def run(*args: str, cuda: bool, download_ok: bool = True, env: dict | None = None):
        full_env = {k: v for k, v in os.environ.items() if k != "PULID_FLUX_MODEL"}
        full_env.update(FAKE_CUDA=str(int(cuda)), FAKE_DOWNLOAD_OK=str(int(download_ok)), **(env or {}))
        done = subprocess.run(["bash", str(tmp_path / "scripts" / "serve"), *args], capture_output=True,
                              text=True, timeout=60, env=full_env)
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return done, calls

    return run


def test_tiny_downloads_nothing_even_on_a_gpu(checkout):
    done, calls = checkout("--model", "tiny", cuda=True)
    assert done.returncode == 0
    assert calls == ["serve --model tiny"]
    done, calls = checkout(cuda=False)
    assert calls == ["serve"]  # no GPU: the server's own default (tiny)


def test_weights_dir_is_used_for_download_and_serving(checkout):
    done, calls = checkout("--weights-dir", "/w/x", "--port", "9000", cuda=True)
    assert done.returncode == 0
    assert calls == ["download --dest /w/x", "serve --weights-dir /w/x --port 9000"]
    done, calls = checkout("--model=flux-dev", "--weights-dir=/w/y", cuda=False)
    assert calls == ["download --dest /w/y", "serve --model=flux-dev --weights-dir=/w/y"]


def test_a_failed_download_on_a_gpu_default_serves_tiny_with_a_warning(checkout):
    done, calls = checkout(cuda=True, download_ok=False)
    assert done.returncode == 0
    assert calls == ["download", "serve --model tiny"]
    assert "random-weight 'tiny' model" in done.stderr


def test_a_failed_download_for_an_explicit_flux_dev_stops(checkout):
    done, calls = checkout("--model", "flux-dev", cuda=True, download_ok=False)
    assert done.returncode == 1
    assert calls == ["download"]
    done, calls = checkout(cuda=True, download_ok=False, env={"PULID_FLUX_MODEL": "flux-dev"})
    assert done.returncode == 1 and calls == ["download"]
