"""The worker's CPU thread settings reach OpenMP before torch loads."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("threads, policy", [(1, "passive"), (0, "active")])
def test_thread_settings_are_applied_before_torch_loads(threads, policy):
    code = (
        "import os, sys\n"
        "from pulid_flux.config import Settings\n"
        "from pulid_flux.worker import apply_cpu_thread_settings\n"
        "assert 'torch' not in sys.modules\n"
        f"apply_cpu_thread_settings(Settings(worker_threads={threads}, worker_omp_wait_policy='{policy}'))\n"
        "import torch\n"
        "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_NUM", "PULID_FLUX_WORKER"))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got_policy, got_threads = done.stdout.split()
    assert got_policy == policy.upper()
    assert int(got_threads) == threads if threads else int(got_threads) >= 1  # 0: torch's default
