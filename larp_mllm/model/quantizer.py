"""Stochastic vector quantization (SVQ) on the unit sphere, as LARP uses it.

Both the input vectors and the codebook rows are l2-normalised; the code is drawn from softmax(cos / tau)
(multinomial) when sampling, or the argmax (= nearest code on the sphere) when deterministic. The whole quantizer
runs in fp32 with autocast off. No EMA; kaiming-uniform codebook init.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QuantizerOutput:
    """What one quantizer call returns (tensors in fp32)."""

    quantized: torch.Tensor  # (B, N, d) straight-through code vectors: z + sg(q - z), unit norm in value
    indices: torch.Tensor  # (B, N) int64 code indices
    commit_loss: torch.Tensor  # mean((sg[q] - z)^2)
    codebook_loss: torch.Tensor  # mean((q - sg[z])^2)
    entropy_loss: Optional[torch.Tensor] = None  # code_entropy_loss, when an entropy temperature was given


def safe_probs(probs: torch.Tensor) -> torch.Tensor:
    """Rows with NaN/inf become uniform, so multinomial never raises: the non-finite input still makes the losses
    non-finite, which the trainer counts and skips (no host sync here)."""
    ok = torch.isfinite(probs).all(dim=-1, keepdim=True)
    return torch.where(ok, probs, torch.full_like(probs, 1.0 / probs.shape[-1]))


def code_entropy_loss(cos: torch.Tensor, temperature: float) -> torch.Tensor:
    """Codebook-usage regulariser (MAGVIT's entropy loss) on the affinities cos (B, N, K), fp32 -> scalar.

    With p = softmax(cos / temperature): mean per-token entropy H(p) minus the entropy of the batch's mean p.
    Minimising it makes each token confident and the batch spread over the codebook. Not in the reference (its
    entropy loss is off and would crash in stochastic mode); the mean is over this process's batch."""
    log_p = F.log_softmax(cos / temperature, dim=-1)  # (B, N, K)
    p = log_p.exp()
    token_entropy = -(p * log_p).sum(dim=-1).mean()
    mean_p = p.reshape(-1, p.shape[-1]).mean(dim=0)  # (K,)
    batch_entropy = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
    return token_entropy - batch_entropy


class StochasticVQ(nn.Module):
    def __init__(self, codebook_size: int, dim: int, temperature: float = 0.03):
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ValueError(f"codebook needs >= 2 codes of dim >= 1, got {codebook_size} x {dim}")
        if temperature <= 0:
            raise ValueError(f"SVQ temperature must be > 0, got {temperature}")
        self.codebook_size = codebook_size
        self.dim = dim
        self.temperature = temperature
        self.embedding = nn.Embedding(codebook_size, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.embedding.weight)

    def codebook(self) -> torch.Tensor:
        """The l2-normalised codebook (K, d) in fp32."""
        return F.normalize(self.embedding.weight.float(), dim=-1)

    def forward(
        self, z: torch.Tensor, deterministic: bool, entropy_temperature: Optional[float] = None
    ) -> QuantizerOutput:
        """z (B, N, d) any float dtype -> QuantizerOutput; sampling unless `deterministic`. With
        `entropy_temperature`, the output also carries `code_entropy_loss` of the affinities."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)  # (B, N, d)
            codebook = self.codebook()  # (K, d)
            cos = z @ codebook.t()  # (B, N, K)
            if deterministic:
                indices = cos.argmax(dim=-1)  # (B, N)
            else:
                probs = safe_probs(F.softmax(cos / self.temperature, dim=-1))
                indices = torch.multinomial(probs.reshape(-1, self.codebook_size), 1).reshape(cos.shape[:-1])
            q = F.embedding(indices, codebook)  # (B, N, d)
            commit = F.mse_loss(q.detach(), z)
            codebook_loss = F.mse_loss(q, z.detach())
            quantized = z + (q - z).detach()
            entropy = code_entropy_loss(cos, entropy_temperature) if entropy_temperature is not None else None
        return QuantizerOutput(quantized, indices, commit, codebook_loss, entropy)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, N) -> normalised code vectors (B, N, d) in fp32."""
        return F.embedding(indices, self.codebook())
