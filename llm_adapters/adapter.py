"""Codebook-aware rows for the video tokens of an LLM, and their materialisation into a plain HF model.

The input rows and output-head rows of the video tokens are computed from the frozen LARP codebook (K, d) by small
trainable MLPs, so codes that are close on LARP's sphere start close in the LLM. The text rows stay the model's own
(frozen) rows. Two hybrid modules replace the model's input embedding and output head:

    HybridEmbedding(ids)    ids < text_rows -> original embedding;  controls -> trainable rows;  codes -> MLP(codebook)
    HybridHead(hidden)      cat(original head logits, control logits, video logits) over the extended id layout

They are installed with ``set_input_embeddings`` / ``set_output_embeddings``, so ``model(...)``, ``model.generate``,
KV caches and logits processors work unchanged. Rows of ids that carry no token (reserved fillers without a base row,
and the padding up to ``embedding_size``) are the mean text row, so their logit is the mean text logit.

Initialisation keeps the text behaviour before training: the head's video rows start as the mean text row (scale 0,
so every code gets the mean text logit, which never beats the text argmax) and the control rows start at the mean
text rows. Input rows for codes start as mean + per-dim std * RMS-normalised MLP output, i.e. with the text rows'
statistics.

``materialize(model)`` writes all rows into a plainly resized ``nn.Embedding`` / ``nn.Linear`` (untied when the base
was tied, since video input and output rows differ) and returns an ordinary HF model.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import check_extendable, embedding_row_scale
from .vocab import CONTROL_TOKENS, VideoVocab
from .zero3_load import is_partitioned, partitioned_row_sums

NUM_CONTROL = len(CONTROL_TOKENS)


@torch.no_grad()
def row_stats(weight: torch.Tensor, rows: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (h,) and per-dimension std (h,) of `weight[:rows]` (rows, h), in fp32, accumulated in float64 `chunk` rows
    at a time. A partitioned ZeRO-3 weight is not gathered: each rank sums its part, then an all-reduce (every rank
    calls this; `zero3_load.partitioned_row_sums`)."""
    if is_partitioned(weight):
        total, total_sq = partitioned_row_sums(weight, rows)
    else:
        total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
        total_sq = torch.zeros_like(total)
        for start in range(0, rows, chunk):
            block = weight[start:min(rows, start + chunk)].to(torch.float64, copy=True)  # (c, h)
            total += block.sum(0)
            total_sq += block.square_().sum(0)
    mean = total / rows
    var = (total_sq / rows - mean.square()).clamp_min(0)
    return mean.float(), var.sqrt().float()


class CodebookRows(nn.Module):
    """Code vectors (..., d) -> rows (..., h): Linear -> GELU -> Linear -> RMS-normalise -> shift + scale * x.

    `shift` and `scale` (both (h,), learned) start at the text rows' mean and per-dimension std, so the rows have
    the text rows' statistics (pass scale=0 to start every row at the mean).
    """

    def __init__(self, codebook_dim: int, width: int, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
        super().__init__()
        self.fc1 = nn.Linear(codebook_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.shift = nn.Parameter(shift.clone().float())
        self.scale = nn.Parameter(scale.clone().float())
        self.eps = eps

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(vectors.to(self.fc1.weight.dtype))))  # (..., h); the codebook buffer may stay fp32
        x = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps).to(x.dtype)
        return self.shift + self.scale * x


