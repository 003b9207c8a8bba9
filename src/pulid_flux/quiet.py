"""Silences library messages that appear on every start and are known to be harmless.

Each filter matches one message exactly enough that a different (real) warning from the same
library still shows. Called first thing by ``pulid_flux.cli.main``, so it covers ``serve``,
``worker`` (a subprocess started through the same CLI) and ``generate``.
"""

from __future__ import annotations

import logging
import re
import warnings


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# logger name -> the harmless message it logs, and why it is harmless here
LOG_MESSAGES = {
    # torchao (imported by diffusers) registers its Enums with torch's pytree for torch.compile; torch
    # now supports Enums natively and asks torchao to stop. Nothing for us to change.
    "torch.utils._pytree": r"is an Enum subclass and is now natively supported by torch\.compile",
    # diffusers looks for tensor classes that torchao 0.18 moved; they matter only for unpickling
    # checkpoints saved *after* torchao quantization, and we quantize at load time instead.
    "diffusers.quantizers.torchao.torchao_quantizer": r"Unable to import `torchao` Tensor objects",
    # diffusers warns on every `.to(dtype)` even when no module needs to stay in float32 (the list
    # is empty, as for FLUX and its VAE). A non-empty list still shows.
    "diffusers.models.modeling_utils": r"should be kept in float32: \[\]\.",
}


def install() -> None:
    for name, pattern in LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMessage(pattern))
    # insightface's norm_crop calls scikit-image's SimilarityTransform.estimate, deprecated in
    # scikit-image 0.26 and still there until 2.2; requirements.txt pins scikit-image 0.26.
    warnings.filterwarnings("ignore", message=r"`estimate` is deprecated", category=FutureWarning,
                            module=r"insightface\.utils\.face_align")
