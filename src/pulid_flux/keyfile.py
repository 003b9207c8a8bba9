"""Private key files that several processes may create at the same time (API replicas and
`serve` starting together on one shared directory)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def read_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    """The file's bytes; when it is absent, ``make()``'s are written (mode 0600) and returned.

    The new content goes to a private temp file that is hard-linked into place, so a reader never
    sees a half-written file and, of several creators, exactly one wins and all return its bytes.
    """
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = make()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_bytes()
    finally:
        os.unlink(tmp)
    return data
