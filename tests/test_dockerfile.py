"""The Dockerfile installs exactly as the scripts do, and the documented compose file builds it.

No Docker engine runs on the development or CI machines, so the image is never built here; these
checks keep the file from drifting away from `scripts/install` (the one install path).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_the_image_installs_with_scripts_install_and_nothing_else():
    steps = instructions(ROOT / "Dockerfile")
    runs = [args for op, args in steps if op == "RUN"]
    installs = [args for args in runs if "scripts/install" in args]
    assert len(installs) == 1 and installs[0].split()[-1] == "scripts/install", installs
    # Python packages come from scripts/install alone: no pip of its own, no second requirements list.
    others = [args for args in runs if args not in installs]
    assert not [args for args in others if re.search(r"\bpip\b|requirements|setup\.py", args)], others
    # The whole checkout is in place before the install (it installs the package editable).
    ops = [op for op, _ in steps]
    copy_all = [i for i, (op, args) in enumerate(steps) if op == "COPY" and re.search(r"\s\.\s+/app$", args)]
    assert copy_all and copy_all[0] < ops.index("RUN", copy_all[0])
    for script in ("serve", "test"):
        assert re.search(r"^scripts/install\b", (ROOT / "scripts" / script).read_text(), re.M), script


def test_the_image_is_cuda_runtime_non_root_with_a_health_check():
    steps = instructions(ROOT / "Dockerfile")
    base = [args for op, args in steps if op == "FROM"]
    assert len(base) == 1 and re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", base[0])
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [op for op, _ in steps].index("USER") < [op for op, _ in steps].index("CMD")
    (health,) = [args for op, args in steps if op == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/health" in health


def test_the_compose_file_builds_this_image():
    doc = (ROOT / "docs" / "deployment.md").read_text()
    compose = doc.split("```yaml\nservices:", 1)[1].split("```", 1)[0]
    services = dict(re.findall(r"^  (\w+):\n((?:    .*\n)+)", compose, re.M))
    ours = {name: body for name, body in services.items() if "pulid-flux" in body}
    assert set(ours) == {"api", "worker"}
    for name, body in ours.items():
        assert re.search(r"^    build: \.(\s|$)", body, re.M), name
