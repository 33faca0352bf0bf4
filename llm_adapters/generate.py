"""Constrained video-code generation with classifier-free guidance (CFG), a plain path and a fast path.

    from llm_adapters import generate_video_codes
    codes = generate_video_codes(video_llm, ["apply eye makeup", None], cfg_scale=1.25, seed=0)  # (2, N) int64

Every sample is one prompt followed by ``<|video_start|>``; the model then writes exactly N code tokens (the
constraint allows only the video block inside the span), after which ``<|video_end|>`` would be forced; since the
codes are returned, decoding stops after the N-th code. Per step, logits go through the processors in this order:

    CFG (c + (s - 1)(c - u), = u + s(c - u)) -> constraint (video ids only) -> temperature -> top-k -> top-p -> sample

CFG batches the conditional rows and their ``<|video_uncond|>`` rows into one forward (a doubled batch with one
cache); both halves of a pair are fed the same sampled token. ``cfg_scale == 1`` runs without the unconditional
branch (the formula is exactly c there). Sampling is fp32 inverse-CDF sampling with one uniform per (sample, step),
drawn up front from a per-sample ``torch.Generator(seed + index)``: a sample depends on its prompt and index only,
not on its batch or on the path (up to the float rounding that padding brings). `VideoSpanConstraint` is the same
constraint as a LogitsProcessor for `model.generate`. Prompts of different lengths are left-padded (attention mask +
position ids).

Paths. Plain (``fast=False``): the HF model's forward with a ``DynamicCache`` and full-vocabulary logits, masked to
the video block. Fast (``fast=True``; ``"auto"`` = on CUDA): the decoder backbone with a preallocated ``StaticCache``
and logits computed only over the K video rows (the adapter's video head, or the rows of a materialised head); on
CUDA the decode step (forward + CFG + sampling) is compiled with ``torch.compile(mode="reduce-overhead")`` (CUDA
graphs). Both paths give identical codes for the same seed (fp32 on the CPU).
"""
from __future__ import annotations

import functools
import inspect
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adapter import HybridHead, hf_model
from .prompts import Prompt, PromptEncoder, VideoSegment
from .vocab import VideoVocab

Fast = bool | Literal["auto"]
_PROMPT_BUCKET = 64  # compiled fast path: prompt lengths rounded up to this, so one graph serves many batches


# ---- processors ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; temperature 0 is greedy (argmax), top_k 0 and top_p 1 disable those filters."""

    cfg_scale: float = 1.25
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {self.cfg_scale}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0


def apply_cfg(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Rows [cond; uncond] (2B, V) -> guided (B, V) fp32: c + (s - 1)(c - u), exactly c when s == 1."""
    cond, uncond = logits.float().chunk(2, dim=0)
    return cond + (cfg_scale - 1.0) * (cond - uncond)


def filter_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus, keeps >= 1 token) on fp32 logits (B, K)."""
    if sampling.temperature > 0 and sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, K) each
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > sampling.top_p  # mass before a token already exceeds p
        drop[..., 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_codes(logits: torch.Tensor, uniforms: torch.Tensor, greedy: bool = False) -> torch.Tensor:
    """Inverse-CDF sampling: logits (B, K) fp32, uniforms (B,) in [0, 1) -> indices (B,) int64.

    softmax in fp32, cdf = cumsum; the index is the first whose cdf exceeds u * total (never a zero-probability
    index: the rare round-up past the end falls back to the last index with mass).
    """
    if greedy:
        return logits.argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)  # (B, K)
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]  # (B, 1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # (B,)
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)  # last index with mass
    return torch.minimum(index, last)


def draw_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """(B, steps) fp32 uniforms; row i comes from torch.Generator().manual_seed(seeds[i]) alone."""
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows) if rows else torch.zeros(0, steps)


def video_constraint_mask(vocab: VideoVocab, width: int, device: torch.device | str) -> torch.Tensor:
    """Bool (width,): True on the ids allowed inside the video span (the K code ids)."""
    allowed = torch.zeros(width, dtype=torch.bool, device=device)
    allowed[vocab.video_offset: vocab.vocab_size] = True
    return allowed


