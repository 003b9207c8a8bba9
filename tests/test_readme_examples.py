"""The README's client examples, run as printed against a live tiny server.

Each fenced block after an `<!-- example: NAME -->` line is taken from README.md verbatim; the only
changes are the server's address (the live server's port instead of 8000) and `.venv/bin/python`
(this interpreter, which is that one under scripts/test). They run in a scratch directory, as a
user would in theirs, in order: `face` writes face.jpg for the others.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_clients_js import JS_DIR, node_modules  # noqa: F401  (the fixture, reused)

README = Path(__file__).resolve().parents[1] / "README.md"
README_URL = "http://127.0.0.1:8000"
EXAMPLE = re.compile(r"^<!-- example: (\w+) -->\n```(\w+)\n(.*?)^```$", re.S | re.M)


def examples() -> dict[str, str]:
    return {name: code for name, _lang, code in EXAMPLE.findall(README.read_text())}


def as_run_here(name: str, server_url: str) -> str:
    code = examples()[name]
    assert README_URL in code or name == "face", f"the {name} example does not name {README_URL}"
    return code.replace(README_URL, server_url).replace(".venv/bin/python", sys.executable)


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def check_image_url(url: str, server_url: str) -> None:
    assert url.startswith(server_url + "/"), url
    r = httpx.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    run(["bash", "-euo", "pipefail", "-c", as_run_here("face", "")], d)
    from PIL import Image

    assert Image.open(d / "face.jpg").size == (512, 512)
    return d


def test_the_readme_has_each_example():
    assert set(examples()) == {"face", "curl", "python", "js"}


def test_curl_example(live_server, workdir):
    out = run(["bash", "-euo", "pipefail", "-c", as_run_here("curl", live_server.url)], workdir)
    result = json.loads(out)
    assert result["prompt"] == "portrait, color, cinematic"
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (512, 512)
    check_image_url(result["images"][0]["url"], live_server.url)


def test_python_example(live_server, workdir):
    script = workdir / "example.py"
    script.write_text(as_run_here("python", live_server.url))
    lines = run([sys.executable, str(script)], workdir).splitlines()
    assert any("Completed" in line for line in lines)  # on_queue_update=print
    check_image_url(lines[-1], live_server.url)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_js_example(live_server, workdir, node_modules):  # noqa: F811
    version = json.loads((JS_DIR / "package.json").read_text())["dependencies"]["@fal-ai/client"]
    assert f"npm install @fal-ai/client@{version} && node example.mjs" in README.read_text()
    (workdir / "example.mjs").write_text(as_run_here("js", live_server.url))
    link = workdir / "node_modules"  # what `npm install` in the user's directory gives
    if not link.exists():
        link.symlink_to(node_modules, target_is_directory=True)
    lines = run(["node", "example.mjs"], workdir).splitlines()
    assert "COMPLETED" in lines
    check_image_url(lines[-1], live_server.url)
