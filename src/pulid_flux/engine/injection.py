"""Adds the PuLID cross-attention residual to a diffusers FluxTransformer2DModel via forward hooks.

Each hooked block's image output becomes ``img + id_weight * pulid_ca[k](id, img)``; the
text stream is passed through untouched. Hooks are inert unless an ID is active, so the
same transformer serves plain FLUX and PuLID requests.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
        self._handles = [double_blocks[b].register_forward_hook(self._hook_for(k)) for b, k in double] + [
            single_blocks[b].register_forward_hook(self._hook_for(k)) for b, k in single
        ]

    def _hook_for(self, ca_index: int):
        ca = self.pulid_ca[ca_index]

        def hook(module, args, output):
            if self._id is None:
                return None  # keep the block's own output object: plain FLUX
            txt, img = output  # diffusers 0.42 Flux blocks return (encoder_hidden_states, hidden_states)
            return txt, img + self._id_weight * ca(self._id, img)

        return hook

    @property
    def active(self) -> bool:
        return self._id is not None

    @contextmanager
    def inject(self, id_tokens: Tensor | None, id_weight: float | Tensor = 1.0) -> Iterator[None]:
        """Within the block, transformer calls add the ID; ``id_tokens=None`` means plain FLUX."""
        if not self._handles:
            raise RuntimeError("IDInjector was removed")
        previous = self._id, self._id_weight
        self._id, self._id_weight = id_tokens, id_weight
        try:
            yield
        finally:
            self._id, self._id_weight = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._id = None
