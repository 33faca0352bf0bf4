"""The transformer video discriminator of LARP (larp-spec 3.1, `TransformerDiscriminator`).

    video (B,3,T,H,W) --PatchEmbed3D (t4, p8)--> (B, Np, D) + fixed 3D sin-cos PE
    [CLS ; patches] --depth x pre-LN ViT Block--> LN(eps 1e-6) on CLS --> Linear --> 1 logit per video

Reproduce size: 512 wide, 8 heads, 12 blocks (about 38.2M parameters). Xavier init (CLS token included), no
spectral norm, no R1. Input values in [0, 1] as the tokenizer's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from larp_mllm.model.layers import Block, PatchEmbed3D, get_3d_sincos_pos_embed, xavier_init_linears


@dataclass
class DiscriminatorConfig:
    input_size: int = 128
    frame_num: int = 16
    in_channels: int = 3
    patch_size: int = 8
    temporal_patch_size: int = 4
    dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size or self.frame_num % self.temporal_patch_size:
            raise ValueError(
                f"DiscriminatorConfig: video {self.frame_num}x{self.input_size}^2 is not divisible by the patch "
                f"{self.temporal_patch_size}x{self.patch_size}^2"
            )
        if self.dim % self.num_heads or self.dim % 4:
            raise ValueError(f"DiscriminatorConfig: dim {self.dim} must be divisible by num_heads "
                             f"{self.num_heads} and by 4")
        if self.depth < 1:
            raise ValueError(f"DiscriminatorConfig: depth must be >= 1, got {self.depth}")

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        s = self.input_size // self.patch_size
        return self.frame_num // self.temporal_patch_size, s, s


class TransformerDiscriminator(nn.Module):
    """Video (B, C, T, H, W) -> realness logits (B,)."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embed = PatchEmbed3D(cfg.in_channels, cfg.dim, cfg.patch_size, cfg.temporal_patch_size)
        self.register_buffer("pos_embed", get_3d_sincos_pos_embed(cfg.dim, *cfg.patch_grid)[None])  # (1, Np, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        xavier_init_linears(self)
        self.patch_embed.reset_parameters()
        nn.init.xavier_uniform_(self.cls_token)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(video.to(self.cls_token.dtype)) + self.pos_embed.to(self.cls_token.dtype)  # (B, Np, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + Np, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0])).squeeze(-1)  # (B,)