class VideoSpanConstraint:
    """A `transformers` LogitsProcessor for `model.generate`: after the last ``<|video_start|>`` of a row only code
    ids are allowed for N steps, then ``<|video_end|>``, then `eos_token_id` (when given); other rows are untouched.

        model.generate(ids, logits_processor=LogitsProcessorList([VideoSpanConstraint(vocab, tok.eos_token_id)]))
    """

    def __init__(self, vocab: VideoVocab, eos_token_id: int | None = None):
        self.vocab, self.eos_token_id = vocab, eos_token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L), scores (B, V) -> scores with the disallowed ids at -inf."""
        vocab, length = self.vocab, input_ids.shape[1]
        index = torch.arange(length, device=input_ids.device)
        last = torch.where(input_ids == vocab.video_start_id, index, -1).max(dim=-1).values  # (B,)
        written = length - 1 - last  # tokens after the last start
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[(last >= 0) & (written < vocab.num_video_tokens)] = video_constraint_mask(vocab, scores.shape[-1],
                                                                                        scores.device)
        for rows, token in (((last >= 0) & (written == vocab.num_video_tokens), vocab.video_end_id),
                            ((last >= 0) & (written > vocab.num_video_tokens), self.eos_token_id)):
            if token is not None and bool(rows.any()):
                keep[rows] = False
                keep[rows, token] = True
        return scores.masked_fill(~keep, float("-inf"))


# ---- prompts ------------------------------------------------------------------------------------------------
@dataclass
class PromptBatch:
    """Left-padded prompt rows ([cond; uncond] when CFG): ids, mask and position ids, each (R, L) int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor  # (R,) real prompt lengths


def pack_prompts(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str,
                 pad_to: int | None = None) -> PromptBatch:
    """Left-pad id lists to a common length (at least `pad_to`); positions count real tokens from 0."""
    length = max(max(len(r) for r in rows), pad_to or 0)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (R, L)
    lengths = mask.sum(-1)
    return PromptBatch(ids.to(device), mask.to(device), positions.to(device), lengths.to(device))


def prompt_rows(video_llm: Any, prompts: Sequence[Prompt], cfg: bool) -> list[list[int]]:
    """Prompt ids of each prompt (None = unconditional), followed by as many unconditional rows when `cfg`."""
    encode = PromptEncoder(video_llm.tokenizer, video_llm.vocab)  # prompt texts are data: control strings stay text
    rows = [encode(p) for p in prompts]
    if cfg and any(isinstance(x, VideoSegment) for p in prompts if not isinstance(p, str) and p for x in p):
        raise ValueError("prompts with videos (continuation) are sampled without CFG, as the reference's frame "
                         "prediction asserts: set cfg_scale to 1")
    if cfg:
        rows += [encode(None)] * len(prompts)
    return rows


# ---- model access -------------------------------------------------------------------------------------------
def _cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.x calls the cache argument `cache`; older releases `past_key_values`."""
    params = inspect.signature(hf_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def logit_transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a model's CausalLM forward does to the head's output (Gemma soft-capping, Cohere/Granite scales)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    divisor = getattr(cfg, "logits_scaling", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def video_head(model: nn.Module, vocab: VideoVocab) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden (..., h) -> logits of the K video rows only (..., K), as the full head would give them."""
    base = hf_model(model)
    head, transform = base.get_output_embeddings(), logit_transform(base.config)
    lo, hi = vocab.video_offset, vocab.vocab_size
    if isinstance(head, HybridHead):
        return lambda hidden: transform(head.video(hidden))
    if type(head) is nn.Linear:
        bias = None if head.bias is None else head.bias[lo:hi]
        return lambda hidden: transform(F.linear(hidden, head.weight[lo:hi], bias))
    return lambda hidden: transform(head(hidden))[..., lo:hi]  # unknown head (e.g. peft trainable tokens)


