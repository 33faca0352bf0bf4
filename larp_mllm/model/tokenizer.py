"""The LARP video tokenizer: learned holistic queries -> stochastic VQ codes -> video, with a causal prior.

    video (B,3,T,H,W) in [0,1] --PatchEmbed3D + 3D sin-cos--> patches (B, Np, D)
    [patches ; N learned queries] --parallel encoder, keep last N--> holistic tokens (B, N, D)
    --in_linear--> (B, N, d) --SVQ on the unit sphere--> codes (B, N) / code vectors (B, N, d)
    --out_linear + 1D sin-cos--> latents (B, N, D)
    [latents ; Np patch queries] --parallel decoder, keep last Np--> LN + Linear --> unpatchify --> (B,3,T,H,W)

State-dict keys equal the reference implementation's, so its checkpoints load as they are (see checkpoint.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .layers import (ParallelTransformer, PatchEmbed3D, get_1d_sincos_pos_embed, get_3d_sincos_pos_embed,
                     xavier_init_linears)
from .prior import PRIOR_PRESETS, ContinuousPrior, prior_logits_from_vectors, prior_loss
from .quantizer import QuantizerOutput, StochasticVQ


@dataclass
class LARPTokenizerConfig:
    """Architecture of a LARP tokenizer. Defaults are LARP-L-Long (16x128x128 video, 1024 tokens)."""

    input_size: int = 128  # H = W of the input video
    frame_num: int = 16  # T
    in_channels: int = 3
    patch_size: int = 8
    temporal_patch_size: int = 4
    num_tokens: int = 1024  # holistic tokens (codes) per video
    encoder_hidden_size: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_hidden_size: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    codebook_size: int = 8192
    codebook_dim: int = 16
    vq_temperature: float = 0.03  # softmax(cos / tau) sampling temperature
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    query_init_std: float = 0.02
    latent_pe_base: float = 10000.0  # base of the decoder's 1D latent sin-cos embedding
    prior: str = "gptc-S"  # a key of PRIOR_PRESETS, or "none"
    prior_dropout: float = 0.1
    prior_max_len: Optional[int] = None  # learned PE length; None -> max(1024, num_tokens) as the reference
    prior_ce_temperature: float = 1.0
    prior_rounds: int = 2  # scheduled-sampling rounds, CE averaged over them
    # The prior's scheduled-sampling schedule (reference mix_ss_*): the ratio ramps 0 -> ss_max_ratio over the first
    # ss_peak_fraction of the training steps. The trainer computes the ratio of each step from these two fields
    # (tokenizer_training.schedules.ss_ratio) and passes it to `forward`; its arguments can override them.
    ss_max_ratio: float = 0.5
    ss_peak_fraction: float = 0.3
    extra: dict = field(default_factory=dict)  # free-form provenance (e.g. the source checkpoint); not used

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"LARPTokenizerConfig: {msg}")

        need(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        need(self.input_size % self.patch_size == 0,
             f"input_size {self.input_size} must be divisible by patch_size {self.patch_size}")
        need(self.frame_num % self.temporal_patch_size == 0,
             f"frame_num {self.frame_num} must be divisible by temporal_patch_size {self.temporal_patch_size}")
        need(self.num_tokens >= 2, f"num_tokens must be >= 2, got {self.num_tokens}")
        for part in ("encoder", "decoder"):
            width, heads = getattr(self, f"{part}_hidden_size"), getattr(self, f"{part}_num_heads")
            need(width % heads == 0, f"{part}_hidden_size {width} must be divisible by {part}_num_heads {heads}")
            need(width % 4 == 0, f"{part}_hidden_size {width} must be a multiple of 4 (3D sin-cos embedding)")
            need(getattr(self, f"{part}_depth") >= 1, f"{part}_depth must be >= 1")
        need(self.codebook_size >= 2 and self.codebook_dim >= 1, "codebook needs >= 2 codes of dim >= 1")
        need(self.vq_temperature > 0, f"vq_temperature must be > 0, got {self.vq_temperature}")
        need(self.prior == "none" or self.prior in PRIOR_PRESETS,
             f"prior must be 'none' or one of {sorted(PRIOR_PRESETS)}, got {self.prior!r}")
        need(self.prior_rounds >= 1, f"prior_rounds must be >= 1, got {self.prior_rounds}")
        need(self.prior_ce_temperature > 0, f"prior_ce_temperature must be > 0, got {self.prior_ce_temperature}")
        need(0 <= self.ss_max_ratio <= 1, f"ss_max_ratio must be in [0, 1], got {self.ss_max_ratio}")
        need(self.ss_peak_fraction >= 0, f"ss_peak_fraction must be >= 0, got {self.ss_peak_fraction}")
        if self.prior_max_len is None:
            self.prior_max_len = max(1024, self.num_tokens)
        need(self.prior_max_len >= self.num_tokens,
             f"prior_max_len {self.prior_max_len} is shorter than num_tokens {self.num_tokens}")

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """(t, h, w) patch grid of the encoder input and the decoder output."""
        s = self.input_size // self.patch_size
        return self.frame_num // self.temporal_patch_size, s, s


TOKENIZER_PRESETS: dict[str, LARPTokenizerConfig] = {
    "larp-l-long": LARPTokenizerConfig(),
    # CPU size for tests and the demo: 8x32x32 video, 32 tokens, 256 codes of dim 8.
    "larp-tiny": LARPTokenizerConfig(
        input_size=32, frame_num=8, num_tokens=32,
        encoder_hidden_size=128, encoder_depth=2, encoder_num_heads=4,
        decoder_hidden_size=128, decoder_depth=2, decoder_num_heads=4,
        codebook_size=256, codebook_dim=8, prior="gptc-tiny", prior_max_len=32,
    ),
}


@dataclass
class TokenizerOutput:
    """Training forward output. Losses are unweighted scalars; `vq_loss` = commit_w * commit + codebook_w * cb."""

    recon: torch.Tensor  # (B, 3, T, H, W), unclamped
    codes: torch.Tensor  # (B, N) int64, sampled (or argmax when deterministic)
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor
    vq_loss: torch.Tensor
    prior_loss: Optional[torch.Tensor] = None  # None when the model has no prior or it was skipped
    entropy_loss: Optional[torch.Tensor] = None  # codebook-usage term; None unless an entropy temperature was given
    prior_top1: Optional[torch.Tensor] = None
    prior_top5: Optional[torch.Tensor] = None


class Bottleneck(nn.Module):
    """in_linear (D -> d), stochastic VQ on the sphere, out_linear (d -> D). Key names follow the reference."""

    def __init__(self, in_dim: int, out_dim: int, cfg: LARPTokenizerConfig):
        super().__init__()
        self.in_linear = nn.Linear(in_dim, cfg.codebook_dim)
        self.regularizer = StochasticVQ(cfg.codebook_size, cfg.codebook_dim, cfg.vq_temperature)
        self.out_linear = nn.Linear(cfg.codebook_dim, out_dim)


class OutputLayer(nn.Module):
    def __init__(self, width: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6)
        self.linear = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


class LARPTokenizer(nn.Module):
    """LARP video tokenizer. See the module docstring for the data path; `tokenize`/`decode_codes` are inverses."""

    def __init__(self, config: LARPTokenizerConfig):
        super().__init__()
        self.config = cfg = config
        d_enc, d_dec, n = cfg.encoder_hidden_size, cfg.decoder_hidden_size, cfg.num_tokens
        grid = cfg.patch_grid
        self.x_embedder = PatchEmbed3D(cfg.in_channels, d_enc, cfg.patch_size, cfg.temporal_patch_size)
        self.register_buffer("encoder_patch_pe", get_3d_sincos_pos_embed(d_enc, *grid)[None])  # (1, Np, D)
        self.encoder_latent_query_embed = nn.Parameter(torch.zeros(n, d_enc))  # (N, D)
        self.encoder = ParallelTransformer(d_enc, cfg.encoder_depth, cfg.encoder_num_heads)
        self.bottleneck = Bottleneck(d_enc, d_dec, cfg)
        self.register_buffer(
            "decoder_latent_pe", get_1d_sincos_pos_embed(d_dec, n, cfg.latent_pe_base)[None]  # (1, N, D)
        )
        self.register_buffer("decoder_patch_query_embed", get_3d_sincos_pos_embed(d_dec, *grid)[None])
        self.decoder_patch_query_token_type_embed = nn.Parameter(torch.zeros(1, 1, d_dec))
        self.decoder = ParallelTransformer(d_dec, cfg.decoder_depth, cfg.decoder_num_heads)
        patch_volume = cfg.temporal_patch_size * cfg.patch_size**2 * cfg.in_channels
        self.final_layer = OutputLayer(d_dec, patch_volume)
        self.prior_model: Optional[ContinuousPrior] = None
        if cfg.prior != "none":
            layers, width, heads = PRIOR_PRESETS[cfg.prior]
            self.prior_model = ContinuousPrior(
                cfg.codebook_dim, layers, width, heads, cfg.prior_max_len, cfg.prior_dropout
            )
        self.check_inputs = True  # the trainer may switch the (host-syncing) value checks off
        self._init_weights()

    # ------------------------------------------------------------------------------------------------ construction
    def _init_weights(self) -> None:
        """Xavier on every Linear (prior included), zero output head, queries ~ N(0, std^2)."""
        xavier_init_linears(self)
        self.x_embedder.reset_parameters()
        nn.init.normal_(self.encoder_latent_query_embed, std=self.config.query_init_std)
        nn.init.normal_(self.decoder_patch_query_token_type_embed, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LARPTokenizer":
        """A randomly initialised tokenizer of a preset size (`TOKENIZER_PRESETS`), with field overrides."""
        if name not in TOKENIZER_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(TOKENIZER_PRESETS)}")
        return cls(dataclasses.replace(TOKENIZER_PRESETS[name], **overrides))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, map_location: str | torch.device = "cpu", *, revision: str | None = None,
        cache_dir: str | Path | None = None, local_files_only: bool = False, token: str | bool | None = None,
    ) -> "LARPTokenizer":
        """Load a checkpoint (config.json + model.safetensors, ours or the reference implementation's) from a local
        folder or a Hub repo id such as "hywang66/LARP-L-long-tokenizer" (a local folder of that name wins).

        A repo id goes through huggingface_hub's cache at `revision` (default "main"), downloading only those two
        files; offline (`local_files_only`, HF_HUB_OFFLINE=1) the cache alone is read (`runtime.hub.resolve_folder`).
        """
        from ..runtime.hub import resolve_folder
        from .checkpoint import TOKENIZER_FILES, load_tokenizer_folder

        folder = resolve_folder(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                token=token, allow_patterns=TOKENIZER_FILES, what="LARP tokenizer checkpoint")
        config, state = load_tokenizer_folder(folder, map_location)
        model = cls(config)
        model.load_state_dict_checked(state)
        model.name_or_path = str(name_or_path)  # recorded by extend_llm in video_vocab.json
        return model

    def save_pretrained(self, folder: str | Path) -> None:
        """Write config.json + model.safetensors atomically (the folder appears complete or not at all)."""
        from .checkpoint import save_tokenizer_folder

        save_tokenizer_folder(self, folder)

    def push_to_hub(
        self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
        revision: str | None = None, commit_message: str = "Upload LARP tokenizer",
    ) -> str:
        """Upload `save_pretrained`'s files to the Hub model repo `repo_id` (created when missing) in one commit on
        branch `revision` (default "main"); `from_pretrained(repo_id)` reads them back. Returns huggingface_hub's
        CommitInfo, a str subclass: the commit URL (`.oid`, `.repo_url` and the rest as attributes)."""
        from ..runtime.hub import push_folder

        return push_folder(self.save_pretrained, repo_id, private=private, token=token, revision=revision,
                           commit_message=commit_message)

    def load_state_dict_checked(self, state: dict[str, torch.Tensor]) -> None:
        """load_state_dict with one clear error listing missing, unexpected and mis-shaped keys."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(
                "checkpoint does not match the configuration: "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}; "
                f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; shape mismatches {shapes[:8]}"
            )
        self.load_state_dict(state, strict=True)

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def codebook_dim(self) -> int:
        return self.config.codebook_dim

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """Per-sample input shape (C, T, H, W)."""
        c = self.config
        return c.in_channels, c.frame_num, c.input_size, c.input_size

    def codebook(self) -> torch.Tensor:
        """The l2-normalised codebook (K, d), fp32, detached: the code vectors on the unit sphere."""
        return self.bottleneck.regularizer.codebook().detach()

    def codebook_hash(self) -> str:
        """sha256 of the raw fp32 codebook weights: the identity of the code space."""
        w = self.bottleneck.regularizer.embedding.weight.detach().float().cpu().contiguous()
        return hashlib.sha256(w.numpy().tobytes()).hexdigest()

    def prior_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.prior_model.parameters()) if self.prior_model is not None else iter(())

    def tokenizer_parameters(self) -> Iterator[nn.Parameter]:
        prior = {id(p) for p in self.prior_parameters()}
        return (p for p in self.parameters() if id(p) not in prior)

    # ------------------------------------------------------------------------------------------------ checks
    def _check_video(self, video: torch.Tensor) -> None:
        expected = self.video_shape
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or tuple(video.shape[1:]) != expected:
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"expected a video tensor of shape (B, {', '.join(map(str, expected))}) "
                             f"= (B, C, T, H, W), got {got}")
        if not video.is_floating_point():
            raise ValueError(f"expected a float video with values in [0, 1], got dtype {video.dtype}")
        if self.check_inputs:
            lo, hi = torch.aminmax(video.detach())
            if lo < -1e-3 or hi > 1 + 1e-3 or not torch.isfinite(lo + hi):
                raise ValueError(f"expected video values in [0, 1], got range [{lo.item():.4g}, {hi.item():.4g}]")

    def _check_codes(self, codes: torch.Tensor) -> None:
        n, k = self.num_tokens, self.codebook_size
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[1] != n:
            got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"expected codes of shape (B, {n}), got {got}")
        if codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(f"expected integer codes, got dtype {codes.dtype}")
        if self.check_inputs and codes.numel():
            lo, hi = torch.aminmax(codes)
            if lo < 0 or hi >= k:
                raise ValueError(f"expected codes in [0, {k}), got range [{lo.item()}, {hi.item()}]")

    # ------------------------------------------------------------------------------------------------ model
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video (B, 3, T, H, W) -> holistic tokens (B, N, D) before the bottleneck."""
        x = self.x_embedder(video) + self.encoder_patch_pe  # (B, Np, D)
        queries = self.encoder_latent_query_embed.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, N, D)
        return self.encoder(x, queries.to(x.dtype))  # (B, N, D)

    def quantize(
        self, tokens: torch.Tensor, deterministic: bool, entropy_temperature: Optional[float] = None
    ) -> QuantizerOutput:
        """Holistic tokens (B, N, D) -> QuantizerOutput (code vectors (B, N, d) and indices (B, N))."""
        return self.bottleneck.regularizer(self.bottleneck.in_linear(tokens), deterministic, entropy_temperature)

    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Unit code vectors (B, N, d) -> video (B, 3, T, H, W), unclamped."""
        latents = self.bottleneck.out_linear(vectors.to(self.bottleneck.out_linear.weight.dtype))  # (B, N, D)
        return self.decode_latents(latents)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoder-side latents (B, N, D) (out_linear output) -> video (B, 3, T, H, W)."""
        b = latents.shape[0]
        latents = latents + self.decoder_latent_pe  # (B, N, D)
        queries = (self.decoder_patch_query_embed + self.decoder_patch_query_token_type_embed).expand(b, -1, -1)
        x = self.decoder(latents, queries.to(latents.dtype))  # (B, Np, D)
        return self.unpatchify(self.final_layer(x))  # (B, 3, T, H, W)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Np, pt*p*p*C) -> (B, C, T, H, W); the channel is the fastest-varying index of each patch."""
        c = self.config
        t, h, w = c.patch_grid
        pt, p = c.temporal_patch_size, c.patch_size
        x = x.reshape(x.shape[0], t, h, w, pt, p, p, c.in_channels)  # (B, t, h, w, pt, p, p, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, t, pt, h, p, w, p)
        return x.reshape(x.shape[0], c.in_channels, t * pt, h * p, w * p)  # (B, C, T, H, W)

    @torch.no_grad()
    def tokenize(self, video: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Video (B, 3, T, H, W) float in [0, 1] -> codes int64 (B, N). Sampled from the SVQ when not deterministic."""
        self._check_video(video)
        return self.quantize(self.encode(video), deterministic).indices

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) int -> video (B, 3, T, H, W) float, unclamped (clamp to [0, 1] for display)."""
        self._check_codes(codes)
        return self.decode_vectors(self.bottleneck.regularizer.lookup(codes.long()))

    @torch.no_grad()
    def prior_logits(self, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced prior logits (B, N-1, K) for positions 1..N-1 given the code vectors of `codes`."""
        if self.prior_model is None:
            raise ValueError("this tokenizer has no prior model (config.prior == 'none')")
        self._check_codes(codes)
        vectors = self.bottleneck.regularizer.lookup(codes.long())  # (B, N, d)
        return prior_logits_from_vectors(self.prior_model, vectors, self.codebook(), self.config.prior_ce_temperature)

    def forward(
        self, video: torch.Tensor, ss_ratio: float = 0.0, deterministic: bool = False, with_prior: bool = True,
        entropy_temperature: Optional[float] = None,
    ) -> TokenizerOutput:
        """Training forward. `ss_ratio` (scheduled-sampling ratio of the prior loss) is the caller's schedule;
        `entropy_temperature` adds the codebook-usage term (`quantizer.code_entropy_loss`) to the output."""
        self._check_video(video)
        q = self.quantize(self.encode(video), deterministic, entropy_temperature)
        recon = self.decode_vectors(q.quantized)
        cfg = self.config
        out = TokenizerOutput(
            recon=recon, codes=q.indices, commit_loss=q.commit_loss, codebook_loss=q.codebook_loss,
            vq_loss=cfg.commitment_weight * q.commit_loss + cfg.codebook_weight * q.codebook_loss,
            entropy_loss=q.entropy_loss,
        )
        if with_prior and self.prior_model is not None:
            p = prior_loss(self.prior_model, q.quantized, q.indices, self.codebook(), ss_ratio,
                           cfg.prior_ce_temperature, cfg.prior_rounds)
            out.prior_loss, out.prior_top1, out.prior_top5 = p.loss, p.top1, p.top5
        return out