class VideoTokenEmbedding(nn.Module):
    """Input rows of the K code tokens: `rows(codebook[codes])`, codebook (K, d) frozen (a buffer)."""

    def __init__(self, codebook: torch.Tensor, width: int, shift: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("codebook", codebook.detach().clone().float())  # (K, d)
        self.rows = CodebookRows(codebook.shape[1], width, shift, scale)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (...) int64 in [0, K) -> (..., h)."""
        return self.rows(self.codebook[codes])

    def weight(self) -> torch.Tensor:
        """All K input rows (K, h)."""
        return self.rows(self.codebook)


class VideoTokenHead(nn.Module):
    """Output rows of the K code tokens from their own MLP over the codebook, with a learned temperature.

    logits = hidden @ rows(codebook).T / exp(log_temperature). Without grad (generation), the rows are cached and
    recomputed only when a parameter changes (device, dtype or an in-place update).
    """

    def __init__(self, codebook: torch.Tensor, width: int, shift: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("codebook", codebook.detach().clone().float())  # (K, d)
        self.rows = CodebookRows(codebook.shape[1], width, shift, scale)
        self.log_temperature = nn.Parameter(torch.zeros(1))  # (1,), not 0-dim: DeepSpeed broadcasts params as bytes
        self._cache: tuple[Any, torch.Tensor] | None = None

    def _compute(self) -> torch.Tensor:
        return self.rows(self.codebook) * torch.exp(-self.log_temperature)  # (K, h)

    def weight(self) -> torch.Tensor:
        """All K output rows (K, h), temperature folded in."""
        if torch.is_grad_enabled():
            self._cache = None
            return self._compute()
        state = [*self.parameters(), self.codebook]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in state)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._compute())
        return self._cache[1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., h) -> video logits (..., K)."""
        return F.linear(hidden, self.weight().to(hidden.dtype))


def _full_rows(m: nn.Module) -> torch.Tensor:
    """The extended matrix of a hybrid embedding or head: text rows, fill, control rows, video rows, padding."""
    out = m.fill.to(m.weight.dtype).repeat(m.embedding_size, 1)  # (embedding_size, h)
    out[: m.text_rows] = m.weight
    out[m.base: m.video_offset] = m.control
    out[m.video_offset: m.vocab_size] = m.video.weight()
    return out


class HybridEmbedding(nn.Module):
    """Input embedding over the extended layout; the original embedding stays a frozen submodule (`text`).

    An embedding that scales the rows it looks up (Gemma: ``* sqrt(h)``) scales the control, video and fill rows
    too (`row_scale`, (1,) or None): the stored rows (`full_weight`) are the pre-scale rows, so writing them into the
    same embedding module (`materialize`) gives the same forward.
    """

    def __init__(self, text: nn.Embedding, vocab: VideoVocab, codebook: torch.Tensor, stats_rows: int):
        super().__init__()
        if not isinstance(text, nn.Embedding):
            raise ValueError(f"expected the model's input embedding to be an nn.Embedding, got {type(text).__name__}")
        self.text = text.requires_grad_(False)
        self.text_rows, self.base, self.video_offset = text.num_embeddings, vocab.base, vocab.video_offset
        self.vocab_size, self.embedding_size = vocab.vocab_size, vocab.embedding_size
        self.codebook_size = vocab.codebook_size
        mean, std = row_stats(text.weight, stats_rows)
        self.register_buffer("fill", mean.clone())  # (h,) row of ids without a token
        self.register_buffer("row_scale", embedding_row_scale(text), persistent=False)  # (1,) or None
        self.control = nn.Parameter(mean[None].repeat(NUM_CONTROL, 1))  # (3, h)
        self.video = VideoTokenEmbedding(codebook, text.embedding_dim, mean, std)

    @property
    def weight(self) -> nn.Parameter:
        """The original (text) rows, so code that reads `get_input_embeddings().weight` keeps working."""
        return self.text.weight

    @property
    def num_embeddings(self) -> int:
        return self.embedding_size

    @property
    def embedding_dim(self) -> int:
        return self.text.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (...) int64 in [0, embedding_size) -> (..., h) in the text embedding's dtype."""
        text = self.text(input_ids.clamp(max=self.text_rows - 1))  # (..., h), scaled by the module if it scales
        control = self.control[(input_ids - self.base).clamp(0, NUM_CONTROL - 1)]  # (..., h)
        video = self.video((input_ids - self.video_offset).clamp(0, self.codebook_size - 1))  # (..., h)
        ids = input_ids[..., None]  # (..., 1)
        out = torch.where((ids >= self.base) & (ids < self.video_offset), control.to(text.dtype),
                          self.fill.to(text.dtype))
        out = torch.where((ids >= self.video_offset) & (ids < self.vocab_size), video.to(text.dtype), out)
        if self.row_scale is not None:
            out = out * self.row_scale  # the text module's own factor, in its dtype
        return torch.where(ids < self.text_rows, text, out)

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """All rows of the extended embedding (embedding_size, h)."""
        return _full_rows(self)


class HybridHead(nn.Module):
    """Output head over the extended layout: the original head's logits unchanged, then controls, codes, padding.

    `weight`/`bias` are the original head's parameters (shared with the input embedding when tied), so
    `model.tie_weights()` keeps working.
    """

    def __init__(self, text: nn.Linear, vocab: VideoVocab, codebook: torch.Tensor, stats_rows: int):
        super().__init__()
        if not isinstance(text, nn.Linear):
            raise ValueError(f"expected the model's output head to be an nn.Linear, got {type(text).__name__}")
        text.requires_grad_(False)
        self.weight = text.weight
        self.bias = text.bias
        self.text_rows, self.base, self.video_offset = text.out_features, vocab.base, vocab.video_offset
        self.vocab_size, self.embedding_size = vocab.vocab_size, vocab.embedding_size
        mean, std = row_stats(text.weight, stats_rows)
        self.register_buffer("fill", mean.clone())  # (h,)
        self.control = nn.Parameter(mean[None].repeat(NUM_CONTROL, 1))  # (3, h)
        self.video = VideoTokenHead(codebook, text.in_features, mean, torch.zeros_like(std))
        self._cache: tuple[Any, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self.scored_rows: torch.Tensor | None = None  # (R,) ids in [base, vocab_size): llm_adapters.loss.score_rows

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.embedding_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., h) -> logits (..., embedding_size).

        With grad, the text, control and video logits come from separate products (no gradient is formed for the
        frozen text rows). Without grad (generation, evaluation), one product with the cached full matrix, i.e.
        exactly what the materialised lm_head computes. While `scored_rows` is set: logits (..., R) of those ids.
        """
        if self.scored_rows is not None:  # new ids only (bias 0); with grad the video logits are recomputed in backward
            video = torch.utils.checkpoint.checkpoint(self.video, hidden, use_reentrant=False)  # (..., K)
            new = torch.cat([F.linear(hidden, self.control.to(hidden.dtype)), video], dim=-1)  # (..., 3 + K) from base
            return new[..., self.scored_rows - self.base]  # (..., R)
        if not torch.is_grad_enabled():
            weight, bias = self._inference_weight()
            return F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
        self._cache = None
        text = F.linear(hidden, self.weight, self.bias)  # (..., text_rows)
        fill = F.linear(hidden, self.fill.to(hidden.dtype)[None])  # (..., 1)
        parts = [text]
        if self.base > self.text_rows:
            parts.append(fill.expand(*hidden.shape[:-1], self.base - self.text_rows))
        parts.append(F.linear(hidden, self.control.to(hidden.dtype)))  # (..., 3)
        parts.append(self.video(hidden))  # (..., K)
        if self.embedding_size > self.vocab_size:
            parts.append(fill.expand(*hidden.shape[:-1], self.embedding_size - self.vocab_size))
        return torch.cat(parts, dim=-1)

    def _inference_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        state = [*self.parameters(), *self.buffers()]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in state)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, (self.full_weight(), self.full_bias()))
        return self._cache[1]

    @torch.no_grad()
    def full_bias(self) -> torch.Tensor | None:
        """The original bias padded with zeros to (embedding_size,), or None."""
        if self.bias is None:
            return None
        return torch.cat([self.bias, self.bias.new_zeros(self.embedding_size - self.text_rows)])

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """All rows of the extended head (embedding_size, h)."""
        return _full_rows(self)


# ---- installing, saving, materialising ------------------------------------------------------------------------
def install_video_adapter(model: nn.Module, vocab: VideoVocab, codebook: torch.Tensor) -> None:
    """Replace the model's input embedding and output head with the hybrid modules (in place).

    The text rows are frozen; the adapter parameters (MLPs, shift/scale, temperature, control rows) are trainable.
    Sets ``config.vocab_size = vocab.embedding_size`` (the logits width), and ``model.vocab_size`` as HF's
    ``resize_token_embeddings`` does (Gemma 2/3, Cohere, ... size their loss by it).
    """
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embed, HybridEmbedding):
        raise ValueError("the model already holds a video adapter")
    check_extendable(model)
    if embed.num_embeddings > vocab.base:
        raise ValueError(f"the model has {embed.num_embeddings} embedding rows, more than the layout's base "
                         f"{vocab.base}; was the model resized?")
    dtype, device = embed.weight.dtype, embed.weight.device
    stats_rows = min(vocab.text_vocab_size, embed.num_embeddings)
    codebook = codebook.to(device)
    hybrid_embed = HybridEmbedding(embed, vocab, codebook, stats_rows).to(device=device, dtype=dtype)
    hybrid_head = HybridHead(head, vocab, codebook, stats_rows).to(device=device, dtype=dtype)
    model.set_input_embeddings(hybrid_embed)  # both built first: a refusal above leaves the model as it was
    model.set_output_embeddings(hybrid_head)
    _set_vocab_size(model, vocab.embedding_size)


def _set_vocab_size(model: nn.Module, size: int) -> None:
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.vocab_size = size
    if isinstance(getattr(model, "vocab_size", None), int):
        model.vocab_size = size


def hf_model(model: nn.Module) -> nn.Module:
    """The HF causal LM under a peft wrapper, or the model itself (LoRA layers are injected in place: it holds them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hybrid_modules(model: nn.Module) -> tuple[HybridEmbedding, HybridHead]:
    """The installed hybrid embedding and head (ValueError if the model has none)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embed, HybridEmbedding) or not isinstance(head, HybridHead):
        raise ValueError("the model holds no video adapter (install_video_adapter was not applied)")
    return embed, head


def _own_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    skip = ("text.", "weight", "bias")
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items() if not k.startswith(skip)}


def video_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (MLPs, shift/scale, temperature, control rows, fill rows, codebook), no text rows."""
    embed, head = hybrid_modules(model)
    return {**_own_state(embed, "embed"), **_own_state(head, "head")}


def video_adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (everything in the hybrid modules except the text rows)."""
    embed, head = hybrid_modules(model)
    text = {id(embed.weight), id(head.weight), id(head.bias)}
    return [p for m in (embed, head) for p in m.parameters() if id(p) not in text]


@torch.no_grad()
def load_video_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a `video_adapter_state_dict` into the installed modules; ValueError on missing/extra/mis-shaped keys."""
    own = video_adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"video adapter mismatch: missing {missing}, unexpected {unexpected}, shapes {shapes}")
    for key, tensor in own.items():
        tensor.copy_(state[key])


@torch.no_grad()
def _materialize_rows(model: nn.Module) -> nn.Module:
    embed, head = hybrid_modules(model)
    weight_in, weight_out = embed.full_weight(), head.full_weight()  # (E, h) each
    text = embed.text  # keep the embedding's own class (e.g. a scaled embedding), only its rows grow
    text.weight = nn.Parameter(weight_in, requires_grad=True)
    text.num_embeddings = embed.embedding_size
    lm_head = nn.Linear(head.in_features, head.embedding_size, bias=head.bias is not None,
                        device=weight_out.device, dtype=weight_out.dtype)
    lm_head.weight.copy_(weight_out)
    if head.bias is not None:
        lm_head.bias.copy_(head.full_bias())
    model.set_input_embeddings(text)
    model.set_output_embeddings(lm_head)
    _set_vocab_size(model, embed.embedding_size)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False  # video input and output rows differ
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return model


def materialize(model: Any) -> nn.Module:
    """An ordinary HF causal LM with the video rows written into a resized embedding and an (untied) lm_head.

    Accepts a `VideoLLM` (its LoRA, if any, is merged first with peft's ``merge_and_unload``; peft trainable-token
    rows are merged too) or a model with the hybrid modules installed. Works in place: the given model is consumed.
    """
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    if hasattr(model, "merge_and_unload"):  # peft wrapper: merge LoRA / trainable tokens into the base weights
        model = model.merge_and_unload()
    if isinstance(model.get_input_embeddings(), HybridEmbedding):
        model = _materialize_rows(model)
    model.requires_grad_(True)
    return model


@torch.no_grad()
def resize_for_rows(model: nn.Module, vocab: VideoVocab, mean_resizing: bool = True) -> None:
    """The plain alternative: resize the embedding/head to `vocab.embedding_size` (HF mean resizing).

    Rows of ids without a token (fillers without a base row, padding) are set to the mean text row so they are
    deterministic (reloading a bundle reproduces them); the new rows [base, vocab_size) are then trained with peft's
    trainable tokens.
    """
    text_rows = model.get_input_embeddings().num_embeddings
    if text_rows > vocab.base:
        raise ValueError(f"model has {text_rows} rows, more than the layout's base {vocab.base}")
    stats_rows = min(vocab.text_vocab_size, text_rows)
    model.resize_token_embeddings(vocab.embedding_size, mean_resizing=mean_resizing)
    layers = [model.get_input_embeddings().weight]
    if model.get_output_embeddings() is not None:
        layers.append(model.get_output_embeddings().weight)
    for weight in {id(w): w for w in layers}.values():
        mean, _ = row_stats(weight, stats_rows)
        weight[text_rows: vocab.base] = mean.to(weight.dtype)
        weight[vocab.vocab_size:] = mean.to(weight.dtype)
