"""Building blocks shared by the LARP tokenizer and the discriminator.

- fixed sin-cos position embeddings (1D, and the reference's "3D" = 2D MAE term + full-width temporal term)
- `PatchEmbed3D`: a strided Conv3d that turns a video into (t, h, w)-ordered patch tokens
- `Block`: a pre-LN ViT block (fused qkv without bias, SDPA attention, exact GELU MLP), key-compatible with timm
- `ParallelTransformer`: context and queries concatenated, full attention, the last N outputs kept
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------------
# Fixed sin-cos position embeddings
# ----------------------------------------------------------------------------------------------------------------------
def sincos_1d(dim: int, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """[sin(p * w_i) | cos(p * w_i)] with w_i = 1 / base^(i / (dim/2)); positions (n,) -> (n, dim), float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / base**omega  # (dim/2,)
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # (n, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (n, dim)


def get_1d_sincos_pos_embed(dim: int, n: int, base: float = 10000.0) -> torch.Tensor:
    """Fixed 1D sin-cos embedding of positions 0..n-1 -> (n, dim) float32."""
    return sincos_1d(dim, torch.arange(n), base).float()


def get_3d_sincos_pos_embed(dim: int, grid_t: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The reference's 3D embedding, (t*h*w, dim) in (t, h, w) order, float32.

    A 2D MAE embedding (first half of the channels encodes w, second half h) plus a full-width temporal 1D
    embedding, summed (not concatenated).
    """
    if dim % 4:
        raise ValueError(f"3D sin-cos embedding width must be a multiple of 4, got {dim}")
    hh, ww = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # (h, w) each
    spatial = torch.cat([sincos_1d(dim // 2, ww), sincos_1d(dim // 2, hh)], dim=1)  # (h*w, dim): [w | h]
    temporal = sincos_1d(dim, torch.arange(grid_t))  # (t, dim)
    pe = temporal[:, None, :] + spatial[None, :, :]  # (t, h*w, dim)
    return pe.reshape(grid_t * grid_h * grid_w, dim).float()  # (t*h*w, dim)


def xavier_init_linears(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every nn.Linear inside `module` (the reference's global init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------------------
# Patch embedding
# ----------------------------------------------------------------------------------------------------------------------
class PatchEmbed3D(nn.Module):
    """Video (B, C, T, H, W) -> patch tokens (B, T/pt * H/p * W/p, dim) in (t, h, w) order."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, temporal_patch_size: int):
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.proj(video)  # (B, D, t, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, t*h*w, D)

    def reset_parameters(self) -> None:
        """Xavier-uniform on the kernel viewed as a (D, C*pt*p*p) matrix, zero bias (as a Linear layer)."""
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)


# ----------------------------------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (no bias) and SDPA (flash on GPUs)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        y = y.transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return self.proj(y)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)). State-dict keys match timm's `Block`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ParallelTransformer(nn.Module):
    """The reference's "parallel" transformer: [context ; queries] through full self-attention, keep the last N.

    Not cross-attention: the context tokens are updated in every layer too.
    """

    def __init__(self, dim: int, depth: int, num_heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.gradient_checkpointing = False

    def forward(self, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        n_query = queries.shape[1]
        h = torch.cat([context, queries], dim=1)  # (B, N_ctx + N_q, D)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return h[:, -n_query:]  # (B, N_q, D)