# ---- the two decoding loops ---------------------------------------------------------------------------------
@torch.no_grad()
def _plain_loop(model: nn.Module, vocab: VideoVocab, batch: PromptBatch, uniforms: torch.Tensor,
                sampling: SamplingConfig, cfg: bool, tick: Callable[[], None]) -> torch.Tensor:
    """HF forward + DynamicCache, full logits, constraint mask. Returns codes (B, N); `tick()` once per step."""
    from transformers import DynamicCache

    n, rows = vocab.num_video_tokens, batch.input_ids.shape[0]
    b = rows // 2 if cfg else rows
    cache_name = _cache_kwarg(model)
    cache = DynamicCache(config=hf_model(model).config)
    mask, positions, ids = batch.attention_mask, batch.position_ids, batch.input_ids
    codes = torch.empty(b, n, dtype=torch.long, device=ids.device)
    allowed = None
    for t in range(n):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_name: cache})
        logits = out.logits[:, -1].float()  # (R, V); the cache was updated in place
        logits = apply_cfg(logits, sampling.cfg_scale) if cfg else logits  # (B, V)
        if allowed is None:
            allowed = video_constraint_mask(vocab, logits.shape[-1], logits.device)
        logits = logits.masked_fill(~allowed, float("-inf"))[:, vocab.video_offset: vocab.vocab_size]  # (B, K)
        code = sample_codes(filter_logits(logits, sampling), uniforms[:, t], sampling.temperature == 0)
        codes[:, t] = code
        ids = (code + vocab.video_offset).repeat(rows // b)[:, None]  # (R, 1): both halves get the same token
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions = positions[:, -1:] + 1
        tick()
    return codes


class FastDecoder:
    """Static-cache decoding with video-row logits; one per (model, rows, cache length, device), reused so that a
    compiled step (CUDA graphs) replays across calls."""

    def __init__(self, model: nn.Module, vocab: VideoVocab, rows: int, max_len: int, compile_step: bool):
        from transformers import StaticCache

        base = hf_model(model)
        self.backbone, self.head = base.get_decoder(), video_head(model, vocab)
        self.cache_name = "cache" if "cache" in inspect.signature(self.backbone.forward).parameters \
            else "past_key_values"
        self.cache = StaticCache(config=base.config, max_cache_len=max_len)
        self.rows, self.max_len, self.vocab = rows, max_len, vocab
        self.step = torch.compile(self._step, mode="reduce-overhead", dynamic=False) if compile_step else self._step

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            **{self.cache_name: self.cache})
        return out.last_hidden_state[:, -1]  # (R, h)

    def _choose(self, hidden: torch.Tensor, uniforms: torch.Tensor, sampling: SamplingConfig, cfg: bool
                ) -> torch.Tensor:
        logits = self.head(hidden).float()  # (R, K): only video rows, so the constraint holds by construction
        logits = apply_cfg(logits, sampling.cfg_scale) if cfg else logits  # (B, K)
        return sample_codes(filter_logits(logits, sampling), uniforms, sampling.temperature == 0)

    def _step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, uniforms: torch.Tensor,
              sampling: SamplingConfig, cfg: bool) -> torch.Tensor:
        return self._choose(self._hidden(ids, mask, positions), uniforms, sampling, cfg)

    @torch.no_grad()
    def run(self, batch: PromptBatch, uniforms: torch.Tensor, sampling: SamplingConfig, cfg: bool,
            tick: Callable[[], None]) -> torch.Tensor:
        """Prefill (eager), then N - 1 decode steps. Returns codes (B, N); `tick()` once per step."""
        n, rows = self.vocab.num_video_tokens, self.rows
        b = rows // 2 if cfg else rows
        self.cache.reset()
        width = batch.input_ids.shape[1]
        mask = torch.ones(rows, self.max_len, dtype=torch.long, device=batch.input_ids.device)
        mask[:, :width] = batch.attention_mask  # future slots are hidden by causality, prompt pads by the mask
        codes = torch.empty(b, n, dtype=torch.long, device=mask.device)
        hidden = self._hidden(batch.input_ids, mask, batch.position_ids)  # prefill (eager)
        code = self._choose(hidden, uniforms[:, 0], sampling, cfg)
        positions = batch.position_ids[:, -1:]
        for t in range(n):
            codes[:, t] = code
            tick()
            if t == n - 1:
                break
            ids = (code + self.vocab.video_offset).repeat(rows // b)[:, None]  # (R, 1)
            positions = positions + 1
            if self.step is not self._step:
                torch.compiler.cudagraph_mark_step_begin()
            code = self.step(ids, mask, positions, uniforms[:, t + 1], sampling, cfg).clone()
        return codes


_DECODERS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, FastDecoder]]" = weakref.WeakKeyDictionary()


