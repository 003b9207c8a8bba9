"""The official PuLID-FLUX reference fixtures, shipped in this repository.

The safetensors files are stored xz-compressed (`tests/fixtures/pulid-reference/*.safetensors.xz`)
so the tracked tree stays small enough to travel to a lent GPU machine with its wheels; this
module unpacks them once into `tests/artifacts/` (ignored by git), checks each against the
sha256 in the fixtures' `manifest.json`, and hands out that folder.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
from pathlib import Path

PACKED = Path(__file__).resolve().parent / "fixtures" / "pulid-reference"
UNPACKED = Path(__file__).resolve().parent / "artifacts" / "pulid-reference"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reference_dir() -> Path:
    """The unpacked fixture folder; every file matches the manifest (or this raises)."""
    manifest = json.loads((PACKED / "manifest.json").read_text())["files"]
    UNPACKED.mkdir(parents=True, exist_ok=True)
    for name, entry in manifest.items():
        target = UNPACKED / name
        if target.is_file() and target.stat().st_size == entry["bytes"] and _sha256(target) == entry["sha256"]:
            continue
        packed = PACKED / (name + ".xz")
        source = packed if packed.is_file() else PACKED / name
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        opener = lzma.open if source.suffix == ".xz" else open
        with opener(source, "rb") as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(tmp) != entry["sha256"]:
            tmp.unlink()
            raise RuntimeError(f"reference fixture {name} does not match manifest.json")
        tmp.replace(target)  # atomic: parallel test processes never see half a file
    for extra in ("README.md", "manifest.json"):
        shutil.copyfile(PACKED / extra, UNPACKED / extra)
    return UNPACKED
