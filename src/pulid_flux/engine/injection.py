"""Adds the PuLID cross-attention residual to a diffusers FluxTransformer2DModel via diffusers hooks.

Each hooked block's image output becomes ``img + id_weight * pulid_ca[k](id, img)``; the
text stream is passed through untouched. Hooks are inert unless an ID is active, so the
same transformer serves plain FLUX and PuLID requests.

The residual is a diffusers ``ModelHook`` registered on the block before any cache hook
(engine/acceleration.py), so a cache sees it as part of the block: a skipped block skips its
ID residual too, a computed one includes it, and the first block's ID residual is part of
what First Block Cache compares. The ID tokens may carry one row per sample (batched true CFG:
the prompt's ID and the unconditional ID side by side).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from diffusers.hooks import HookRegistry, ModelHook
from torch import Tensor, nn

from .pulid import ca_placement, num_cross_attentions


class IDInjector:
    def __init__(
        self,
        transformer: nn.Module,
        pulid_ca: nn.ModuleList,
        *,
        double_interval: int = 2,
        single_interval: int = 4,
    ):
        double_blocks = transformer.transformer_blocks
        single_blocks = transformer.single_transformer_blocks
        expected = num_cross_attentions(len(double_blocks), len(single_blocks), double_interval, single_interval)
        if len(pulid_ca) != expected:
            raise ValueError(
                f"transformer with {len(double_blocks)} double and {len(single_blocks)} single blocks needs "
                f"{expected} PuLID cross-attention modules, got {len(pulid_ca)}"
            )
        self.pulid_ca = pulid_ca
        self._id: Tensor | None = None
        self._id_weight: float | Tensor = 1.0
        double, single = ca_placement(len(double_blocks), len(single_blocks), double_interval, single_interval)
        # block -> CA index; kept for inspection and tests
        self.placement = {f"transformer_blocks.{b}": k for b, k in double} | {
            f"single_transformer_blocks.{b}": k for b, k in single
        }
        self._blocks = [double_blocks[b] for b, _ in double] + [single_blocks[b] for b, _ in single]
        for block, (_, k) in zip(self._blocks, double + single):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_IDResidual(self, pulid_ca[k]), HOOK_NAME)
        self._attached = True

    @property
    def active(self) -> bool:
        return self._id is not None

    @contextmanager
    def inject(self, id_tokens: Tensor | None, id_weight: float | Tensor = 1.0) -> Iterator[None]:
        """Within the block, transformer calls add the ID; ``id_tokens=None`` means plain FLUX."""
        if not self._attached:
            raise RuntimeError("IDInjector was removed")
        previous = self._id, self._id_weight
        self._id, self._id_weight = id_tokens, id_weight
        try:
            yield
        finally:
            self._id, self._id_weight = previous

    def remove(self) -> None:
        for block in self._blocks:
            block._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
        self._attached = False
        self._id = None


HOOK_NAME = "pulid_id_residual"


class _IDResidual(ModelHook):
    """Adds one PuLID cross-attention's residual to its block's image output."""

    def __init__(self, injector: IDInjector, ca: nn.Module):
        super().__init__()
        self.injector, self.ca = injector, ca

    def post_forward(self, module: nn.Module, output):
        id_tokens = self.injector._id
        if id_tokens is None:
            return output  # the block's own output object: plain FLUX
        txt, img = output  # diffusers 0.42 Flux blocks return (encoder_hidden_states, hidden_states)
        return txt, img + self.injector._id_weight * self.ca(id_tokens, img)