def _fast_decoder(model: nn.Module, vocab: VideoVocab, rows: int, max_len: int, compile_step: bool) -> FastDecoder:
    decoders = _DECODERS.setdefault(model, {})
    key = (rows, max_len, compile_step, str(next(model.parameters()).device), next(model.parameters()).dtype)
    if key not in decoders:
        if len(decoders) >= 4:  # bound the memory held by static caches
            decoders.clear()
        decoders[key] = FastDecoder(model, vocab, rows, max_len, compile_step)
    return decoders[key]


# ---- public entry point -------------------------------------------------------------------------------------
def generate_video_codes(
    video_llm: Any,
    prompts: Sequence[Prompt],
    cfg_scale: float = 1.25,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    fast: Fast = "auto",
    compile: bool | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Generate one video's codes per prompt: LongTensor (len(prompts), N) with values in [0, K) on the CPU.

    Args:
        video_llm: a `VideoLLM` (or anything with `.model`, `.tokenizer`, `.vocab`); runs on its model's device.
        prompts: class names / captions as text (see `prompts.class_name_to_text`); None = unconditional; or
            user turns of texts and `VideoSegment`s (e.g. `tasks.continuation_prompt`; no CFG with these).
        cfg_scale: CFG scale s (1 = no guidance, no second branch). temperature 0 = greedy.
        seed: sample i uses torch.Generator seeded with seed + i (independent of batching and of the path).
        batch_size: prompts per forward (the forward holds 2x rows with CFG).
        fast: False = plain path, True = fast path (static cache, video-row logits), "auto" = fast on CUDA.
        compile: compile the fast decode step (CUDA graphs); None = on CUDA only.
        progress: tqdm bar over generated tokens.
    """
    sampling = SamplingConfig(float(cfg_scale), float(temperature), int(top_k), float(top_p))
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate_video_codes needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if fast not in (True, False, "auto"):
        raise ValueError(f"fast must be True, False or 'auto', got {fast!r}")
    model, vocab = video_llm.model, video_llm.vocab
    device = next(model.parameters()).device
    use_fast = fast is True or (fast == "auto" and device.type == "cuda")
    compile_step = use_fast and (device.type == "cuda" if compile is None else bool(compile))
    cfg, n = sampling.uses_cfg, vocab.num_video_tokens
    tokenizer = video_llm.tokenizer
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    max_positions = getattr(hf_model(model).config.get_text_config(), "max_position_embeddings", None)
    uniforms = draw_uniforms([seed + i for i in range(len(prompts))], n).to(device)  # (P, N)
    was_training = model.training
    model.eval()
    out = []
    try:
        with tqdm(total=len(prompts) * n, unit="tok", desc="generating video tokens", disable=not progress) as bar:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                u = uniforms[start:start + batch_size]
                real = len(chunk)
                if compile_step and real < batch_size:  # one graph shape for all calls: pad with copies (a decode
                    extra = batch_size - real           # step costs about the same at any small batch on a GPU)
                    chunk, u = chunk + [chunk[-1]] * extra, torch.cat([u, u[-1:].expand(extra, -1)])
                rows = prompt_rows(video_llm, chunk, cfg)
                longest = max(len(r) for r in rows)
                pad_to = -(-longest // _PROMPT_BUCKET) * _PROMPT_BUCKET if compile_step else longest
                if max_positions is not None and longest + n > max_positions:
                    raise ValueError(f"prompt of {longest} tokens + {n} video tokens exceeds the model's "
                                     f"max_position_embeddings ({max_positions})")
                batch = pack_prompts(rows, pad_id, device, pad_to)
                tick = functools.partial(bar.update, real)
                if use_fast:
                    decoder = _fast_decoder(model, vocab, len(rows), pad_to + n - 1, compile_step)
                    codes = decoder.run(batch, u, sampling, cfg, tick)
                else:
                    codes = _plain_loop(model, vocab, batch, u, sampling, cfg, tick)
                out.append(codes[:real].cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
