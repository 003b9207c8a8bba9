"""The ``acceleration`` request field: diffusers' First Block Cache, made PuLID-aware.

First Block Cache (ParaAttention's FBCache, in diffusers as ``FirstBlockCacheConfig``) runs the
first transformer block at every call and skips all the others when that block's residual moved
less than a threshold since the last full call, reusing the skipped blocks' cached residual.

PuLID-awareness:
- the ID residual is a hook inside each ID block (engine/injection.py), so the first block's ID
  residual is part of what is compared, and the cached residual holds the other ID blocks' effect;
- switching the ID on (``start_step``) or off (``end_step``) drops every cached residual, so the
  next call of each branch runs all blocks with the new ID state: the identity is never carried
  over from a call that did not have it;
- each CFG branch has its own ``cache_context`` (as diffusers' FluxPipeline does): the prompt, the
  negative prompt, and the batched pair each compare against their own history.

Thresholds (relative mean absolute change of the first block's residual):
- ``regular`` 0.08: ParaAttention's default for FLUX.1-dev (diffusers' ParaAttention guide: about
  2x on FLUX.1-dev "with very good quality").
- ``high`` 0.12: the upper end that nunchaku's FB-cache guidance gives for FLUX (0.001-0.12:
  increasing speed with minor quality loss; above 0.12, noticeable loss).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from torch import nn

ACCELERATION_LEVELS = ("none", "regular", "high")
FIRST_BLOCK_CACHE_THRESHOLDS = {"regular": 0.08, "high": 0.12}


class BlockCache:
    """First Block Cache on ``transformer`` for the duration of one ``with`` (one request).

    ``branch(name, id_on)`` wraps one transformer call; it also counts the block evaluations
    skipped, reported as ``skipped_fraction``.
    """

    def __init__(self, transformer: nn.Module, threshold: float):
        self.transformer = transformer
        self.threshold = threshold
        self.num_blocks = len(self._blocks())
        self.calls = 0
        self.skipped_calls = 0
        self._id_on: Optional[bool] = None
        self._leader = None

    def __enter__(self) -> "BlockCache":
        from diffusers.hooks import FirstBlockCacheConfig
        from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

        self.transformer.enable_cache(FirstBlockCacheConfig(threshold=self.threshold))
        self._leader = self.transformer.transformer_blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
        # --compile compiles each block with fullgraph: the cache's skip decision (a number read back
        # to Python) breaks that graph, and its per-branch, per-decision variants exceed dynamo's
        # recompile limit (seen on the tiny preset). So the blocks run uncompiled while the cache is
        # on; the compiled ones come back after the request.
        self._compiled = [(block, block._compiled_call_impl) for block in self._blocks()
                          if getattr(block, "_compiled_call_impl", None) is not None]
        for block, _ in self._compiled:
            block._compiled_call_impl = None
        return self

    def __exit__(self, *exc) -> None:
        for block, compiled in self._compiled:
            block._compiled_call_impl = compiled
        self.transformer._reset_stateful_cache()
        self.transformer.disable_cache()

    def _blocks(self) -> list[nn.Module]:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    @contextmanager
    def branch(self, name: str, id_on: bool) -> Iterator[None]:
        if id_on != self._id_on:  # the ID switched on or off: nothing cached is valid any more
            self.transformer._reset_stateful_cache()
            self._id_on = id_on
        with self.transformer.cache_context(name):
            yield
            skipped = not self._leader.state_manager.get_state().should_compute
        self.calls += 1
        self.skipped_calls += skipped

    @property
    def skipped_fraction(self) -> float:
        """Block evaluations skipped over those a plain run would do (the first block always runs)."""
        if not self.calls:
            return 0.0
        return self.skipped_calls * (self.num_blocks - 1) / (self.calls * self.num_blocks)


def block_cache(transformer: nn.Module, acceleration: str) -> Optional[BlockCache]:
    """The cache for a request's ``acceleration`` level; None for "none" (the plain loop)."""
    if acceleration not in ACCELERATION_LEVELS:
        raise ValueError(f"acceleration must be one of {ACCELERATION_LEVELS}, got {acceleration!r}")
    if acceleration == "none":
        return None
    return BlockCache(transformer, FIRST_BLOCK_CACHE_THRESHOLDS[acceleration])
