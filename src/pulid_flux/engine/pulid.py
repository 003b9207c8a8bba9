"""PuLID-FLUX's own modules: the IDFormer ID encoder and the cross-attention blocks.

Attribute names follow the released ``pulid_flux_v0.9.*.safetensors`` keys, so that file
loads into :class:`PuLIDModules` with a plain strict ``load_state_dict``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Softmax attention, [B,Lq,H*D] x [B',Lk,H*D] -> [B,Lq,H*D]; B' = 1 broadcasts."""
    b, n, _ = q.shape
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    if k.shape[0] != b:  # one ID for a batch of images
        k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, -1)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    # Index layout (Linear at 0/3/6, LayerNorm at 1/4) is fixed by the checkpoint keys.
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, out_dim),
    )


class PerceiverAttention(nn.Module):
    """IDFormer attention: latents query [context; latents]."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)  # context
        self.norm2 = nn.LayerNorm(dim)  # latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context: Tensor, latents: Tensor) -> Tensor:
        context = self.norm1(context)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((context, latents), dim=-2)).chunk(2, dim=-1)
        return self.to_out(_attention(q, k, v, self.heads))


class PerceiverAttentionCA(nn.Module):
    """Cross-attention from image tokens (queries) to ID tokens (keys/values)."""

    def __init__(self, *, dim: int = 3072, dim_head: int = 128, heads: int = 16, kv_dim: int = 2048):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(kv_dim)  # ID tokens
        self.norm2 = nn.LayerNorm(dim)  # image tokens
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, id_tokens: Tensor, img: Tensor) -> Tensor:
        id_tokens = self.norm1(id_tokens)
        img = self.norm2(img)
        q = self.to_q(img)
        k, v = self.to_kv(id_tokens).chunk(2, dim=-1)
        return self.to_out(_attention(q, k, v, self.heads))


class IDFormer(nn.Module):
    """ArcFace+EVA-CLS vector and 5 EVA hidden states -> ``num_queries`` ID tokens.

    ``mapping_dim`` is the hidden width of the input MLPs (1024 in the released model,
    independent of ``dim``).
    """

    num_scales = 5

    def __init__(
        self,
        dim: int = 1024,
        depth: int = 10,
        dim_head: int = 64,
        heads: int = 16,
        num_id_token: int = 5,
        num_queries: int = 32,
        output_dim: int = 2048,
        ff_mult: int = 4,
        id_cond_dim: int = 1280,
        vit_hidden_dim: int = 1024,
        mapping_dim: int = 1024,
    ):
        super().__init__()
        if depth % self.num_scales:
            raise ValueError(f"depth must be a multiple of {self.num_scales}, got {depth}")
        self.dim = dim
        self.num_id_token = num_id_token
        self.num_queries = num_queries
        self.output_dim = output_dim
        self.layers_per_scale = depth // self.num_scales

        # Real values come from the checkpoint; the init only matters for fresh modules.
        scale = dim**-0.5
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) * scale)
        self.proj_out = nn.Parameter(torch.randn(dim, output_dim) * scale)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        for i in range(self.num_scales):
            setattr(self, f"mapping_{i}", _mlp(vit_hidden_dim, mapping_dim, dim))
        self.id_embedding_mapping = _mlp(id_cond_dim, mapping_dim, dim * num_id_token)

    def forward(self, id_cond: Tensor, vit_hidden: list[Tensor]) -> Tensor:
        """``id_cond`` [B,C] or [B,N,C] (N references -> 5N ID tokens); returns [B,num_queries,output_dim]."""
        b = id_cond.shape[0]
        n_refs = id_cond.shape[1] if id_cond.ndim == 3 else 1
        id_tokens = self.id_embedding_mapping(id_cond).reshape(b, self.num_id_token * n_refs, self.dim)
        latents = torch.cat((self.latents.expand(b, -1, -1), id_tokens), dim=1)
        for i in range(self.num_scales):
            context = torch.cat((id_tokens, getattr(self, f"mapping_{i}")(vit_hidden[i])), dim=1)
            for attn, ff in self.layers[i * self.layers_per_scale : (i + 1) * self.layers_per_scale]:
                latents = latents + attn(context, latents)
                latents = latents + ff(latents)
        return latents[:, : self.num_queries] @ self.proj_out


def ca_placement(
    num_double: int, num_single: int, double_interval: int = 2, single_interval: int = 4
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(block index, CA index) pairs for the double and the single blocks, official order."""
    double = [(blk, k) for k, blk in enumerate(range(0, num_double, double_interval))]
    single = [(blk, len(double) + k) for k, blk in enumerate(range(0, num_single, single_interval))]
    return double, single


def num_cross_attentions(num_double: int, num_single: int, double_interval: int = 2, single_interval: int = 4) -> int:
    return math.ceil(num_double / double_interval) + math.ceil(num_single / single_interval)


class PuLIDModules(nn.Module):
    """Holds ``pulid_encoder`` and ``pulid_ca`` exactly as the released checkpoint names them.

    Defaults build the released model for FLUX.1-dev (19 double, 38 single blocks).
    """

    def __init__(
        self,
        encoder: IDFormer | None = None,
        *,
        num_double_blocks: int = 19,
        num_single_blocks: int = 38,
        double_interval: int = 2,
        single_interval: int = 4,
        ca_dim: int = 3072,
        ca_heads: int = 16,
        ca_dim_head: int = 128,
    ):
        super().__init__()
        self.pulid_encoder = encoder if encoder is not None else IDFormer()
        self.num_double_blocks = num_double_blocks
        self.num_single_blocks = num_single_blocks
        self.double_interval = double_interval
        self.single_interval = single_interval
        n = num_cross_attentions(num_double_blocks, num_single_blocks, double_interval, single_interval)
        self.pulid_ca = nn.ModuleList(
            PerceiverAttentionCA(
                dim=ca_dim, dim_head=ca_dim_head, heads=ca_heads, kv_dim=self.pulid_encoder.output_dim
            )
            for _ in range(n)
        )

    @classmethod
    def for_transformer(
        cls, transformer: nn.Module, encoder: IDFormer | None = None, *, ca_heads: int = 16, ca_dim_head: int = 128
    ) -> "PuLIDModules":
        """Sizes the CA list for a diffusers ``FluxTransformer2DModel``."""
        cfg = transformer.config
        return cls(
            encoder,
            num_double_blocks=cfg.num_layers,
            num_single_blocks=cfg.num_single_layers,
            ca_dim=cfg.num_attention_heads * cfg.attention_head_dim,
            ca_heads=ca_heads,
            ca_dim_head=ca_dim_head,
        )

    def placement(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        return ca_placement(self.num_double_blocks, self.num_single_blocks, self.double_interval, self.single_interval)

    @torch.no_grad()
    def encode(self, id_cond: Tensor, vit_hidden: list[Tensor]) -> Tensor:
        return self.pulid_encoder(id_cond, vit_hidden)

    @torch.no_grad()
    def encode_uncond(self, id_cond: Tensor, vit_hidden: list[Tensor]) -> Tensor:
        """The encoder's answer to all-zero inputs: true CFG's negative ID (not zeros)."""
        return self.pulid_encoder(torch.zeros_like(id_cond), [torch.zeros_like(h) for h in vit_hidden])
