"""Library warnings known to be harmless are filtered at start-up, and nothing else is."""

from __future__ import annotations

import logging
import re
import warnings

from pulid_flux import quiet


def assert_no_library_warnings(stderr: str) -> None:
    """For the CLI tests: a tiny `generate`'s stderr has none of the filtered messages, and no
    other library warning either (`tests/test_pipeline.py` runs one)."""
    for pattern in quiet.LOG_MESSAGES.values():
        assert not re.search(pattern, stderr), pattern
    assert "`estimate` is deprecated" not in stderr
    assert not re.search(r"Warning\b|^W\d{4} ", stderr, re.M), stderr  # warnings.warn, torch's log


def test_other_messages_from_the_same_libraries_still_show(caplog, recwarn):
    quiet.install()
    log = logging.getLogger("diffusers.models.modeling_utils")
    harmless = "There are modules in X that should be kept in float32: []. Casting directly"
    real = "There are modules in X that should be kept in float32: ['norm']. Casting directly"
    with caplog.at_level(logging.WARNING):
        for message in (harmless, real):
            log.warning(message)
        logging.getLogger("torch.utils._pytree").warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == [real, "something else went wrong"]
    warnings.warn_explicit("`estimate` is deprecated", FutureWarning, "face_align.py", 1,
                           module="insightface.utils.face_align")
    warnings.warn_explicit("another deprecation", FutureWarning, "face_align.py", 1,
                           module="insightface.utils.face_align")
    assert [str(w.message) for w in recwarn] == ["another deprecation"]


def test_a_tiny_serve_starts_without_library_warnings(live_server):
    """The shared live server's log up to its worker's readiness: API and worker start-up."""
    log = live_server.log_path.read_text(errors="replace")
    assert "ready with model tiny" in log
    assert_no_library_warnings(log.split("ready with model tiny", 1)[0])
