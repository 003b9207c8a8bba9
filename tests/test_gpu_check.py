"""The prepared GPU check cannot rot: its dry run (CPU, tiny preset) runs here, and what would travel
to the device machine is measured against the device tool's limit."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_measures_every_variant_or_says_why_not(tmp_path):
    gpu_check = load_gpu_check()
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {(r["config"], r["variant"]): r for r in report["rows"]}
    assert {config for config, _ in rows} == {name for name, *_ in gpu_check.CONFIGS}
    for row in rows.values():
        assert row["status"] == "ok" or row["note"], row  # a skip always says why
    assert {variant for (config, variant), r in rows.items() if r["status"] == "ok"} == {
        "true_cfg 1", "true_cfg 4 (batched)", "true_cfg 4 (sequential)", "acceleration regular", "acceleration high"}
    assert all(r["s_per_image"] > 0 for r in rows.values() if r["status"] == "ok")
    assert rows[("bf16", "acceleration high")]["skipped_block_fraction"] > 0
    assert rows[("offload", "true_cfg 1")]["note"] == "needs CUDA"
    assert len(report["id_step"]) == 5 and all(v > 0 for v in report["id_step"].values())
    assert report["numerics"]["status"] == "ok" and 0 < report["numerics"]["rel_error_bf16_vs_fp32"] < 3e-2
    assert 0 < report["travel_bytes"] <= gpu_check.TRAVEL_LIMIT_BYTES
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| bf16 | true_cfg 1 |" in table and "would travel:" in table


def test_travel_size_counts_what_git_sends_and_the_wheels(tmp_path):
    gpu_check = load_gpu_check()
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/.whl/\n/big\n")
    (repo / "tracked").write_bytes(b"x" * 1000)
    (repo / "untracked").write_bytes(b"y" * 300)  # not ignored: it travels too
    (repo / "big").write_bytes(b"z" * 10**6)  # ignored: stays
    subprocess.run(["git", "-C", str(repo), "add", "tracked", ".gitignore"], check=True)
    (repo / ".whl").mkdir()
    (repo / ".whl" / "a.whl").write_bytes(b"w" * 500)
    assert gpu_check.travel_bytes(repo, repo / ".whl") == 1000 + 300 + 500 + len("/.whl/\n/big\n")


def test_over_the_travel_limit_fails(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()

    class Oversized:
        def __init__(self, *args):
            pass

        def run(self):
            return {"card": "cpu", "preset": "tiny", "size": "128x96", "steps": 2, "torch": "x", "rows": [],
                    "elapsed_s": 0, "travel_bytes": gpu_check.TRAVEL_LIMIT_BYTES + 1}

    monkeypatch.setattr(gpu_check, "Check", Oversized)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    assert "would travel: 64.0 MiB" in (tmp_path / "gpu_check.md").read_text()


def test_shell_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "device-wheels")], check=True)
